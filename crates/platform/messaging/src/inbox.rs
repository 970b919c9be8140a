//! The idempotent inbox: a consumer records each event id it handled in the same
//! local transaction as the handling, so a redelivered event changes nothing twice.
//! Delivery is at least once; with the inbox, handling is effectively exactly once.

use sqlx::{AnyConnection, AnyPool};

/// Portable DDL (SQLite and PostgreSQL).
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS messaging_inbox (
    consumer TEXT NOT NULL,
    event_id TEXT NOT NULL,
    handled_at BIGINT NOT NULL,
    PRIMARY KEY (consumer, event_id)
)";

/// The inbox of one consumer (a service's handler of one topic).
#[derive(Clone, Debug)]
pub struct Inbox {
    consumer: String,
}

impl Inbox {
    /// Creates the table if needed.
    pub async fn install(pool: &AnyPool) -> Result<(), sqlx::Error> {
        sqlx::query(SCHEMA).execute(pool).await.map(|_| ())
    }

    pub fn new(consumer: &str) -> Self {
        Self {
            consumer: consumer.to_owned(),
        }
    }

    /// Claims `event_id` inside the caller's transaction: `true` the first time (go
    /// on and handle it), `false` if it was already handled (commit nothing else).
    /// `ON CONFLICT DO NOTHING` rather than a caught unique violation, which would
    /// abort a PostgreSQL transaction.
    pub async fn claim(&self, tx: &mut AnyConnection, event_id: &str) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "INSERT INTO messaging_inbox (consumer, event_id, handled_at) VALUES ($1, $2, $3)
             ON CONFLICT (consumer, event_id) DO NOTHING",
        )
        .bind(&self.consumer)
        .bind(event_id)
        .bind(now_millis())
        .execute(tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Forgets ids handled before `before_millis` (they can no longer be redelivered
    /// once the broker's retention has passed).
    pub async fn prune(&self, pool: &AnyPool, before_millis: i64) -> Result<u64, sqlx::Error> {
        Ok(
            sqlx::query("DELETE FROM messaging_inbox WHERE consumer = $1 AND handled_at < $2")
                .bind(&self.consumer)
                .bind(before_millis)
                .execute(pool)
                .await?
                .rows_affected(),
        )
    }
}

pub(crate) fn now_millis() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}
