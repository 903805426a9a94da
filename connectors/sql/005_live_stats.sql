-- Stream results while the stream runs: the sinks queue the (product, window) pairs each
-- committed batch touched, in the batch's transaction; the stream refreshes queued
-- windows from the datalake every --stats-every seconds (a recompute, so replays and
-- restarts never double-count). A row is final once the run's watermark passes its end.

ALTER TABLE pipeline_runs ADD COLUMN watermark timestamptz;
ALTER TABLE review_stats ADD COLUMN final boolean NOT NULL DEFAULT false;
CREATE INDEX review_stats_open_idx ON review_stats (window_end) WHERE NOT final;

CREATE TABLE review_stats_queue (
    asin         text NOT NULL,
    window_start timestamptz NOT NULL,
    window_end   timestamptz NOT NULL,
    PRIMARY KEY (asin, window_start, window_end)
);

-- A window's reviews are found by product and time: one index serves that and the joins
-- to products (which used reviews_asin_idx).
CREATE INDEX reviews_asin_time_idx ON reviews (asin, reviewed_at);
DROP INDEX reviews_asin_idx;
