-- Streaming: the landing zone's ledger, idempotent ingest requests, windowed review stats.

-- One row per file landed in TERMIDATOR_HOME/landing/<dataset>/ that a streaming run took
-- on. 'claimed': a run (run_id) emits its records; 'done': every record is upserted or a
-- dead letter (settled = records, counted by the sinks in their own transactions), so no
-- later run reads it again. A claim whose run is no longer RUNNING, or whose heartbeat is
-- stale, is taken over (the file is read again; upserts make that harmless, and the old
-- claim's dead letters for the file are replaced).
CREATE TABLE landing_files (
    dataset      text NOT NULL,
    name         text NOT NULL,
    path         text NOT NULL,
    bytes        bigint NOT NULL,
    records      integer,
    settled      integer NOT NULL DEFAULT 0,
    state        text NOT NULL CHECK (state IN ('claimed', 'done')),
    run_id       uuid NOT NULL,
    attempts     integer NOT NULL DEFAULT 1,
    claimed_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    done_at      timestamptz,
    PRIMARY KEY (dataset, name)
);
CREATE INDEX landing_files_claimed_idx ON landing_files (run_id) WHERE state = 'claimed';

-- POST /v1/ingest with an Idempotency-Key: the first request lands its lines and stores
-- its answer; a retry with the same key and body gets the same answer and lands nothing.
CREATE TABLE ingest_requests (
    dataset         text NOT NULL,
    idempotency_key text NOT NULL,
    body_sha256     text,
    state           text NOT NULL CHECK (state IN ('pending', 'done')),
    file            text NOT NULL,
    status          integer,
    response        jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    PRIMARY KEY (dataset, idempotency_key)
);

-- Per product and event-time window: review count, mean rating, emotion label counts
-- (null until the stream classifies emotions). Late panes rewrite their window's row.
CREATE TABLE review_stats (
    asin         text NOT NULL,
    window_start timestamptz NOT NULL,
    window_end   timestamptz NOT NULL,
    reviews      integer NOT NULL,
    mean_rating  real,
    emotions     jsonb,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (asin, window_start, window_end)
);
CREATE INDEX review_stats_window_idx ON review_stats (window_start);
