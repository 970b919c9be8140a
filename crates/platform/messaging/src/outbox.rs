//! The transactional outbox: a service writes its events into its own database in
//! the same transaction as the state change, and a relay publishes them afterwards,
//! in order, at least once. A crash between commit and publish delays an event; it
//! never loses one, and a broker outage only makes the outbox longer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{AnyConnection, AnyPool, Row};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::bus::{EventBus, check_name};
use crate::envelope::CloudEvent;
use crate::inbox::now_millis;

/// The table: one row per event not yet published. `seq` orders them.
fn schema(postgres: bool) -> &'static str {
    if postgres {
        "CREATE TABLE IF NOT EXISTS messaging_outbox (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            topic TEXT NOT NULL, event_key TEXT NOT NULL, event_id TEXT NOT NULL,
            payload TEXT NOT NULL, created_at BIGINT NOT NULL)"
    } else {
        "CREATE TABLE IF NOT EXISTS messaging_outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            topic TEXT NOT NULL, event_key TEXT NOT NULL, event_id TEXT NOT NULL,
            payload TEXT NOT NULL, created_at BIGINT NOT NULL)"
    }
}

/// Only one relay publishes a database's outbox at a time (several instances of a
/// service share one database): the holder renews a lease row.
const LEASE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS messaging_outbox_lease (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at BIGINT NOT NULL)";

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Name(#[from] crate::bus::BusError),
}

/// Writes events in the caller's transaction. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Outbox {
    written: Arc<Notify>,
}

impl Outbox {
    /// Creates the tables if needed.
    pub async fn install(pool: &AnyPool) -> Result<(), sqlx::Error> {
        let mut conn = pool.acquire().await?;
        let postgres = conn.backend_name().eq_ignore_ascii_case("PostgreSQL");
        sqlx::query(schema(postgres)).execute(&mut *conn).await?;
        sqlx::query(LEASE_SCHEMA).execute(&mut *conn).await?;
        Ok(())
    }

    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `event` for `topic`, keyed by `key`, inside `tx`: it is published if and
    /// only if the transaction commits. Call [`Outbox::written`] after the commit to
    /// wake the relay at once.
    pub async fn enqueue(
        &self,
        tx: &mut AnyConnection,
        topic: &str,
        key: &str,
        event: &CloudEvent,
    ) -> Result<(), OutboxError> {
        check_name(topic)?;
        sqlx::query(
            "INSERT INTO messaging_outbox (topic, event_key, event_id, payload, created_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(topic)
        .bind(key)
        .bind(&event.id)
        .bind(String::from_utf8_lossy(&event.to_json()).into_owned())
        .bind(now_millis())
        .execute(tx)
        .await?;
        Ok(())
    }

    /// Wakes the relay (after a commit that enqueued events).
    pub fn written(&self) {
        self.written.notify_one();
    }
}

/// What the relay reports: events waiting and the age of the oldest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lag {
    pub pending: u64,
    pub oldest_ms: u64,
}

/// The relay's gauges, refreshed after every batch.
#[derive(Clone, Default)]
struct RelayMetrics {
    pending: prometheus_client::metrics::gauge::Gauge,
    oldest: prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
}

/// Publishes a database's outbox in `seq` order.
pub struct Relay {
    metrics: Option<RelayMetrics>,
    pool: AnyPool,
    bus: Arc<dyn EventBus>,
    outbox: Outbox,
    /// Lease name (the service) and this relay's identity.
    name: String,
    holder: String,
    pub batch: i64,
    /// Poll interval when nothing wakes the relay (another instance's writes).
    pub poll: Duration,
    pub lease: Duration,
}

impl Relay {
    pub fn new(pool: AnyPool, bus: Arc<dyn EventBus>, outbox: Outbox, name: &str) -> Self {
        Self {
            metrics: None,
            pool,
            bus,
            outbox,
            name: name.to_owned(),
            holder: uuid::Uuid::new_v4().to_string(),
            batch: 100,
            poll: Duration::from_millis(500),
            lease: Duration::from_secs(10),
        }
    }

    /// Exports `bazaar_outbox_pending` (events waiting) and
    /// `bazaar_outbox_oldest_age_seconds` (how late the oldest is): the relay lag.
    pub fn with_metrics(mut self, metrics: &telemetry::metrics::Metrics) -> Self {
        let m = RelayMetrics::default();
        metrics.register(
            "bazaar_outbox_pending",
            "Events in the outbox not yet published",
            m.pending.clone(),
        );
        metrics.register(
            "bazaar_outbox_oldest_age_seconds",
            "Age of the oldest event not yet published",
            m.oldest.clone(),
        );
        self.metrics = Some(m);
        self
    }

    /// Refreshes the gauges, at most once a second: a backlog is drained batch
    /// after batch, and a COUNT per batch would be work on the hot path.
    async fn observe(&self, last: &mut Option<std::time::Instant>) {
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *last = Some(std::time::Instant::now());
        if let Some(m) = &self.metrics
            && let Ok(lag) = self.lag().await
        {
            m.pending
                .set(i64::try_from(lag.pending).unwrap_or(i64::MAX));
            m.oldest.set(lag.oldest_ms as f64 / 1000.0);
        }
    }

    /// Events waiting to be published.
    pub async fn lag(&self) -> Result<Lag, sqlx::Error> {
        let row = sqlx::query("SELECT COUNT(*), MIN(created_at) FROM messaging_outbox")
            .fetch_one(&self.pool)
            .await?;
        let pending: i64 = row.try_get(0)?;
        let oldest: Option<i64> = row.try_get(1)?;
        Ok(Lag {
            pending: u64::try_from(pending).unwrap_or(0),
            oldest_ms: oldest
                .map(|t| u64::try_from(now_millis() - t).unwrap_or(0))
                .unwrap_or(0),
        })
    }

    /// Takes or renews the lease; `false` while another relay holds it.
    async fn hold_lease(&self) -> Result<bool, sqlx::Error> {
        let now = now_millis();
        let until = now + i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX);
        sqlx::query(
            "INSERT INTO messaging_outbox_lease (name, holder, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
             WHERE messaging_outbox_lease.holder = excluded.holder
                OR messaging_outbox_lease.expires_at < $4",
        )
        .bind(&self.name)
        .bind(&self.holder)
        .bind(until)
        .bind(now)
        .execute(&self.pool)
        .await?;
        let holder: String =
            sqlx::query_scalar("SELECT holder FROM messaging_outbox_lease WHERE name = $1")
                .bind(&self.name)
                .fetch_one(&self.pool)
                .await?;
        Ok(holder == self.holder)
    }

    /// Publishes one batch; returns how many were published. A key's events go one
    /// after another, in `seq` order, and a key stops at its first failure so a later
    /// event never overtakes an earlier one; different keys go concurrently (a
    /// batching client then carries them in few calls).
    pub async fn publish_batch(&self) -> Result<usize, OutboxError> {
        let rows = sqlx::query(
            "SELECT seq, topic, event_key, payload FROM messaging_outbox ORDER BY seq LIMIT $1",
        )
        .bind(self.batch)
        .fetch_all(&self.pool)
        .await?;
        let mut by_key: HashMap<(String, String), Vec<(i64, String)>> = HashMap::new();
        for row in rows {
            let seq: i64 = row.try_get(0)?;
            let topic: String = row.try_get(1)?;
            let key: String = row.try_get(2)?;
            let payload: String = row.try_get(3)?;
            by_key.entry((topic, key)).or_default().push((seq, payload));
        }
        let chains = by_key.into_iter().map(|((topic, key), rows)| async move {
            let mut done = Vec::new();
            for (seq, payload) in rows {
                match CloudEvent::from_json(payload.as_bytes()) {
                    Ok(event) => {
                        if let Err(e) = self.bus.publish(&topic, &key, &event).await {
                            tracing::warn!(error = %e, pending_from = seq, "broker unavailable; the outbox keeps the events");
                            break;
                        }
                    }
                    // Cannot happen for rows written by `enqueue`; never block on one.
                    Err(e) => {
                        tracing::error!(seq, error = %e, "dropping an outbox row that is not an event")
                    }
                }
                done.push(seq);
            }
            done
        });
        let published: Vec<i64> = futures::future::join_all(chains)
            .await
            .into_iter()
            .flatten()
            .collect();
        for chunk in published.chunks(100) {
            let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "DELETE FROM messaging_outbox WHERE seq IN ({})",
                placeholders.join(", ")
            );
            let mut query = sqlx::query(&sql);
            for seq in chunk {
                query = query.bind(*seq);
            }
            query.execute(&self.pool).await?;
        }
        Ok(published.len())
    }

    /// Relays until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut failures = 0u32;
        let mut observed = None;
        // When the lease was last confirmed: renewing it is a write, and a write per
        // batch competed with the service's own transactions, so it is renewed once a
        // third of its term has passed (well before another relay may take it).
        let mut held_since: Option<std::time::Instant> = None;
        while !shutdown.is_cancelled() {
            let fresh = held_since.is_some_and(|t| t.elapsed() < self.lease / 3);
            let holding = if fresh {
                Ok(true)
            } else {
                let held = self.hold_lease().await;
                held_since = matches!(held, Ok(true)).then(std::time::Instant::now);
                held
            };
            let pause = match holding {
                Ok(true) => match self.publish_batch().await {
                    Ok(n) if n as i64 == self.batch => Duration::ZERO,
                    Ok(0) if failures == 0 => self.poll,
                    Ok(_) => {
                        failures = 0;
                        self.poll
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(error = %e, "outbox relay failed");
                        Duration::from_secs(1)
                    }
                },
                Ok(false) => self.lease / 2,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox lease unavailable");
                    Duration::from_secs(1)
                }
            };
            self.observe(&mut observed).await;
            if pause.is_zero() {
                continue;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.outbox.written.notified() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
}
