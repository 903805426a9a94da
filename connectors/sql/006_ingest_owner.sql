-- Who holds a pending Idempotency-Key: the service process (host, pid, its start time).
-- A key whose process on this host is gone is free at once (a crash, a kill -9); another
-- host's only once the reservation is older than the service's staleness time.

ALTER TABLE ingest_requests
    ADD COLUMN host               text,
    ADD COLUMN pid                integer,
    ADD COLUMN process_started_at timestamptz;
