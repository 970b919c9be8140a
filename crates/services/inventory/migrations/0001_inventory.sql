-- Stock per product. The CHECKs are the last line of defence: whatever the code
-- does, no product is ever reserved or sold beyond what it had.
CREATE TABLE stock (
    product_id TEXT PRIMARY KEY,
    initial    BIGINT NOT NULL CHECK (initial >= 0),
    available  BIGINT NOT NULL CHECK (available >= 0),
    reserved   BIGINT NOT NULL CHECK (reserved >= 0),
    sold       BIGINT NOT NULL CHECK (sold >= 0),
    CHECK (available + reserved + sold = initial)
);

-- One reservation per order: `held` until the order is confirmed (`committed`) or
-- cancelled (`released`), or its time runs out (`expired`); `rejected` when stock was
-- short; `cancelled` when a release came first (a late reserve is then refused).
CREATE TABLE reservations (
    order_id   TEXT PRIMARY KEY,
    status     TEXT NOT NULL,
    reason     TEXT,
    items      TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX reservations_due ON reservations (status, expires_at);
