-- The datalake: canonical reviews and products, dead letters, and a record of runs.

CREATE TABLE reviews (
    review_id      text PRIMARY KEY,
    reviewer_id    text NOT NULL,
    asin           text NOT NULL,
    parent_asin    text,
    reviewer_name  text,
    rating         real NOT NULL CHECK (rating BETWEEN 1 AND 5),
    title          text,
    text           text,
    helpful_votes  integer,
    total_votes    integer,
    verified       boolean,
    reviewed_at    timestamptz NOT NULL,
    images         text[] NOT NULL DEFAULT '{}',
    style          jsonb,
    source_format  smallint NOT NULL CHECK (source_format IN (2014, 2018, 2023)),
    source         text NOT NULL,
    line           integer NOT NULL
);
-- One secondary index, for joins to products; every index slows bulk loads.
CREATE INDEX reviews_asin_idx ON reviews (asin);

CREATE TABLE products (
    asin            text PRIMARY KEY,
    title           text,
    brand           text,
    main_category   text,
    categories      text[] NOT NULL DEFAULT '{}',
    price           numeric(12, 2),
    sales_rank      jsonb,
    average_rating  real,
    rating_number   integer,
    description     text,
    features        text[] NOT NULL DEFAULT '{}',
    image_urls      text[] NOT NULL DEFAULT '{}',
    also_bought     text[] NOT NULL DEFAULT '{}',
    also_viewed     text[] NOT NULL DEFAULT '{}',
    bought_together text[] NOT NULL DEFAULT '{}',
    details         jsonb,
    source_format   smallint NOT NULL CHECK (source_format IN (2014, 2018, 2023)),
    source          text NOT NULL,
    line            integer NOT NULL
);

CREATE TABLE pipeline_runs (
    run_id      uuid PRIMARY KEY,
    pipeline    text NOT NULL,
    runner      text,
    options     jsonb NOT NULL DEFAULT '{}',
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    state       text NOT NULL,
    counters    jsonb NOT NULL DEFAULT '{}'
);

CREATE TABLE dead_letters (
    id       bigserial PRIMARY KEY,
    pipeline text NOT NULL,
    stage    text NOT NULL,
    source   text,
    line     integer,
    raw      text,
    error    text NOT NULL,
    run_id   uuid,
    at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_run_idx ON dead_letters (run_id);
CREATE INDEX dead_letters_source_idx ON dead_letters (source, line);
