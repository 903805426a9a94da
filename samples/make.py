"""Rebuild the bundled sample files: generated lines plus hand-written real-format lines.

Run from the repository root: ``python -m samples.make``. The output
is byte-for-byte reproducible. README.md lists what each file holds; the line numbers
of the deliberately malformed lines are pinned in ``MALFORMED`` and checked here.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``samples`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samples.generate import CSS_PRICE, iter_lines  # noqa: E402

HERE = Path(__file__).resolve().parent
SEED = 2024

# file name -> 1-based line numbers of the lines that are deliberately not records.
MALFORMED = {
    "All_Beauty_5.json.gz": [24],  # a 2018 review line cut in half
    "All_Beauty.jsonl": [30],  # a line of plain text, not JSON
}
BLANK = {"meta_Gift_Cards.json": [20]}  # a blank line between records (skipped, not an error)

# --- hand-written lines ----------------------------------------------------------------

# 2014: the official example review (McAuley's 2014 page), exactly as documented.
OFFICIAL_2014_REVIEW = {
    "reviewerID": "A2SUAM1J3GNN3B",
    "asin": "0000013714",
    "reviewerName": "J. McDonald",
    "helpful": [2, 3],
    "reviewText": "I bought this for my husband who plays the piano.  He is having a wonderful "
    "time playing these old hymns.  The music  is at times hard to read because we think "
    "the book was published for singing from more than playing from.  Great purchase though!",
    "overall": 5.0,
    "summary": "Heavenly Highway Hymns",
    "unixReviewTime": 1252800000,
    "reviewTime": "09 13, 2009",
}
REVIEWS_2014 = [
    OFFICIAL_2014_REVIEW,
    {  # a control character, written by JSON as the \u0003 escape
        "reviewerID": "A1YS9MDZP93857",
        "asin": "0000013714",
        "reviewerName": 'Amaranth "music fan"',
        "helpful": [0, 0],
        "reviewText": "Bought this hymnal for our choir.\u0003 The shaped notes are easy to "
        "read &amp; the binding lies flat on the piano. I&#39;m very happy with it.",
        "overall": 4.0,
        "summary": "Good &quot;old time&quot; hymnal",
        "unixReviewTime": 1394582400,
        "reviewTime": "03 12, 2014",
    },
    {  # no reviewerName; tabs and newlines in the text
        "reviewerID": "A2IBPI20UZIR0U",
        "asin": "B00004Y2UT",
        "helpful": [0, 291],
        "reviewText": "Not much to write about here, but it does exactly what it's supposed "
        "to.\tFilters out the pop sounds.\nNow my recordings are much more crisp.",
        "overall": 5.0,
        "summary": "good",
        "unixReviewTime": 1393545600,
        "reviewTime": "02 28, 2014",
    },
    {  # an empty text and a nickname cut short with "..."
        "reviewerID": "A14VAT5EAX3D9S",
        "asin": "B00004Y2UT",
        "reviewerName": "cassandra tu \"Yeah, well, that's just like, u...",
        "helpful": [1, 1],
        "reviewText": "",
        "overall": 3.0,
        "summary": "It's fine",
        "unixReviewTime": 1310169600,
        "reviewTime": "07 9, 2011",
    },
]
META_2014 = [
    {
        "asin": "0000013714",
        "title": "Heavenly Highway Hymns: Shaped-Note Hymnal",
        "price": 13.66,
        "imUrl": "http://ecx.images-amazon.com/images/I/51JpOqTJD0L._SY300_.jpg",
        "related": {"also_bought": ["B00004Y2UT"], "buy_after_viewing": ["B00004Y2UT"]},
        "salesRank": {"Books": 1144227},
        "categories": [
            ["Books", "Arts & Photography", "Music", "Songbooks"],
            ["Musical Instruments", "Instrument Accessories", "Sheet Music"],
        ],
    },
    {
        "asin": "B00004Y2UT",
        "description": "The pop filter &quot;catches&quot; plosives\nbefore they reach the mic."
        "\tMetal gooseneck &amp; double mesh screen.",
        "title": "Nady MPF-6 6-Inch Clamp On Microphone Pop Filter",
        "price": 12.99,
        "imUrl": "http://ecx.images-amazon.com/images/I/41n1Vp9LQVL._SY300_.jpg",
        "salesRank": {"Musical Instruments": 4126},
        "brand": "Nady",
        "categories": [["Musical Instruments", "Microphones & Accessories", "Pop Filters"]],
    },
    {  # a title with an apostrophe: repr switches that string to double quotes
        "asin": "5555991584",
        "title": "Don't Drink His Blood",
        "price": 9.49,
        "salesRank": {"Music": 505556},
        "categories": [["CDs & Vinyl", "Rock"], ["Digital Music", "Rock"]],
    },
    {"asin": "1384719342", "categories": [["Musical Instruments"]]},  # optional keys absent
]

# 2018: the official sample review (Ni et al.'s page), with JSON's lowercase true.
OFFICIAL_2018_REVIEW = {
    "image": ["https://images-na.ssl-images-amazon.com/images/I/71eG75FTJJL._SY88.jpg"],
    "overall": 5.0,
    "vote": "2",
    "verified": True,
    "reviewTime": "01 1, 2018",
    "reviewerID": "AUI6WTTT0QZYS",
    "asin": "5120053084",
    "style": {"Size:": "Large", "Color:": "Charcoal"},
    "reviewerName": "Abbey",
    "reviewText": "I now have 4 of the 5 available colors of this shirt... ",
    "summary": "Comfy, flattering, discreet--highly recommended!",
    "unixReviewTime": 1514764800,
}
REVIEWS_2018 = [
    OFFICIAL_2018_REVIEW,
    {  # "vote" with a thousands comma; style keys end in ':' and values start with ' '
        "overall": 1.0,
        "vote": "1,341",
        "verified": True,
        "reviewTime": "11 14, 2016",
        "reviewerID": "A3KLZ6LG1WQW8S",
        "asin": "5120053084",
        "style": {"Size:": " Big Boys", "Color:": " Blue/Orange"},
        "reviewerName": "Amazon Customer",
        "reviewText": '<div id="video-block-R2PJPH1F2LKZ3O" class="a-section a-spacing-small '
        'a-spacing-top-mini video-block"></div>&nbsp;The color bled in the first wash and '
        "ruined a load of whites. I am furious.\n\nCaf&eacute; au lait is not the color I "
        'ordered. <a data-hook="product-link-linked" class="a-link-normal" '
        'href="/dp/B001GXRQW0/ref=cm_cr_arp_d_rvw_txt?ie=UTF8">This one</a> is better.',
        "summary": "Awful",
        "unixReviewTime": 1479081600,
    },
    {  # no reviewText, and a different key order
        "reviewerID": "A2HOI48JK8838M",
        "asin": "B001GXRQW0",
        "reviewerName": "DB",
        "verified": False,
        "overall": 5.0,
        "summary": "Five Stars",
        "unixReviewTime": 1427500800,
        "reviewTime": "03 28, 2015",
    },
    {  # no summary
        "overall": 4.0,
        "verified": True,
        "reviewTime": "12 25, 2017",
        "reviewerID": "AVR3VJ3XA8DO1",
        "asin": "B001GXRQW0",
        "style": {"Gift Amount:": " 50"},
        "reviewerName": "Laura",
        "reviewText": "Easy to send and the design was cute. Wish there were more designs.",
        "unixReviewTime": 1514160000,
    },
]
_ASIN_DETAILS = {"Shipping Weight:": "0.5 ounces", "ASIN:": "B001GXRQW0"}
META_2018 = [
    {  # an HTML entity and a trailing space in the title; rank cut at "("
        "category": ["Gift Cards", "Gift Cards"],
        "tech1": "",
        "description": ["Gift card for the purchase of goods or services at Maggiano's."],
        "fit": "",
        "title": "Maggiano&#39;s Gift Card ",
        "also_buy": [],
        "image": [],
        "tech2": "",
        "brand": "Maggiano's",
        "feature": [],
        "rank": "1,786 in Gift Cards (",
        "also_view": [],
        "details": {"ASIN: ": "B001GXRQW0", "Domestic Shipping: ": "Item can be shipped "
                    "within U.S."},
        "main_cat": "Gift Cards",
        "similar_item": "",
        "date": "May 15, 2009",
        "price": "$29.99",
        "asin": "B001GXRQW0",
    },
    {  # the fashion main_cat that is a raw <img> tag; imageURL + imageURLHighRes variant
        "category": ["Clothing, Shoes & Jewelry", "Women", "</span></span></span>"],
        "tech1": "",
        "description": ['<div class="aplus"> <br>A soft tee for every day.<br /><br /> </div>',
                        ""],
        "fit": "",
        "title": " Hanes Women's Relaxed Fit Jersey ComfortSoft Crewneck T-Shirt",
        "also_buy": ["B001GXRQW0"],
        "tech2": "",
        "brand": "Hanes",
        "feature": ["100% Cotton", "Imported"],
        "rank": [">#2,893,775 in Clothing (See Top 100 in Clothing)",
                 ">#1,019 in Clothing > Women > Tops"],
        "also_view": [],
        "details": {"\n    Product Dimensions: \n    ": "3.4 x 2.1 inches ; 1.44 ounces",
                    "Shipping Weight:": "1.8 pounds ("},
        "main_cat": '<img src="https://images-na.ssl-images-amazon.com/images/G/01/nav2/images/'
        'gui/amazon-fashion-store-new._CB520838675_.png" class="nav-categ-image" '
        'alt="AMAZON FASHION"/>',
        "similar_item": "",
        "date": "",
        "price": "$1,250.00",
        "asin": "5120053084",
        "imageURL": ["https://images-na.ssl-images-amazon.com/images/I/317ZQtCvFzL._SX38_SY50"
                     "_CR,0,0,38,50_.jpg"],
        "imageURLHighRes": ["https://images-na.ssl-images-amazon.com/images/I/317ZQtCvFzL.jpg"],
    },
    {  # scraper debris: the magazine title, CSS in price, an entity in category
        "category": ["Sports, Recreation &amp; Outdoors"],
        "tech1": "",
        "description": [],
        "fit": "",
        "title": '<span class="a-size-medium a-color-secondary"',
        "also_buy": [],
        "image": ["https://images-na.ssl-images-amazon.com/images/I/41lbRayp5mL._SX38_SY50_CR,0"
                  ",0,38,50_.jpg"],
        "tech2": "",
        "brand": "",
        "feature": [],
        "rank": [],
        "also_view": [],
        "details": {"ASIN:": "B00005N7P0"},
        "main_cat": "",
        "similar_item": "",
        "date": "",
        "price": CSS_PRICE,
        "asin": "B00005N7P0",
    },
    {  # a whitespace run as price
        "category": [],
        "tech1": "",
        "description": [],
        "fit": "",
        "title": "Outdoor Life Magazine",
        "also_buy": [],
        "image": [],
        "tech2": "",
        "brand": "",
        "feature": [],
        "rank": "12,345 in Magazine Subscriptions (",
        "also_view": [],
        "details": {},
        "main_cat": "Magazine Subscriptions",
        "similar_item": "",
        "date": "",
        "price": "\n\t\t\t\t\t\t\t\t\t\n\r\n\r\n",
        "asin": "B00005N7OJ",
    },
]  # fmt: skip

# 2023: the official first lines of All_Beauty.jsonl and meta_All_Beauty.jsonl, as the
# official notebook prints them, re-serialised as one line each (json.dumps defaults).
OFFICIAL_2023_REVIEW = {
    "rating": 5.0,
    "title": "Such a lovely scent but not overpowering.",
    "text": "This spray is really nice. It smells really good, goes on really fine, and does "
    "the trick. I will say it feels like you need a lot of it though to get the texture I "
    "want. I have a lot of hair, medium thickness. I am comparing to other brands with yucky "
    "chemicals so I'm gonna stick with this. Try it!",
    "images": [],
    "asin": "B00YQ6X8EO",
    "parent_asin": "B00YQ6X8EO",
    "user_id": "AGKHLEW2SOWHNMFQIJGBECAF7INQ",
    "timestamp": 1588687728923,
    "helpful_vote": 0,
    "verified_purchase": True,
}
REVIEWS_2023 = [
    OFFICIAL_2023_REVIEW,
    {  # a variant asin under its parent; a photo; <br /> and a curly apostrophe
        "rating": 2.0,
        "title": "Works great but smells a little weird.",
        "text": "It does what I need.<br /><br />But my head smells like an orange coffee "
        "and that\u2019s offputting.",
        "images": [
            {
                "small_image_url": "https://m.media-amazon.com/images/I/81FN4c0VHzL._SL256_.jpg",
                "medium_image_url": "https://m.media-amazon.com/images/I/81FN4c0VHzL._SL800_.jpg",
                "large_image_url": "https://m.media-amazon.com/images/I/81FN4c0VHzL._SL1600_.jpg",
                "attachment_type": "IMAGE",
            }
        ],
        "asin": "B088SZDGXG",
        "parent_asin": "B01CUPMQZE",
        "user_id": "AEYORY2AVPMCPDV57CE337YU5LXA",
        "timestamp": 1634275259292,
        "helpful_vote": 3,
        "verified_purchase": False,
    },
]
OFFICIAL_2023_META = {
    "main_category": "All Beauty",
    "title": "Howard LC0008 Leather Conditioner, 8-Ounce (4-Pack)",
    "average_rating": 4.8,
    "rating_number": 10,
    "features": [],
    "description": [],
    "price": None,
    "images": [
        {
            "thumb": "https://m.media-amazon.com/images/I/41qfjSfqNyL._SS40_.jpg",
            "large": "https://m.media-amazon.com/images/I/41qfjSfqNyL.jpg",
            "variant": "MAIN",
            "hi_res": None,
        },
        {
            "thumb": "https://m.media-amazon.com/images/I/41w2yznfuZL._SS40_.jpg",
            "large": "https://m.media-amazon.com/images/I/41w2yznfuZL.jpg",
            "variant": "PT01",
            "hi_res": "https://m.media-amazon.com/images/I/71i77AuI9xL._SL1500_.jpg",
        },
    ],
    "videos": [],
    "store": "Howard Products",
    "categories": [],
    "details": {"Package Dimensions": "7.1 x 5.5 x 3 inches; 2.38 Pounds", "UPC": "617390882781"},
    "parent_asin": "B01CUPMQZE",
    "bought_together": None,
}
META_2023 = [
    OFFICIAL_2023_META,
    {  # made up so the official review joins; nested details and non-ASCII text
        "main_category": "All Beauty",
        "title": "Sea Salt Texturizing Hair Spray \u2013 Beach Waves\uff0c8 oz",
        "average_rating": 4.3,
        "rating_number": 1387,
        "features": ["Sulfate free", "Light hold that won\u2019t get crunchy"],
        "description": ["Spray on damp hair and scrunch.", "<p>Made in the USA.</p>"],
        "price": 14.99,
        "images": [
            {
                "thumb": "https://m.media-amazon.com/images/I/41b+11d5igL._SS40_.jpg",
                "large": "https://m.media-amazon.com/images/I/41b+11d5igL.jpg",
                "variant": "MAIN",
                "hi_res": "https://m.media-amazon.com/images/I/71g1lP0pMbL._SL1500_.jpg",
            }
        ],
        "videos": [
            {
                "title": "How to get beach waves",
                "url": "https://www.amazon.com/vdp/0a1b2c3d4e5f60718293a4b5c6d7e8f9",
                "user_id": "/shop/hairbylaura",
            }
        ],
        "store": None,
        "categories": ["Beauty & Personal Care", "Hair Care", "Styling Products"],
        "details": {
            "Item Form": "Spray",
            "Best Sellers Rank": {"Beauty & Personal Care": 48213, "Hair Sprays": 307},
        },
        "parent_asin": "B00YQ6X8EO",
        "bought_together": None,
    },
]

GARBAGE_LINE = "WARN 2023-09-15 04:12:55 scraper: page 17 timed out, partial HTML dropped"


# --- assembly --------------------------------------------------------------------------


def _json(record: dict) -> str:
    return json.dumps(record)


def _build() -> dict:
    """Every sample file's lines, in order (a line is a str without its newline)."""
    files = {}

    lines = list(iter_lines("reviews", 2014, 50, seed=SEED))
    hand = [_json(r) for r in REVIEWS_2014]
    lines[0:0] = hand[:1]
    lines[12:12] = hand[1:2]
    lines[25:25] = hand[2:3]
    lines[40:40] = hand[3:4]
    lines.insert(41, lines[40])  # an exact duplicate, next to its original
    files["reviews_Musical_Instruments_5.json.gz"] = lines

    lines = list(iter_lines("products", 2014, 30, seed=SEED))
    for position, record in zip((0, 9, 17, 29), META_2014):
        lines.insert(position, repr(record))
    files["meta_Musical_Instruments.json.gz"] = lines

    lines = list(iter_lines("reviews", 2018, 56, seed=SEED))
    hand = [_json(r) for r in REVIEWS_2018]
    lines[0:0] = hand[:1]
    lines[7:7] = hand[1:2]
    lines[15:15] = hand[2:3]
    lines[33:33] = hand[3:4]
    lines.insert(34, lines[33])  # an exact duplicate
    cut = lines[40]
    lines.insert(23, cut[: len(cut) // 2])  # line 24: a record cut in half
    files["All_Beauty_5.json.gz"] = lines

    lines = list(iter_lines("products", 2018, 30, seed=SEED))
    for position, record in zip((0, 6, 13, 25), META_2018):
        lines.insert(position, _json(record))
    lines.insert(30, lines[6])  # an exact duplicate, as in meta_Magazine_Subscriptions
    lines.insert(19, "")  # line 20: a blank line
    files["meta_Gift_Cards.json"] = lines

    lines = list(iter_lines("reviews", 2023, 50, seed=SEED))
    lines[0:0] = [_json(REVIEWS_2023[0])]
    lines[18:18] = [_json(REVIEWS_2023[1])]
    lines.insert(29, GARBAGE_LINE)  # line 30: not JSON at all
    files["All_Beauty.jsonl"] = lines

    lines = list(iter_lines("products", 2023, 30, seed=SEED))
    lines[0:0] = [_json(META_2023[0])]
    lines[20:20] = [_json(META_2023[1])]
    files["meta_All_Beauty.jsonl.gz"] = lines
    return files


def _check(files: dict) -> None:
    """Fail loudly if a malformed or blank line is not where README.md says it is."""
    for name, lines in files.items():
        for number in MALFORMED.get(name, []):
            line = lines[number - 1]
            try:
                json.loads(line)
            except ValueError:
                continue
            raise AssertionError(f"{name}:{number} was meant to be malformed: {line[:80]}")
        for number in BLANK.get(name, []):
            assert lines[number - 1] == "", f"{name}:{number} was meant to be blank"


def _write(path: Path, lines: list) -> None:
    """One line per record, newline-terminated; gzip without name or mtime (reproducible)."""
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if path.name.endswith(".gz"):
        with open(path, "wb") as raw:
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0
            ) as out:
                out.write(data)
    else:
        path.write_bytes(data)


def main() -> int:
    """Write every sample file next to this script and print a one-line summary of each."""
    files = _build()
    _check(files)
    total = 0
    for name, lines in files.items():
        path = HERE / name
        _write(path, lines)
        size = path.stat().st_size
        total += size
        records = sum(1 for line in lines if line)
        print(f"{name}: {len(lines)} lines, {records} non-blank, {size:,} bytes")
    print(f"total {total:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
