-- The catalog's prices as products published them (`product.created`), kept here
-- so an order is priced without a call to products: the place-order path depends
-- on one service fewer, and keeps taking orders while the catalog is down.
CREATE TABLE catalog_prices (
    product_id  TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
    currency    TEXT NOT NULL
);
