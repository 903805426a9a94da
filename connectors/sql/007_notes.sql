-- What cleaning dropped from a record and why (a value Postgres cannot hold, a price that
-- cannot be one), so that the rest of the record lands: NULL when nothing was dropped.
ALTER TABLE reviews ADD COLUMN notes text[];
ALTER TABLE products ADD COLUMN notes text[];
