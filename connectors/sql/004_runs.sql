-- Runs a person can trust: which process ran (host, pid, its start time) and its
-- heartbeat, so a run whose process is gone shows as ABANDONED; counters that the sinks
-- add in the same transaction as the rows they count, true on every runner.

ALTER TABLE pipeline_runs
    ADD COLUMN host               text,
    ADD COLUMN pid                integer,
    ADD COLUMN process_started_at timestamptz,
    ADD COLUMN heartbeat_at       timestamptz;
CREATE INDEX pipeline_runs_running_idx ON pipeline_runs (state) WHERE state = 'RUNNING';
CREATE INDEX pipeline_runs_started_idx ON pipeline_runs (started_at DESC);

-- One row per (run, writer, counter): each sink lane adds to its own rows, so lanes never
-- wait on each other; readers sum by name.
CREATE TABLE run_counters (
    run_id  uuid NOT NULL,
    source  text NOT NULL,
    name    text NOT NULL,
    value   bigint NOT NULL,
    PRIMARY KEY (run_id, source, name)
);
