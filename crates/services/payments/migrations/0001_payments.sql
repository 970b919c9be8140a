-- One row per order this service has heard of. Every message's transaction upserts it
-- first: a charge (from `inventory`) and a refund (from `orders`) of one order arrive
-- on different topics and may be handled at once; the row lock makes them take turns,
-- so neither decides without seeing the other. `GET /payments` pages over it.
CREATE TABLE payment_orders (
    order_id   TEXT PRIMARY KEY,
    updated_at BIGINT NOT NULL
);

-- An order is charged at most once, whatever is redelivered or re-sent.
CREATE TABLE charges (
    charge_id    TEXT PRIMARY KEY,
    order_id     TEXT NOT NULL UNIQUE,
    user_id      TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('charged', 'declined')),
    amount_cents BIGINT NOT NULL CHECK (amount_cents > 0),
    currency     TEXT NOT NULL,
    created_at   BIGINT NOT NULL
);

-- An order is refunded at most once. A row without a charge (refund_id and charge_id
-- NULL, amount 0) is a tombstone: the refund came first, so a late charge must not
-- happen.
CREATE TABLE refunds (
    order_id     TEXT PRIMARY KEY,
    refund_id    TEXT UNIQUE,
    charge_id    TEXT UNIQUE REFERENCES charges (charge_id),
    amount_cents BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    CHECK (
        (charge_id IS NULL AND refund_id IS NULL AND amount_cents = 0)
        OR (charge_id IS NOT NULL AND refund_id IS NOT NULL AND amount_cents > 0)
    )
);
