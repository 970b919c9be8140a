-- Portable across SQLite and PostgreSQL: ids are UUIDv7 text, times epoch millis.
CREATE TABLE products (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    description TEXT NOT NULL,
    price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
    currency    TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX products_name ON products (name);

-- One row per one-off task (the first-start seed), so two instances racing on the
-- same database seed once.
CREATE TABLE catalog_tasks (
    name    TEXT PRIMARY KEY,
    done_at BIGINT NOT NULL
);
