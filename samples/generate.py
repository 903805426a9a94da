"""Deterministic synthetic Amazon datasets in the exact 2014, 2018 and 2023 line formats.

Used by the benchmarks and tests, and to build the bundled samples. Lines follow
FORMATS.md field by field (key orders, types, missing keys, dirty-data quirks); review
texts have realistic lengths and an emotion that usually fits the rating; and reviews
reference asins that a products file contains: product ``i`` has asin ``asin_for(i)``
in every file, and a file of ``N`` reviews uses products ``0 .. max(N // 5, 1) - 1``.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import operator
import os
import queue
import random
import threading
import zlib
from typing import Iterator, Sequence

KINDS = ("reviews", "products")
FORMATS = (2014, 2018, 2023)
MAX_TEXT_CHARS = 15_000
DUPLICATE_RATE = {  # share of exact-duplicate lines, per (kind, format)
    ("reviews", 2014): 0.02,
    ("reviews", 2018): 0.02,
    ("reviews", 2023): 0.02,
    ("products", 2014): 0.0,
    ("products", 2018): 0.02,  # meta_Magazine_Subscriptions repeats a third of its lines
    ("products", 2023): 0.0,  # parent_asin is unique within a 2023 file
}

_dumps = json.JSONEncoder().encode  # json.dumps defaults (ensure_ascii), no per-call setup
_encode_str = json.encoder.encode_basestring_ascii  # a quoted JSON string, as json.dumps


def _table(items: Sequence, weights: Sequence[int]) -> tuple:
    """Items repeated by weight, so a weighted pick is one index (``t[int(random() * n)]``)."""
    return tuple(item for item, weight in zip(items, weights) for _ in range(weight))


# --- identifiers -----------------------------------------------------------------------

_B36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_B36_2 = tuple(a + b for a in _B36 for b in _B36)
_B36_3 = tuple(a + b for a in _B36 for b in _B36_2)
_B_SPACE = 36**8
_B_MULT = 2_654_435_761  # prime, so i -> i * mult mod 36**8 is a bijection
_ISBN_MULT = 387_420_489  # 3**18, coprime with 10**9
_ISBN_WEIGHTS = (10, 9, 8, 7, 6, 5, 4, 3, 2)
_ISBN_ZEROS = ord("0") * sum(_ISBN_WEIGHTS)  # the digits' ASCII offset in the dot product


def _b_code(raw: int) -> str:
    """A ``B0`` + 8 base-36 characters asin, distinct for every ``raw`` below 36**8."""
    x = (raw * _B_MULT + 1_234_567) % _B_SPACE
    high, low = divmod(x, 46656)
    top, mid = divmod(high, 46656)
    return "B0" + _B36_2[top] + _B36_3[mid] + _B36_3[low]


def asin_for(index: int) -> str:
    """The asin of product ``index``: ~20% ISBN-10 like ``0000013714``, else ``B0...`` codes.

    Independent of seed and format, so files generated separately share their asins.
    """
    if index % 5 == 2:
        digits = f"{(index * _ISBN_MULT + 13_714) % 1_000_000_000:09d}"
        total = sum(map(operator.mul, _ISBN_WEIGHTS, digits.encode())) - _ISBN_ZEROS
        check = (11 - total % 11) % 11
        return digits + ("X" if check == 10 else str(check))
    return _b_code(index)


def child_asin_for(index: int, variant: int) -> str:
    """A 2023 variant asin of product ``index``; never equal to any ``asin_for`` value."""
    return _b_code(_B_SPACE // 2 + index * 8 + variant)


class _IdMaker:
    """Distinct random-looking ids for numbers below 2**36, from three lookup tables.

    A bijective mix of the number picks one entry from each table; entries are distinct
    within a table, so different numbers give different ids. Much faster than hashing.
    """

    def __init__(self, seed: int, tag: str, alphabet: str, widths: tuple, prefix: str):
        rng = random.Random(seed ^ zlib.crc32(tag.encode()))
        self.prefix = prefix
        self.tables = []
        for width in widths:
            seen: dict = {}
            while len(seen) < 4096:
                seen["".join(rng.choices(alphabet, k=width))] = None
            self.tables.append(tuple(seen))

    def __call__(self, number: int) -> str:
        n = (number * 0x9E3779B97 + 0x7F4A7C15) & 0xFFFFFFFFF
        n ^= n >> 18
        a, b, c = self.tables
        return self.prefix + a[n & 4095] + b[(n >> 12) & 4095] + c[n >> 24]

    def reviewer_id(self, number: int) -> str:
        """A 2014/2018 reviewer id like ``A2SUAM1J3GNN3B``: 13 or 14 characters."""
        if number & 1:
            return self(number) + _B36[(number >> 1) % 36]
        return self(number)

    def user_id(self, number: int) -> str:
        """A 2023 user id like ``AGKHLEW2SOWHNMFQIJGBECAF7INQ``: 28 characters."""
        return self(number) + ("A" if number % 5 == 0 else "Q")


def _image_id(rng: random.Random) -> str:
    """An Amazon image id like ``51fAmVkTbyL`` (the part before the size suffix)."""
    chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return rng.choice("345678") + rng.choice("123456789") + "".join(rng.choices(chars, k=8)) + "L"


# --- vocabulary --------------------------------------------------------------------------

EMOTIONS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")

# rating -> (emotions, weights): joy for 5 stars, anger/disgust/sadness for 1-2, and a
# minority of fear, surprise and neutral texts.
_EMOTION_FOR_RATING = {
    5: (("joy", "surprise", "neutral", "fear"), (86, 7, 5, 2)),
    4: (("joy", "neutral", "surprise", "fear", "sadness"), (66, 18, 10, 3, 3)),
    3: (("neutral", "sadness", "surprise", "fear", "joy"), (48, 17, 14, 12, 9)),
    2: (("sadness", "disgust", "anger", "fear", "neutral"), (36, 24, 24, 10, 6)),
    1: (("anger", "disgust", "sadness", "fear"), (42, 28, 22, 8)),
}
_RATING_WEIGHTS = {5: 58, 4: 20, 3: 9, 2: 5, 1: 8}  # Amazon's J-shaped rating histogram
_RATING_EMOTION = tuple(
    (rating, emotion)
    for rating, share in _RATING_WEIGHTS.items()
    for emotion, weight in zip(*_EMOTION_FOR_RATING[rating])
    for _ in range(share * weight)
)

_DOMAINS: dict = {
    "instruments": dict(
        nouns=["guitar strings", "capo", "clip-on tuner", "guitar strap", "overdrive pedal",
               "instrument cable", "microphone", "pair of drumsticks", "ukulele",
               "keyboard stand", "pack of picks", "harmonica", "metronome", "pop filter",
               "mic stand", "string winder", "bass strings", "practice pad"],
        aspects=["tone", "sound", "build quality", "tuning stability", "finish", "jack",
                 "volume", "grip", "clamp", "spring", "cable", "knob", "display"],
        brands=["Fender", "Ernie Ball", "D'Addario", "Snark", "Dunlop", "Shure", "Hohner",
                "Yamaha", "Boss", "Kyser", "Planet Waves", "Vic Firth", "Behringer"],
        uses=["practicing scales", "gigging on weekends", "recording demos at home",
              "church on Sundays", "teaching my students", "jamming with friends"],
        extras=["a gig bag", "spare batteries", "a cleaning cloth", "two extra picks"],
        paths=[["Musical Instruments", "Instrument Accessories", "Guitar & Bass Accessories",
                "Strings"],
               ["Musical Instruments", "Instrument Accessories", "Guitar & Bass Accessories",
                "Tuners"],
               ["Musical Instruments", "Microphones & Accessories", "Microphones"],
               ["Musical Instruments", "Drums & Percussion", "Drum Set Accessories"],
               ["Musical Instruments", "Amplifiers & Effects", "Guitar Effects",
                "Overdrive & Distortion"]],
        rank_cat="Musical Instruments",
        main_cat="Musical Instruments",
        style=[("Style:", [" Regular Slinky", " Light", " Medium", " Heavy"]),
               ("Color:", [" Black", " Natural", " Sunburst", " Red"])],
    ),
    "beauty": dict(
        nouns=["shampoo", "conditioner", "face cream", "nail polish", "perfume", "hair spray",
               "lipstick", "serum", "body lotion", "makeup brush set", "eyeliner",
               "dry shampoo", "sunscreen", "face mask", "hair oil", "cleanser"],
        aspects=["scent", "texture", "smell", "consistency", "color", "packaging", "pump",
                 "lather", "finish", "coverage", "formula", "bottle", "applicator"],
        brands=["L'Oreal", "Olay", "Neutrogena", "Maybelline", "Revlon", "CeraVe",
                "Burt's Bees", "Aveeno", "Garnier", "Dove", "Pantene", "OGX", "Yes To"],
        uses=["my morning routine", "dry winter skin", "curly hair", "travel",
              "sensitive skin", "date nights", "the gym bag"],
        extras=["a travel size", "a sample packet", "a little pouch", "a spare pump"],
        paths=[["Beauty", "Hair Care", "Shampoos"],
               ["Beauty", "Skin Care", "Face", "Creams & Moisturizers"],
               ["Beauty", "Makeup", "Nails", "Nail Polish"],
               ["Beauty", "Fragrance", "Women's", "Eau de Parfum"],
               ["Beauty", "Tools & Accessories", "Makeup Brushes & Tools"]],
        rank_cat="Beauty",
        main_cat="All Beauty",
        style=[("Size:", [" 3.4 oz", " 8 Fl Oz (Pack of 2)", " 1 Count", " 16.9 Ounce"]),
               ("Scent Name:", [" Lavender", " Unscented", " Coconut", " Citrus"]),
               ("Color:", [" Nude", " Ruby Red", " Clear", " Deep Brown"])],
    ),
    "giftcards": dict(
        nouns=["gift card", "e-gift card", "gift card in a box", "greeting card gift card",
               "restaurant gift card", "gift card holder", "prepaid card"],
        aspects=["design", "balance", "redemption code", "packaging", "envelope",
                 "activation", "card stock", "message"],
        brands=["Amazon", "Starbucks", "Maggiano's", "Target", "iTunes", "Visa",
                "Cheesecake Factory", "Sephora", "Lobster Gram", "Serendipity 3"],
        uses=["a birthday present", "my nephew's graduation", "a teacher gift",
              "the office gift exchange", "a last minute gift", "Mother's Day"],
        extras=["a greeting card", "a gift box", "a ribbon", "a printed receipt"],
        paths=[["Gift Cards Store", "Gift Cards", "Restaurants"],
               ["Gift Cards Store", "Gift Cards", "Retailers"],
               ["Gift Cards", "Gift Cards"],
               ["Gift Cards Store", "Gift Card Accessories"]],
        rank_cat="Gift Cards",
        main_cat="Gift Cards",
        style=[("Gift Amount:", [" 25", " 50", " 100", " 10"]),
               ("Design:", [" Happy Birthday", " Thank You", " Congrats", " Holiday"]),
               ("Format:", [" Email", " Gift Box", " Print at Home"])],
    ),
    "books": dict(
        nouns=["book", "novel", "hymnal", "cookbook", "paperback", "songbook", "workbook",
               "hardcover edition", "guide", "anthology"],
        aspects=["story", "binding", "print", "writing", "illustrations", "ending", "index",
                 "characters", "layout", "font size"],
        brands=["Penguin", "HarperCollins", "Random House", "Dover", "Hal Leonard",
                "Scholastic", "Simon & Schuster", "O'Reilly"],
        uses=["reading before bed", "my book club", "choir practice", "homeschool",
              "the long flight", "my bible study group"],
        extras=["a bookmark", "a dust jacket", "a CD", "an answer key"],
        paths=[["Books", "Arts & Photography", "Music", "Songbooks"],
               ["Books", "Literature & Fiction", "Genre Fiction"],
               ["Books", "Cookbooks, Food & Wine", "Baking"],
               ["Books", "Christian Books & Bibles", "Worship & Devotion", "Hymns"]],
        rank_cat="Books",
        main_cat="Books",
        style=[("Format:", [" Paperback", " Hardcover", " Kindle Edition", " Spiral-bound"])],
    ),
    "electronics": dict(
        nouns=["pair of headphones", "phone charger", "phone case", "USB cable",
               "bluetooth speaker", "remote", "power bank", "HDMI cable", "mouse", "keyboard",
               "webcam", "memory card"],
        aspects=["battery life", "sound", "connection", "buttons", "build quality",
                 "charging speed", "range", "cord", "plug", "microphone", "fit"],
        brands=["Anker", "Sony", "JBL", "Belkin", "Logitech", "SanDisk", "AmazonBasics",
                "Samsung", "TaoTronics", "Mpow"],
        uses=["my daily commute", "video calls", "the home office", "road trips",
              "working out", "the kids' tablet"],
        extras=["a carrying pouch", "a USB-C adapter", "a short cable", "a manual"],
        paths=[["Electronics", "Accessories & Supplies", "Audio & Video Accessories",
                "Cables"],
               ["Electronics", "Headphones"],
               ["Cell Phones & Accessories", "Accessories", "Chargers"],
               ["Electronics", "Computers & Accessories", "Memory Cards"]],
        rank_cat="Electronics",
        main_cat="All Electronics",
        style=[("Size Name:", [" 6 ft", " 10 ft", " 3-Pack"]),
               ("Style:", [" Wireless", " Wired", " Pro"]),
               ("Color:", [" Black", " White", " Space Gray"])],
    ),
    "kitchen": dict(
        nouns=["knife set", "blender", "coffee grinder", "spatula", "water bottle",
               "cutting board", "frying pan", "measuring cups", "tea kettle",
               "food storage set", "can opener", "whisk"],
        aspects=["handle", "blade", "lid", "coating", "motor", "seal", "base",
                 "temperature control", "dishwasher safety", "weight"],
        brands=["OXO", "Cuisinart", "KitchenAid", "Lodge", "Pyrex", "Hamilton Beach",
                "Rubbermaid", "Hydro Flask", "Ninja"],
        uses=["meal prep on Sundays", "my morning coffee", "baking with the kids",
              "camping trips", "weeknight dinners", "holiday cooking"],
        extras=["a recipe booklet", "a storage case", "replacement seals", "a cleaning brush"],
        paths=[["Home & Kitchen", "Kitchen & Dining", "Cutlery & Knife Accessories"],
               ["Home & Kitchen", "Kitchen & Dining", "Small Appliances", "Blenders"],
               ["Home & Kitchen", "Kitchen & Dining", "Cookware", "Skillets"]],
        rank_cat="Kitchen & Dining",
        main_cat="Amazon Home",
        style=[("Style Name:", [" 8-Inch", " 12-Inch", " Set of 3"]),
               ("Color:", [" Stainless Steel", " Red", " Black"])],
    ),
    "fashion": dict(
        nouns=["shirt", "pair of sneakers", "dress", "watch", "backpack", "pair of socks",
               "jacket", "hoodie", "pair of jeans", "belt", "scarf", "sun hat"],
        aspects=["fit", "fabric", "stitching", "color", "zipper", "sizing", "sole",
                 "waistband", "strap", "buckle", "lining"],
        brands=["Hanes", "Levi's", "Carhartt", "Nike", "Columbia", "Fruit of the Loom",
                "Casio", "JanSport", "Champion", "Amazon Essentials"],
        uses=["work", "the gym", "school", "hiking", "everyday wear", "a wedding"],
        extras=["spare buttons", "a dust bag", "an extra strap", "a gift box"],
        paths=[["Clothing, Shoes & Jewelry", "Men", "Clothing", "Shirts"],
               ["Clothing, Shoes & Jewelry", "Women", "Shoes", "Fashion Sneakers"],
               ["Clothing, Shoes & Jewelry", "Men", "Watches", "Wrist Watches"]],
        rank_cat="Clothing",
        main_cat="AMAZON FASHION",
        style=[("Size:", [" Large", " Big Boys", " X-Small", " 10.5", " Medium"]),
               ("Color:", [" Charcoal", " Blue/Orange", " Heather Grey", " Navy"])],
    ),
}  # fmt: skip
_DOMAIN_NAMES = tuple(_DOMAINS)

_WHO = [
    "my wife",
    "my husband",
    "my son",
    "my daughter",
    "my mom",
    "my dad",
    "my sister",
    "my brother",
    "my roommate",
    "my best friend",
    "my grandson",
    "my girlfriend",
    "my boyfriend",
    "my coworker",
    "my neighbor",
]
_SPAN = [
    "two weeks",
    "a month",
    "three days",
    "six months",
    "a year",
    "two uses",
    "a week",
    "ten days",
    "three months",
    "one afternoon",
]
_COLORS = ["black", "white", "navy blue", "bright red", "pale pink", "forest green", "silver"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_FREQ = ["every day", "twice a week", "on weekends", "a few times a month", "most mornings"]

_TEMPLATES = {
    "joy": [
        "I absolutely love this {p}!",
        "This {p} made me so happy, the {a} is wonderful.",
        "Best purchase I have made in {t}, I am thrilled with it.",
        "{W} was delighted when we opened it.",
        "What a joy to use, I reach for it {f}.",
        "The {a} is fantastic and it puts a smile on my face every time.",
        "I'm so glad I bought this {p}, it exceeded every expectation.",
        "Highly recommend, this {b} {p} is a real gem.",
        "It works beautifully and I could not be happier.",
        "Five stars without hesitation, I love it so much.",
        "Such a pleasure, the {a} feels amazing.",
        "I am over the moon with this {p}!",
        "{W} loves it and so do I.",
        "Great value and a great {a}, I'm very pleased.",
        "It arrived quickly and honestly made my whole week better.",
        "Honestly one of my favorite things I own now.",
        "I was grinning the whole time I tried it out.",
        "Wonderful quality, I'm going to buy {n} more as gifts.",
        "This brings me so much joy, thank you {b}!",
        "Perfect in every way, the {a} is just lovely.",
        "I love love love this {p}, it is perfect for {u}.",
        "So happy with the {a}, it is exactly what I hoped for.",
        "Delightful little {p}, it makes {u} fun again.",
        "I'm thrilled, this is the best {p} I have ever owned.",
        "We are all so happy with it, what a great find.",
    ],
    "anger": [
        "I am furious, the {p} broke after {t}.",
        "Absolutely unacceptable, the {a} failed on day one.",
        "This is a ripoff and {b} should be ashamed of themselves.",
        "I'm so angry I wasted my money on this {p}.",
        "Customer service ignored me {n} times, which is outrageous.",
        "Do not buy this garbage, it infuriates me.",
        "I am livid that they sold this as new when it was clearly used.",
        "What a scam, the {a} is nothing like the listing.",
        "I demanded a refund and they refused, ridiculous!",
        "Worst {p} ever, I want my money back now.",
        "It stopped working and nobody will take responsibility, I'm fuming.",
        "Seriously, how can {b} get away with selling this junk?",
        "I'm sick and tired of sellers who lie about the {a}.",
        "This made me so mad I threw it in the trash.",
        "Outrageous, the {a} snapped the first time I used it for {u}.",
        "I am beyond annoyed, this {p} is a total rip off.",
        "How dare they charge this much for such a pathetic {a}!",
        "I'm angry at myself for trusting the fake reviews.",
    ],
    "disgust": [
        "The {a} is disgusting and smells like cheap chemicals.",
        "It arrived dirty, with hair stuck to the {p}, gross.",
        "Absolutely revolting, I could not even touch it.",
        "The {p} had a nasty sticky residue all over it.",
        "It smelled like mold when I opened the box, yuck.",
        "Cheap, flimsy and frankly repulsive {a}.",
        "I felt sick just looking at the stains on it.",
        "The {a} is slimy and vile.",
        "Whoever approved this {a} should be embarrassed, it is nasty.",
        "It was covered in greasy fingerprints and dust, disgusting.",
        "Gross, the {p} looked like someone had already used it.",
        "The smell is so foul that {w} made me take it outside.",
        "Ew, there were bugs in the packaging.",
        "Nauseating {a}, I could not stand being near it.",
    ],
    "sadness": [
        "I am so disappointed, I really wanted to love this {p}.",
        "Sadly the {a} gave out after {t}.",
        "It was supposed to be a gift for {w}, and now I have nothing to give.",
        "I feel let down, the {a} is not what I hoped for.",
        "Unfortunately it broke and I miss my old {p}.",
        "It's heartbreaking to waste money when things are this tight.",
        "I was looking forward to this for weeks and it's such a letdown.",
        "{W} was upset and cried when it stopped working.",
        "I regret buying it, what a shame.",
        "What a sad end to a {p} that started out fine.",
        "I'm really bummed, the {a} faded after {t}.",
        "It makes me sad because the old version was so good.",
        "Sadly I have to return it, I had high hopes for {u}.",
        "Such a disappointment, I feel like I threw my money away.",
    ],
    "fear": [
        "I'm worried the {p} might overheat, it gets alarmingly hot.",
        "The {a} made me nervous, it looked like it could snap at any moment.",
        "I'm scared to let {w} use it after the sparks I saw.",
        "It felt unsafe and I was afraid it would start a fire.",
        "I am anxious about the chemicals in the {a}.",
        "Be careful, the edge is sharp and I was terrified of getting cut.",
        "I'm concerned this {p} is a counterfeit, which frightens me.",
        "The burning smell made me panic that something was on fire.",
        "I worry it will fail right when I need it most.",
        "Honestly it's a little scary how fast the {a} wore down.",
        "I was afraid to open it after reading about the recall.",
        "My skin reacted and now I'm frightened to try anything from {b}.",
        "It wobbles so much that I'm nervous it will fall on {w}.",
    ],
    "surprise": [
        "Wow, I did not expect the {a} to be this good!",
        "I was shocked at how small the {p} actually is.",
        "Surprisingly, it works better than my expensive {b} one.",
        "To my amazement it arrived a week early.",
        "I can't believe how light the {p} is!",
        "Whoa, the {a} totally caught me off guard.",
        "Unexpectedly it came with {n} extra pieces.",
        "I was astonished that something this cheap works so well.",
        "Never saw that coming, the {a} changes color in the sun.",
        "Much bigger than I thought, what a surprise!",
        "I was stunned by how quickly it worked for {u}.",
        "Who knew a {p} could be this much fun?",
    ],
    "neutral": [
        "It is a {p}, and it does what it says.",
        "The {a} is average, nothing special.",
        "It arrived on {d} in standard packaging.",
        "I have used it for {t} so far.",
        "It is about the size I expected.",
        "The {p} comes in a box with instructions.",
        "It is okay for the price.",
        "Works as described, no more and no less.",
        "I bought it to replace an older {p}.",
        "The color is {c}, as shown in the picture.",
        "It is a standard {p} from {b}.",
        "The {a} is fine for {u}.",
        "Not bad, not great, it is an ordinary {p}.",
    ],
}
_DESCRIPTIVE = [
    "I use it mostly for {u}.",
    "It comes with {x}.",
    "I bought the {c} one.",
    "I compared it with a {b} {p} before ordering.",
    "Shipping took {n} days.",
    "The instructions are printed on the back of the box.",
    "I have had it for {t} now.",
    "For reference, I use it {f}.",
    "I ordered it on a {d} and it came in a padded envelope.",
    "The {a} is pretty much what the photos show.",
    "I have owned {n} of these over the years.",
    "{W} uses one too.",
    "The box says it is made by {b}.",
    "I usually buy the {b} version of this {p}.",
]
_PRODUCT_SENTENCES = [
    "This {p} from {b} is made for {u}.",
    "The {a} is designed to last for years.",
    "Includes {x}.",
    "Available in {c} and several other colors.",
    "Perfect for {u}.",
    "Easy to clean and easy to store.",
    "Satisfaction guaranteed or your money back.",
    "Our {a} has been tested by professionals.",
    "Measures about {n} inches across.",
    "Please allow {n} business days for delivery.",
    "{b} has been trusted by customers for decades.",
    "A great gift for {w}.",
    "Statements regarding dietary supplements have not been evaluated by the FDA and are "
    "not intended to diagnose, treat, cure, or prevent any disease or health condition.",
    "Not valid for online purchases.",
    "Ships in a sealed envelope.",
    "Premium {a} at an everyday price.",
]
_SUMMARIES = {
    "joy": ["Love it!", "Five stars, would buy again", "Perfect!", "So happy with this",
            "Great product", "Absolutely love it", "Exactly what I wanted", "Wonderful",
            "Best purchase ever", "Delighted", "Highly recommended!", "A real gem"],
    "anger": ["Total ripoff", "DO NOT BUY", "Scam", "Furious", "Worst purchase ever",
              "Broke immediately", "Unacceptable", "Junk", "Want my money back"],
    "disgust": ["Gross", "Disgusting", "Smells awful", "Arrived dirty", "Yuck", "Nasty",
                "Revolting quality"],
    "sadness": ["Disappointed", "So sad", "Let down", "Such a shame", "Wanted to love it",
                "Not what I hoped", "Sadly returning it"],
    "fear": ["Be careful", "Safety concern", "Worried about this", "Scary", "Fire hazard?",
             "Not safe for kids"],
    "surprise": ["Wow!", "Surprisingly good", "Not what I expected", "Pleasant surprise",
                 "Unexpected", "Who knew?"],
    "neutral": ["OK", "It's fine", "Does the job", "As described", "Average", "Meh", "Works",
                "Decent for the price"],
}  # fmt: skip
_STAR_SUMMARY = {5: "Five Stars", 4: "Four Stars", 3: "Three Stars", 2: "Two Stars", 1: "One Star"}

_FIRST_NAMES = [
    "Mary",
    "John",
    "Linda",
    "James",
    "Patricia",
    "Robert",
    "Jennifer",
    "Michael",
    "Susan",
    "David",
    "Karen",
    "William",
    "Nancy",
    "Richard",
    "Lisa",
    "Thomas",
    "Sandra",
    "Chris",
    "Ashley",
    "Kevin",
    "Amaranth",
    "Bobbi",
    "Abbey",
    "Dale",
]
_LAST_NAMES = [
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Miller",
    "Davis",
    "Garcia",
    "Wilson",
    "Anderson",
    "Taylor",
    "McDonald",
    "O'Brien",
    "Lee",
    "Walker",
    "Young",
]
_NICKNAMES = [
    "music fan",
    "Book Lover",
    "guitar guy",
    "beauty junkie",
    "Happy Shopper",
    "busy mom",
    "gadget geek",
    "home cook",
    "Yeah, well, that's just like, your opinion, man",
]

_TITLE_ADJ = [
    "Professional",
    "Classic",
    "Premium",
    "Deluxe",
    "Compact",
    "Original",
    "Ultra",
    "Heavy Duty",
    "Natural",
    "Advanced",
    "Everyday",
    "Travel",
    "Vintage",
    "Essential",
]
_TITLE_SUFFIX = [
    "",
    "",
    ", Black",
    " (Pack of 2)",
    ", 8-Ounce",
    " - 12 Count",
    ", Large",
    " (Old Version)",
    ", 3.4 Fl Oz",
    " 10-46",
    ", Set of 3",
    " with Case",
]
_NON_ASCII = ["\u2019", "\uff0c", "\u00e9", "\u2122", "\u00ae", "\u2013", "\u00bd", "\u00b0"]

_MAGAZINE_DEBRIS = '<span class="a-size-medium a-color-secondary"'
_FASHION_IMG = (
    '<img src="https://images-na.ssl-images-amazon.com/images/G/01/nav2/images/gui/'
    'amazon-fashion-store-new._CB520838675_.png" class="nav-categ-image" alt="AMAZON FASHION"/>'
)
CSS_PRICE = (
    ".a-box-inner{background-color:#fff}#alohaBuyBoxWidget .selected{background-color:#fffbf3;"
    "border-color:#e77600;box-shadow:0 0 3px rgba(228,121,17,.5)}#alohaBuyBoxWidget "
    ".contract-not-available{color:gray}#aloha-cart-popover .aloha-cart{height:auto;"
    "overflow:hidden}#aloha-cart-popover #aloha-cartInfo{float:left}"
)
_WHITESPACE_PRICE = "\n\t\t\t\t\t\t\t\t\t\t\t\t\t\t\n\r\n\r\n"
_SCRIPT_PRICE = '\n\n\n<script type="text/javascript">\nvar ue_t0=ue_t0||+new Date();\n</script>\n'


def _fill(template: str, rng: random.Random, domain: dict) -> str:
    """One sentence from a template, its slots filled from the domain's words."""
    who = rng.choice(_WHO)
    text = template.format(
        p=rng.choice(domain["nouns"]),
        a=rng.choice(domain["aspects"]),
        b=rng.choice(domain["brands"]),
        u=rng.choice(domain["uses"]),
        x=rng.choice(domain["extras"]),
        w=who,
        W=who[0].upper() + who[1:],
        t=rng.choice(_SPAN),
        n=rng.randint(2, 9),
        c=rng.choice(_COLORS),
        d=rng.choice(_DAYS),
        f=rng.choice(_FREQ),
    )
    return text[0].upper() + text[1:]


class _TextPool:
    """Pre-built sentences per (domain, emotion): a review then costs one ``choices`` call.

    Body entries carry their separator in front (a space; two spaces after a period in
    2014; a newline in 2018; ``<br />`` in 2023), so joining them needs no more work.
    """

    SIZE = 240

    def __init__(self, rng: random.Random, fmt: int):
        seps, weights = {
            2014: ((" ", "  ", "\n"), (86, 13, 1)),
            2018: ((" ", "\n", "\n\n", "  "), (92, 3, 3, 2)),
            2023: ((" ", "<br />", "<br /><br />", "  "), (93, 2, 3, 2)),
        }[fmt]
        self.openers: dict = {}
        self.bodies: dict = {}
        self.mean_len: dict = {}
        for name in _DOMAIN_NAMES:
            domain = _DOMAINS[name]
            descriptive = [_fill(rng.choice(_DESCRIPTIVE), rng, domain) for _ in range(120)]
            for emotion in EMOTIONS:
                templates = _TEMPLATES[emotion]
                key = (name, emotion)
                self.openers[key] = [_fill(rng.choice(templates), rng, domain) for _ in range(120)]
                share = 0.5 if emotion == "neutral" else 0.68
                body = []
                for _ in range(self.SIZE):
                    if rng.random() < share:
                        sentence = _fill(rng.choice(templates), rng, domain)
                    else:
                        sentence = rng.choice(descriptive)
                    body.append(rng.choices(seps, weights)[0] + sentence)
                self.bodies[key] = body
                self.mean_len[key] = sum(map(len, body)) / len(body)


class _ProductPool:
    """Pre-built product-description sentences and feature bullets per domain."""

    def __init__(self, rng: random.Random):
        self.sentences = {}
        self.features = {}
        for name in _DOMAIN_NAMES:
            domain = _DOMAINS[name]
            self.sentences[name] = [
                _fill(rng.choice(_PRODUCT_SENTENCES), rng, domain) for _ in range(160)
            ]
            self.features[name] = [
                _fill(rng.choice(_PRODUCT_SENTENCES[:12]), rng, domain).rstrip(".")
                for _ in range(60)
            ]


class _Days:
    """Review days in a date range, with their ``"MM D, YYYY"`` text, recent days likelier."""

    def __init__(self, first: datetime.date, last: datetime.date):
        self.first = (first - datetime.date(1970, 1, 1)).days
        self.span = (last - first).days + 1
        self.text = []
        for k in range(self.span):
            day = first + datetime.timedelta(days=k)
            self.text.append(f"{day.month:02d} {day.day}, {day.year}")


_DAY_TABLES: dict = {}


def _days(fmt: int) -> _Days:
    """The review-day table of a generation (built once per process)."""
    if fmt not in _DAY_TABLES:
        first = datetime.date(1999, 1, 1) if fmt == 2014 else datetime.date(2001, 1, 1)
        last = datetime.date(2014, 7, 23) if fmt == 2014 else datetime.date(2018, 10, 2)
        _DAY_TABLES[fmt] = _Days(first, last)
    return _DAY_TABLES[fmt]


# --- per-file state ----------------------------------------------------------------------


class _Context:
    """Per-file generator state: the rng, the text pools, and the id spaces in use."""

    def __init__(self, kind: str, fmt: int, count: int, seed: int):
        self.kind = kind
        self.fmt = fmt
        self.seed = seed
        self.rng = random.Random(seed ^ zlib.crc32(f"termidator/{kind}/{fmt}".encode()))
        self.random = self.rng.random
        self.products = max(count // 5, 1) if kind == "reviews" else max(count, 1)
        self.reviewers = max(count // 3, 1)
        self.asin_cache: dict = {}
        if kind == "reviews":
            self.pool = _TextPool(self.rng, fmt)
            if fmt == 2023:
                self.ids = _IdMaker(
                    seed, "user", "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", (9, 9, 8), "A"
                )
            else:
                self.ids = _IdMaker(seed, "reviewer", _B36, (4, 4, 4), "A")
        else:
            self.product_pool = _ProductPool(self.rng)
        # lognormal(mu, sigma): mean exp(mu + sigma**2 / 2) ~ 500 characters, long tail.
        self.mu, self.sigma = 5.6, 1.12

    @staticmethod
    def domain_of(index: int) -> str:
        """The product domain of product ``index`` (the same in every file)."""
        return _DOMAIN_NAMES[((index * 2_654_435_761) >> 7) % 7]

    def product_index(self) -> int:
        """A product for a review: a few products get most reviews, as in real files."""
        return int(self.products * self.random() ** 1.6)

    def reviewer(self) -> int:
        """A reviewer number; some reviewers write many reviews."""
        return int(self.reviewers * self.random() ** 1.3)

    def review_text(self, domain: str, emotion: str) -> str:
        """A review text of lognormal length (mean ~500, tail to 15,000 characters)."""
        rng = self.rng
        key = (domain, emotion)
        pool = self.pool
        target = rng.lognormvariate(self.mu, self.sigma)
        openers = pool.openers[key]
        text = openers[int(self.random() * len(openers))]
        extra = int((target - len(text)) / pool.mean_len[key] + self.random())
        if extra > 0:
            parts = rng.choices(pool.bodies[key], k=extra)
            parts[0] = text + parts[0]
            text = "".join(parts)
            if len(text) > MAX_TEXT_CHARS:
                text = text[: text.rfind(" ", 0, MAX_TEXT_CHARS)]
        return text

    def sprinkle(self, text: str, rate: float) -> str:
        """Give some texts one real-world quirk: entities, markup, tabs, odd characters."""
        rng = self.rng
        if self.random() >= rate or not text:
            return text
        if self.random() < 0.003:  # FORMATS.md: a 2014 review line holds a \u0003 escape
            cut = rng.randrange(len(text) + 1)
            return text[:cut] + "\u0003" + text[cut:]
        pick = rng.randrange(7)
        if self.fmt == 2014:
            if pick == 0:
                return text.replace(" the ", " &quot;the&quot; ", 1)
            if pick == 1:
                return text + " I&#39;d call it &quot;" + rng.choice(_SUMMARIES["joy"]) + "&quot;."
            if pick == 2:
                return text.replace(" and ", " &amp; ", 2)
            if pick == 3:
                return text + " Gracias, se&ntilde;or."
            if pick == 4:
                return text.replace(". ", ".\t", 1)
            if pick == 5:
                return text.replace(" it ", " &#34;it&#34; ", 1)
            return text.replace("'", "\u2019")
        if self.fmt == 2018:
            if pick == 0:
                return text.replace(". ", ".&nbsp;", 2)
            if pick == 1:
                return text.replace("'", "&#39;")
            if pick == 2:
                asin = asin_for(self.product_index())
                return (
                    f'<a data-hook="product-link-linked" class="a-link-normal" href="/dp/{asin}'
                    f'/ref=cm_cr_arp_d_rvw_txt?ie=UTF8">{rng.choice(_TITLE_ADJ)} one</a> ' + text
                )
            if pick == 3:
                video = f"R{rng.getrandbits(48):X}"
                return (
                    f'<div id="video-block-{video}" class="a-section a-spacing-small '
                    'a-spacing-top-mini video-block"></div><input type="hidden" name="" '
                    'value="https://images-na.ssl-images-amazon.com/images/I/'
                    f'{_image_id(rng)}.mp4" class="video-url">&nbsp;' + text
                )
            if pick == 4:
                return text + " Caf&eacute; quality for sure."
            if pick == 5:
                return text.replace("'", "\u2019")
            return text.replace(". ", ".\t", 1)
        if pick < 2:
            return text.replace("'", "\u2019")
        if pick < 4:
            return text.replace(". ", ".<br />", 1)
        if pick == 4:
            return text + " 10/10 \u2764\ufe0f"
        if pick == 5:
            return text.replace(" and ", " &amp; ", 1)
        return text + " Made in Cura\u00e7ao, apparently."

    def summary(self, rating: int, emotion: str, star_rate: float = 0.0) -> str:
        """A headline in the review's emotion (2018 often has Amazon's ``"Five Stars"``)."""
        if star_rate and self.random() < star_rate:
            return _STAR_SUMMARY[rating]
        options = _SUMMARIES[emotion]
        return options[int(self.random() * len(options))]

    def reviewer_name(self, number: int) -> str:
        """A reviewer's display name: plain, with a quoted nickname, or cut with ``...``."""
        mix = (number * 2_246_822_519 + self.seed) & 0xFFFFFFFF
        first = _FIRST_NAMES[mix % 24]
        last = _LAST_NAMES[(mix >> 8) % 16]
        style = (mix >> 16) % 100
        if style < 45:
            return f"{first} {last}"
        if style < 60:
            return f"{first[0]}. {last}"
        if style < 70 and self.fmt == 2018:
            return "Amazon Customer"
        nickname = _NICKNAMES[(mix >> 24) % len(_NICKNAMES)]
        if style < 80:
            return f'{first} "{nickname}"'
        if style < 86:
            name = f'{first} {last} "{nickname}"'
            return name[:27] + "..." if len(name) > 30 else name
        return first.lower() + str(mix % 1000)


# --- reviews -------------------------------------------------------------------------


def _reviews_2014(ctx: _Context) -> Iterator[str]:
    """2014 reviews: strict JSON, fixed key order, ``unixReviewTime`` at midnight UTC.

    Lines are assembled directly (ids and dates need no escaping; text goes through
    json's C string encoder): byte-identical to ``json.dumps`` and several times faster.
    """
    rng, rnd, enc = ctx.rng, ctx.random, _encode_str
    days = _days(2014)
    first, span, day_text = days.first, days.span, days.text
    pairs = _RATING_EMOTION
    while True:
        index = ctx.product_index()
        reviewer = ctx.reviewer()
        rating, emotion = pairs[int(rnd() * len(pairs))]
        text = ctx.sprinkle(ctx.review_text(ctx.domain_of(index), emotion), 0.07)
        if rnd() < 0.0004:
            text = ""
        if rnd() < 0.55:
            helpful = "[0, 0]"
        else:
            total = min(int(rng.paretovariate(1.3)), 291)
            helpful = f"[{int(total * rnd() ** 0.6 + 0.5)}, {total}]"
        day = span - 1 - int(span * rnd() ** 1.7)
        name = "" if rnd() < 0.003 else f'"reviewerName": {enc(ctx.reviewer_name(reviewer))}, '
        yield (
            f'{{"reviewerID": "{ctx.ids.reviewer_id(reviewer)}", "asin": "{asin_for(index)}", '
            f'{name}"helpful": {helpful}, "reviewText": {enc(text)}, "overall": {rating}.0, '
            f'"summary": {enc(ctx.summary(rating, emotion))}, '
            f'"unixReviewTime": {(first + day) * 86400}, "reviewTime": "{day_text[day]}"}}'
        )


_ORDERS_2018 = _table(
    (
        ("overall", "vote", "verified", "reviewTime", "reviewerID", "asin", "style",
         "reviewerName", "reviewText", "summary", "unixReviewTime", "image"),
        ("overall", "verified", "reviewTime", "reviewerID", "asin", "style", "reviewerName",
         "reviewText", "summary", "unixReviewTime", "vote", "image"),
        ("image", "overall", "vote", "verified", "reviewTime", "reviewerID", "asin", "style",
         "reviewerName", "reviewText", "summary", "unixReviewTime"),
        ("reviewerID", "asin", "reviewerName", "verified", "reviewText", "overall", "summary",
         "unixReviewTime", "reviewTime", "vote", "style", "image"),
        ("overall", "verified", "reviewTime", "reviewerID", "asin", "reviewerName",
         "reviewText", "summary", "unixReviewTime", "style", "vote", "image"),
        ("verified", "overall", "reviewerID", "asin", "style", "reviewerName", "summary",
         "reviewText", "reviewTime", "unixReviewTime", "vote", "image"),
        ("overall", "vote", "verified", "reviewerID", "asin", "reviewerName", "reviewText",
         "summary", "reviewTime", "unixReviewTime", "style", "image"),
        ("reviewTime", "overall", "verified", "reviewerID", "asin", "style", "reviewerName",
         "reviewText", "summary", "unixReviewTime", "vote", "image"),
        ("asin", "reviewerID", "overall", "verified", "reviewTime", "reviewerName", "style",
         "reviewText", "summary", "unixReviewTime", "image", "vote"),
    ),
    (40, 20, 8, 8, 8, 5, 5, 3, 3),
)  # fmt: skip


def _reviews_2018(ctx: _Context) -> Iterator[str]:
    """2018 reviews: JSON in several key orders, ``vote`` as a string, ``style`` quirks.

    Each field is encoded once as ``"key": value`` and the line joins them in the
    order drawn for it: byte-identical to ``json.dumps`` of the same dict.
    """
    rng, rnd, enc = ctx.rng, ctx.random, _encode_str
    days = _days(2018)
    first, span, day_text = days.first, days.span, days.text
    pairs, orders = _RATING_EMOTION, _ORDERS_2018
    while True:
        index = ctx.product_index()
        domain = ctx.domain_of(index)
        reviewer = ctx.reviewer()
        rating, emotion = pairs[int(rnd() * len(pairs))]
        day = span - 1 - int(span * rnd() ** 1.7)
        fields = {
            "overall": f'"overall": {rating}.0',
            "verified": '"verified": true' if rnd() < 0.86 else '"verified": false',
            "reviewTime": f'"reviewTime": "{day_text[day]}"',
            "reviewerID": f'"reviewerID": "{ctx.ids.reviewer_id(reviewer)}"',
            "asin": f'"asin": "{asin_for(index)}"',
            "reviewerName": '"reviewerName": ' + enc(ctx.reviewer_name(reviewer)),
            "unixReviewTime": f'"unixReviewTime": {(first + day) * 86400}',
        }
        if rnd() < 0.998:
            text = ctx.sprinkle(ctx.review_text(domain, emotion), 0.08)
            fields["reviewText"] = '"reviewText": ' + enc(text)
        if rnd() < 0.999:
            fields["summary"] = '"summary": ' + enc(ctx.summary(rating, emotion, star_rate=0.22))
        if rnd() < 0.15:
            fields["vote"] = f'"vote": "{min(int(rng.paretovariate(0.9)) + 1, 25_000):,}"'
        if rnd() < 0.45:
            style = {}
            for key, values in _DOMAINS[domain]["style"]:
                if not style or rnd() < 0.5:
                    style[key] = values[int(rnd() * len(values))]
            fields["style"] = '"style": ' + _dumps(style)
        if rnd() < 0.03:
            urls = [
                f"https://images-na.ssl-images-amazon.com/images/I/{_image_id(rng)}._SY88.jpg"
                for _ in range(rng.randint(1, 3))
            ]
            fields["image"] = '"image": ' + _dumps(urls)
        order = orders[int(rnd() * len(orders))]
        yield "{" + ", ".join([fields[key] for key in order if key in fields]) + "}"


_MS_FIRST_2023 = 1_199_145_600_000  # 2008-01-01
_MS_SPAN_2023 = 1_694_736_000_000 - _MS_FIRST_2023  # to 2023-09-15


def _review_images_2023(rng: random.Random) -> list:
    """2023 review photos: small, medium and large URLs and an attachment type."""
    images = []
    for _ in range(rng.randint(1, 3)):
        base = "https://m.media-amazon.com/images/I/" + _image_id(rng)
        images.append(
            {
                "small_image_url": base + "._SL256_.jpg",
                "medium_image_url": base + "._SL800_.jpg",
                "large_image_url": base + "._SL1600_.jpg",
                "attachment_type": "IMAGE",
            }
        )
    return images


def _reviews_2023(ctx: _Context) -> Iterator[str]:
    """2023 reviews: fixed key order, millisecond timestamps, ``parent_asin`` join key.

    Assembled directly, like the other review lines: byte-identical to ``json.dumps``.
    """
    rng, rnd, enc = ctx.rng, ctx.random, _encode_str
    pairs = _RATING_EMOTION
    while True:
        index = ctx.product_index()
        rating, emotion = pairs[int(rnd() * len(pairs))]
        text = ctx.sprinkle(ctx.review_text(ctx.domain_of(index), emotion), 0.08)
        parent = asin_for(index)
        asin = parent if rnd() < 0.7 else child_asin_for(index, int(rnd() * 6))
        images = _dumps(_review_images_2023(rng)) if rnd() < 0.08 else "[]"
        user = ctx.ids.user_id(ctx.reviewer())
        stamp = _MS_FIRST_2023 + int(_MS_SPAN_2023 * (1.0 - rnd() ** 1.7))
        votes = 0 if rnd() < 0.75 else int(rng.paretovariate(1.1))
        verified = "true" if rnd() < 0.9 else "false"
        yield (
            f'{{"rating": {rating}.0, "title": {enc(ctx.summary(rating, emotion))}, '
            f'"text": {enc(text)}, "images": {images}, "asin": "{asin}", '
            f'"parent_asin": "{parent}", "user_id": "{user}", "timestamp": {stamp}, '
            f'"helpful_vote": {votes}, "verified_purchase": {verified}}}'
        )


# --- products ------------------------------------------------------------------------


def _title(rng: random.Random, domain: dict) -> str:
    """A product title such as ``Ernie Ball Premium Guitar Strings 10-46``."""
    noun = rng.choice(domain["nouns"]).replace("pair of ", "").replace("pack of ", "")
    noun = " ".join(word[:1].upper() + word[1:] for word in noun.split())
    return (
        f"{rng.choice(domain['brands'])} {rng.choice(_TITLE_ADJ)} {noun}{rng.choice(_TITLE_SUFFIX)}"
    )


def _description(ctx: _Context, name: str, mu: float, limit: int = 11_000) -> str:
    """A product description of lognormal length, from the domain's sentence pool."""
    sentences = ctx.product_pool.sentences[name]
    target = min(ctx.rng.lognormvariate(mu, 0.9), limit)
    return " ".join(ctx.rng.choices(sentences, k=max(1, int(target / 48))))


def _related(ctx: _Context, low: int, high: int) -> list:
    """A list of asins: mostly popular products of this file, some from outside it."""
    rnd, products, cache = ctx.random, ctx.products, ctx.asin_cache
    out = []
    for _ in range(ctx.rng.randint(low, high)):
        if rnd() < 0.8:
            index = int(products * rnd() ** 2)
        else:
            index = products + int(rnd() * (10 * products + 10))
        asin = cache.get(index)
        if asin is None:
            asin = asin_for(index)
            if len(cache) < 65_536:  # bounded: memory stays constant
                cache[index] = asin
        out.append(asin)
    return out


_ORDERS_2014 = (
    ("asin", "description", "title", "price", "imUrl", "related", "salesRank", "brand",
     "categories"),
    ("asin", "title", "price", "imUrl", "related", "salesRank", "brand", "categories",
     "description"),
    ("asin", "imUrl", "description", "related", "salesRank", "categories", "title", "price",
     "brand"),
    ("asin", "related", "title", "price", "salesRank", "imUrl", "brand", "categories",
     "description"),
    ("asin", "salesRank", "imUrl", "categories", "title", "description", "price", "related",
     "brand"),
)  # fmt: skip


def _products_2014(ctx: _Context) -> Iterator[str]:
    """2014 metadata: Python dict literals (``repr``), varying key order, missing keys."""
    rng, rnd = ctx.rng, ctx.random
    index = 0
    while True:
        name = ctx.domain_of(index)
        domain = _DOMAINS[name]
        fields: dict = {"asin": asin_for(index)}
        if rnd() < 0.987:
            title = _title(rng, domain)
            if rnd() < 0.05:
                title = title.replace(" & ", " &amp; ").replace("'", "&#39;")
            fields["title"] = title
        if rnd() < 0.997:
            fields["price"] = round(rng.lognormvariate(2.7, 0.9), 2)
        if rnd() < 0.9998:
            fields["imUrl"] = f"http://ecx.images-amazon.com/images/I/{_image_id(rng)}._SY300_.jpg"
        if rnd() < 0.915:
            related = {}
            for key, share, low, high in (
                ("also_bought", 0.82, 1, 60),
                ("also_viewed", 0.1, 1, 30),
                ("bought_together", 0.54, 1, 3),
                ("buy_after_viewing", 0.8, 1, 4),
            ):
                if rnd() < share:
                    related[key] = _related(ctx, low, high)
            if related:
                fields["related"] = related
        if rnd() < 0.999:
            fields["salesRank"] = {domain["rank_cat"]: int(rng.lognormvariate(11.0, 1.6)) + 1}
        if rnd() < 0.25:
            fields["brand"] = rng.choice(domain["brands"])
        if rnd() < 0.755:
            text = _description(ctx, name, 5.6, limit=5_000)
            roll = rnd()
            if roll < 0.12:
                text = text.replace(". ", ".\n", 2)
            elif roll < 0.2:
                text = text.replace(". ", ".\t", 1)
            elif roll < 0.3:
                text = text.replace(" for ", " for &quot;", 1).replace(".", "&quot;.", 1)
                text = text.replace(" and ", " &amp; ", 1)
            fields["description"] = text
        paths = rng.sample(domain["paths"], k=min(len(domain["paths"]), rng.randint(1, 3)))
        fields["categories"] = [list(path) for path in paths]
        order = _ORDERS_2014[int(rnd() * len(_ORDERS_2014))]
        yield repr({key: fields[key] for key in order if key in fields})
        index += 1


def _dimensions(rng: random.Random) -> str:
    """Package dimensions like ``3.4 x 2.1 inches``."""
    width = f"{rng.randint(1, 12)}.{rng.randint(0, 9)}"
    return f"{width} x {rng.randint(1, 9)}.{rng.randint(0, 9)} inches"


_SHIPPING_WEIGHTS = (
    "3 ounces",
    "0.5 ounces",
    "1.8 pounds (",
    "0.8 ounces (View shipping rates and policies)",
)


def _details_2018(rng: random.Random) -> dict:
    """2018 ``details``: keys keep the scraper's whitespace and colons."""
    rnd = rng.random
    details = {}
    if rnd() < 0.4:
        ounces = f"{rng.randint(1, 30)}.{rng.randint(0, 9)} ounces"
        details["\n    Product Dimensions: \n    "] = f"{_dimensions(rng)} ; {ounces}"
    if rnd() < 0.4:
        details["Shipping Weight:"] = rng.choice(_SHIPPING_WEIGHTS)
    if rnd() < 0.4:
        details["Domestic Shipping: "] = "Item can be shipped within U.S."
    if rnd() < 0.4:
        details["International Shipping: "] = (
            "This item is not eligible for international shipping."
        )
    if rnd() < 0.4:
        details["Item model number:"] = f"{rng.choice('ABCDEFG')}{rng.randint(100, 99999)}"
    if rnd() < 0.4:
        details["UPC:"] = str(rng.randrange(10**11, 10**12))
    return details


def _price_2018(rnd) -> str:
    """A 2018 price string: mostly ``""``, else ``"$29.99"``, ``"$1,250.00"`` or garbage."""
    roll = rnd()
    if roll < 0.62:
        return ""
    if roll < 0.935:
        return f"${2 + 60 * rnd() ** 2:.2f}"
    if roll < 0.96:
        return f"${1000 + 4000 * rnd():,.2f}"
    if roll < 0.98:
        return CSS_PRICE
    if roll < 0.993:
        return _WHITESPACE_PRICE
    return _SCRIPT_PRICE


def _rank_2018(rng: random.Random, domain: dict) -> object:
    """A 2018 rank: a string cut at ``(``, a list of ``>#`` strings, or ``[]``."""
    roll = rng.random()
    top = domain["rank_cat"]
    if roll < 0.35:
        return f"{rng.randint(1, 3_000_000):,} in {top} ("
    if roll < 0.65:
        leaf = rng.choice(domain["paths"])[-1]
        ranks = [
            f">#{rng.randint(1, 3_000_000):,} in {top} (See Top 100 in {top})",
            f">#{rng.randint(1, 20_000):,} in {domain['main_cat']} > {leaf}",
        ]
        return ranks[: rng.randint(1, 2)]
    return []


def _products_2018(ctx: _Context) -> Iterator[str]:
    """2018 metadata: JSON with every key present, string prices and ranks, scraping debris."""
    rng, rnd = ctx.rng, ctx.random
    pool = ctx.product_pool
    index = 0
    while True:
        name = ctx.domain_of(index)
        domain = _DOMAINS[name]
        asin = asin_for(index)
        category = list(rng.choice(domain["paths"]))
        if rnd() < 0.08:
            category = []
        else:
            if rnd() < 0.08:
                category = [c.replace("&", "&amp;") for c in category]
            if rnd() < 0.04:
                category.append("</span></span></span>")
        roll = rnd()
        if roll < 0.03:
            title = _MAGAZINE_DEBRIS
        else:
            title = _title(rng, domain).replace("'", "&#39;")
            if roll < 0.13:
                title = " " + title
            elif roll < 0.2:
                title = title + " "
        description = []
        if rnd() < 0.6:
            description = [_description(ctx, name, 5.2) for _ in range(rng.randint(1, 3))]
            if rnd() < 0.15:
                description[0] = f'<div class="aplus"> <br>{description[0]}<br /><br /> </div>'
            if rnd() < 0.05:
                description.append("")
            if rnd() < 0.003:
                description = [_description(ctx, name, 9.3)]
        feature = []
        if rnd() < 0.5:
            feature = rng.sample(pool.features[name], rng.randint(1, 6))
        details = _details_2018(rng)
        if rnd() < 0.7:
            details["ASIN:" if rnd() < 0.5 else "ASIN: "] = asin
        if name == "fashion" and rnd() < 0.7:
            main_cat = _FASHION_IMG
        else:
            main_cat = "" if rnd() < 0.05 else domain["main_cat"]
        thumbs = [
            "https://images-na.ssl-images-amazon.com/images/I/"
            f"{_image_id(rng)}._SX38_SY50_CR,0,0,38,50_.jpg"
            for _ in range(rng.choice((0, 0, 1, 1, 2, 3, 5)))
        ]
        with_image = rnd() < 0.5  # the `image` variant; else imageURL + imageURLHighRes
        record = {
            "category": category,
            "tech1": "" if rnd() < 0.99 else "Product Dimensions",
            "description": description,
            "fit": "",
            "title": title,
            "also_buy": _related(ctx, 1, 40) if rnd() < 0.45 else [],
        }
        if with_image:
            record["image"] = thumbs
        record["tech2"] = ""
        record["brand"] = "" if rnd() < 0.45 else rng.choice(domain["brands"])
        record["feature"] = feature
        record["rank"] = _rank_2018(rng, domain)
        record["also_view"] = _related(ctx, 1, 50) if rnd() < 0.45 else []
        record["details"] = details
        record["main_cat"] = main_cat
        record["similar_item"] = ""
        record["date"] = (
            ""
            if rnd() < 0.8
            else f"{rng.choice(('January', 'May', 'August', 'November'))} "
            f"{rng.randint(1, 28)}, {rng.randint(2001, 2018)}"
        )
        record["price"] = _price_2018(rnd)
        record["asin"] = asin
        if not with_image:  # real files put these two last
            record["imageURL"] = thumbs
            record["imageURLHighRes"] = [url.split("._", 1)[0] + ".jpg" for url in thumbs]
        yield _dumps(record)
        index += 1


def _images_2023(rng: random.Random) -> list:
    """2023 product images: thumb, large, variant (``MAIN``, ``PT01``...), hi_res or null."""
    images = []
    base = "https://m.media-amazon.com/images/I/"
    for k in range(rng.choice((1, 1, 2, 2, 3, 4, 5, 7))):
        image = _image_id(rng)
        images.append(
            {
                "thumb": f"{base}{image}._SS40_.jpg",
                "large": f"{base}{image}.jpg",
                "variant": "MAIN" if k == 0 else f"PT{k:02d}",
                "hi_res": None if rng.random() < 0.12 else f"{base}{_image_id(rng)}._SL1500_.jpg",
            }
        )
    return images


def _products_2023(ctx: _Context) -> Iterator[str]:
    """2023 metadata: JSON in the official key order, ``null`` gaps, ``\\u2019``-style escapes."""
    rng, rnd = ctx.rng, ctx.random
    pool = ctx.product_pool
    index = 0
    while True:
        name = ctx.domain_of(index)
        domain = _DOMAINS[name]
        title = _title(rng, domain)
        if rnd() < 0.17:
            title = title.replace("'", "\u2019").replace(", ", "\uff0c", 1)
            title += " " + rng.choice(_NON_ASCII)
        features = rng.sample(pool.features[name], rng.randint(1, 5)) if rnd() < 0.16 else []
        description = []
        if rnd() < 0.19:
            description = [_description(ctx, name, 5.6, 6_000) for _ in range(rng.randint(1, 2))]
            if rnd() < 0.1:
                description[0] = "<p>" + description[0] + "</p>"
        details: dict = {}
        if rnd() < 0.7:
            details["Package Dimensions"] = f"{_dimensions(rng)}; {rng.randint(1, 40) / 10} Pounds"
        if rnd() < 0.5:
            details["UPC"] = str(rng.randrange(10**11, 10**12))
        if rnd() < 0.4:
            details["Manufacturer"] = rng.choice(domain["brands"])
        if rnd() < 0.25:
            details["Best Sellers Rank"] = {
                domain["rank_cat"]: rng.randint(1, 2_000_000),
                rng.choice(domain["paths"])[-1]: rng.randint(1, 5_000),
            }
        if rnd() < 0.1:
            details["Date First Available"] = (
                f"{rng.choice(('March', 'June', 'October'))} {rng.randint(1, 28)}, "
                f"{rng.randint(2005, 2023)}"
            )
        videos = []
        if rnd() < 0.1:
            for _ in range(rng.randint(1, 2)):
                videos.append(
                    {
                        "title": rng.choice(("Product review", "How to use", "Unboxing")),
                        "url": f"https://www.amazon.com/vdp/{rng.getrandbits(120):030x}",
                        "user_id": (
                            ""
                            if rnd() < 0.5
                            else f"/shop/{rng.choice(_FIRST_NAMES).lower()}reviews"
                        ),
                    }
                )
        yield _dumps(
            {
                "main_category": domain["main_cat"],
                "title": title,
                "average_rating": round(min(5.0, max(1.0, rng.gauss(4.2, 0.6))), 1),
                "rating_number": int(rng.paretovariate(0.6)),
                "features": features,
                "description": description,
                "price": round(rng.lognormvariate(2.9, 0.8), 2) if rnd() < 0.14 else None,
                "images": _images_2023(rng),
                "videos": videos,
                "store": rng.choice(domain["brands"]) if rnd() < 0.985 else None,
                "categories": list(rng.choice(domain["paths"])) if rnd() < 0.3 else [],
                "details": details,
                "parent_asin": asin_for(index),
                "bought_together": None,
            }
        )
        index += 1


_GENERATORS = {
    ("reviews", 2014): _reviews_2014,
    ("reviews", 2018): _reviews_2018,
    ("reviews", 2023): _reviews_2023,
    ("products", 2014): _products_2014,
    ("products", 2018): _products_2018,
    ("products", 2023): _products_2023,
}


# --- public API ------------------------------------------------------------------------


def iter_lines(kind: str, fmt: int, count: int, seed: int = 0) -> Iterator[str]:
    """Yield ``count`` lines (no newline) of ``kind`` in format ``fmt``: same args, same lines.

    About 2% of review lines (and of 2018 metadata lines) repeat a recent line exactly.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(str, FORMATS))}, not {fmt!r}")
    if count < 0:
        raise ValueError(f"count must be 0 or more, not {count}")
    return _iter_lines(kind, fmt, count, seed)


def _iter_lines(kind: str, fmt: int, count: int, seed: int) -> Iterator[str]:
    if count == 0:
        return
    ctx = _Context(kind, fmt, count, seed)
    rnd = ctx.random
    fresh = _GENERATORS[kind, fmt](ctx)
    rate = DUPLICATE_RATE[kind, fmt]
    recent: list = []
    for _ in range(count):
        if recent and rnd() < rate:
            yield recent[int(rnd() * len(recent))]
            continue
        line = next(fresh)
        if rate:
            if len(recent) < 64:
                recent.append(line)
            else:
                recent[int(rnd() * 64)] = line
        yield line


def _chunks(lines: Iterator[str], size: int = 1000) -> Iterator[bytes]:
    """Newline-terminated lines, joined and encoded a thousand at a time."""
    batch: list = []
    for line in lines:
        batch.append(line)
        if len(batch) == size:
            batch.append("")
            yield "\n".join(batch).encode("utf-8")
            batch = []
    if batch:
        batch.append("")
        yield "\n".join(batch).encode("utf-8")


def _write_gzip(path: str, chunks: Iterator[bytes]) -> None:
    """Gzip ``chunks`` to ``path``, compressing on a second thread (zlib drops the GIL).

    Level 6, as ``gzip.open(..., compresslevel=6)``, but the header has no file name
    and mtime 0, so the same lines always give the same bytes.
    """
    pending: queue.Queue = queue.Queue(maxsize=8)
    failure: list = []

    def drain(out: gzip.GzipFile) -> None:
        while True:
            chunk = pending.get()
            if chunk is None:
                return
            if not failure:
                try:
                    out.write(chunk)
                except BaseException as error:  # noqa: BLE001 - re-raised by the caller
                    failure.append(error)

    with open(path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as out:
            worker = threading.Thread(target=drain, args=(out,), name="gzip-writer", daemon=True)
            worker.start()
            try:
                for chunk in chunks:
                    if failure:
                        break
                    pending.put(chunk)
            finally:
                pending.put(None)
                worker.join()
            if failure:
                raise failure[0]


def write_dataset(kind: str, fmt: int, count: int, output: str, seed: int = 0) -> int:
    """Write ``count`` generated lines to ``output`` (gzip if it ends in ``.gz``); return it.

    Parent directories are created. The bytes are the same for the same arguments. The
    file appears whole or not at all: it is written under a hidden name, then renamed (an
    interrupted run leaves nothing behind).
    """
    lines = iter_lines(kind, fmt, count, seed)
    folder, name = os.path.split(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    partial = os.path.join(folder, f".{name}.partial")
    written = 0

    def counted() -> Iterator[str]:
        nonlocal written
        for line in lines:
            written += 1
            yield line

    try:
        if output.endswith(".gz"):
            _write_gzip(partial, _chunks(counted()))
        else:
            with open(partial, "wb") as out:
                for chunk in _chunks(counted()):
                    out.write(chunk)
        os.replace(partial, output)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``generate`` command's arguments (kind, --format, --count, --output, --seed)."""
    parser.add_argument("kind", choices=KINDS, help="what to generate")
    parser.add_argument(
        "--format", type=int, choices=FORMATS, required=True, help="dataset generation"
    )
    parser.add_argument("--count", type=_count, required=True, help="number of lines to write")
    parser.add_argument("--output", required=True, help="file to write; gzip if it ends in .gz")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _count(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number, 0 or more, not {text!r}")
    return value


def main(args: argparse.Namespace) -> int:
    """Run ``generate`` from parsed arguments: write the file, print one summary line."""
    written = write_dataset(args.kind, args.format, args.count, args.output, args.seed)
    print(f"wrote {written} {args.kind} ({args.format}) to {args.output}")
    return 0


if __name__ == "__main__":  # the CLI proper is ``python -m pipelines generate``
    _parser = argparse.ArgumentParser(prog="python -m samples.generate")
    add_arguments(_parser)
    raise SystemExit(main(_parser.parse_args()))
