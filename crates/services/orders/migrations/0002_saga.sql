-- Why a cancelled order was cancelled: out_of_stock, payment_declined or timeout.
ALTER TABLE orders ADD COLUMN reason TEXT;
ALTER TABLE orders ADD COLUMN updated_at BIGINT;

-- The place-order saga's steps as orders saw them, in choreography (the
-- orchestrator keeps its own history in saga_history).
CREATE TABLE order_steps (
    order_id TEXT NOT NULL,
    seq      BIGINT NOT NULL,
    step     TEXT NOT NULL,
    what     TEXT NOT NULL,
    at_ms    BIGINT NOT NULL,
    PRIMARY KEY (order_id, seq)
);
