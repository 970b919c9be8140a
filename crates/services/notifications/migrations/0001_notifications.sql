-- One row per message "sent": the record a mail or SMS gateway would be fed from.
CREATE TABLE notifications (
    id         TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL,
    kind       TEXT NOT NULL,
    order_id   TEXT NOT NULL,
    text       TEXT NOT NULL,
    event_id   TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
-- A redelivered event never makes a second message, even without the inbox.
CREATE UNIQUE INDEX notifications_event ON notifications (event_id, kind);
CREATE INDEX notifications_by_user ON notifications (user_id, id);
