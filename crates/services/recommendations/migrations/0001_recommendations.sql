-- How often two products were bought in one order (both directions stored, so a
-- lookup is one index range).
CREATE TABLE co_purchases (
    product_id TEXT NOT NULL,
    other_id   TEXT NOT NULL,
    orders     BIGINT NOT NULL,
    PRIMARY KEY (product_id, other_id)
);
CREATE INDEX co_purchases_top ON co_purchases (product_id, orders);

-- Names as the orders carried them, so answers need no call to the catalog.
CREATE TABLE product_names (
    product_id TEXT PRIMARY KEY,
    name       TEXT NOT NULL
);
