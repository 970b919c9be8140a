//! The transactional outbox: a service writes its events into its own database in
//! the same transaction as the state change, and a relay publishes them afterwards,
//! in order, at least once. A crash between commit and publish delays an event; it
//! never loses one, and a broker outage only makes the outbox longer.
//!
//! The producer hands what it enqueued to the relay once its transaction has
//! committed ([`Outbox::committed`]), so while the relay keeps up it publishes from
//! memory and only deletes from the table; it reads the table back when it cannot
//! trust its hand-over to be complete (at start, after a failure, when the queue
//! overflowed, when another instance of the service may have written) and every
//! poll interval in any case.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    #[error("the broker took {0} events of the batch; the outbox keeps the rest")]
    Unpublished(usize),
}

/// Writes events in the caller's transaction. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Outbox {
    written: Arc<Notify>,
    handed: Arc<Mutex<Handed>>,
}

/// Rows handed over after their commit, waiting for the relay.
#[derive(Debug, Default)]
struct Handed {
    rows: Vec<Enqueued>,
    /// Rows were committed that are not in `rows` (the queue was full, or a
    /// producer only woke the relay): it must read the table.
    read_table: bool,
}

/// Most rows waiting in the hand-over: past it (no relay runs, or it is stuck) the
/// queue is dropped and the relay reads the table instead.
const HANDED_CAP: usize = 4096;
/// Sequence numbers the relay remembers having published, so a row both read back
/// and handed over goes out once.
const RECENT_CAP: usize = 8192;
/// How long handed-over rows wait behind a missing `seq` for its row to be handed
/// over too (a transaction of this instance committing a moment later) before the
/// relay reads the table instead.
const GAP_WAIT: Duration = Duration::from_millis(5);
/// Most missing `seq`s below the highest gone out the relay lists one by one; past
/// it, it reads the table until a poll interval has passed.
const HOLES_CAP: usize = 1024;
/// Published rows are deleted together, once this many wait or the first of them
/// has waited `DELETE_AFTER`, and always before the table is read: a delete per
/// batch was a commit of its own for every batch, at a few events a batch most of
/// a relay's commits (on PostgreSQL about a third of an order's). A crash in
/// between only republishes them, as a crash between publish and delete always
/// could; `Recent` keeps them from going out twice meanwhile.
const DELETE_AT: usize = 256;
const DELETE_AFTER: Duration = Duration::from_millis(100);

/// A row [`Outbox::enqueue`] wrote. Hand it to [`Outbox::committed`] once the
/// transaction has committed; dropped, the relay finds the row at its next read.
#[derive(Debug)]
#[must_use = "hand it to Outbox::committed after the commit, or the relay finds it only when it reads the table"]
pub struct Enqueued {
    seq: i64,
    topic: String,
    key: String,
    event: CloudEvent,
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
    /// only if the transaction commits. Hand what it returns to
    /// [`Outbox::committed`] after the commit.
    pub async fn enqueue(
        &self,
        tx: &mut AnyConnection,
        topic: &str,
        key: &str,
        event: &CloudEvent,
    ) -> Result<Enqueued, OutboxError> {
        check_name(topic)?;
        macro_rules! insert {
            () => {
                "INSERT INTO messaging_outbox (topic, event_key, event_id, payload, created_at)
                 VALUES ($1, $2, $3, $4, $5)"
            };
        }
        let returning = !crate::sql::buffers_returning(tx);
        let sql = match returning {
            true => concat!(insert!(), " RETURNING seq"),
            false => insert!(),
        };
        let query = sqlx::query(sql)
            .bind(topic)
            .bind(key)
            .bind(&event.id)
            .bind(String::from_utf8_lossy(&event.to_json()).into_owned())
            .bind(now_millis());
        let seq: i64 = match returning {
            true => query.fetch_one(tx).await?.try_get(0)?,
            // The row id SQLite just gave `seq` (its INTEGER PRIMARY KEY), as the
            // driver reports it (the shop's does; sqlx's own asks).
            false => match query.execute(&mut *tx).await?.last_insert_id() {
                Some(seq) => seq,
                None => {
                    sqlx::query_scalar("SELECT last_insert_rowid()")
                        .fetch_one(tx)
                        .await?
                }
            },
        };
        Ok(Enqueued {
            seq,
            topic: topic.to_owned(),
            key: key.to_owned(),
            event: event.clone(),
        })
    }

    /// Hands rows whose transaction has committed to the relay, and wakes it: it
    /// publishes them without reading them back. Never call it for a transaction
    /// that rolled back or whose commit failed (a commit of unknown outcome is left
    /// to the relay's next read).
    /// No rows (a transaction that enqueued nothing) wake nothing.
    pub fn committed(&self, rows: impl IntoIterator<Item = Enqueued>) {
        let mut rows = rows.into_iter().peekable();
        if rows.peek().is_none() {
            return;
        }
        {
            let mut handed = self.handed.lock().unwrap_or_else(|e| e.into_inner());
            for row in rows {
                if handed.rows.len() >= HANDED_CAP {
                    handed.rows.clear();
                    handed.read_table = true;
                }
                handed.rows.push(row);
            }
        }
        self.written.notify_one();
    }

    /// Everything handed over so far, and whether the table holds rows that were not.
    fn take_handed(&self) -> (Vec<Enqueued>, bool) {
        let mut handed = self.handed.lock().unwrap_or_else(|e| e.into_inner());
        let read_table = std::mem::take(&mut handed.read_table);
        (std::mem::take(&mut handed.rows), read_table)
    }

    /// Wakes the relay without handing rows over: it reads them from the table.
    pub fn written(&self) {
        self.handed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read_table = true;
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
    reads: prometheus_client::metrics::counter::Counter,
    handed: prometheus_client::metrics::counter::Counter,
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
    /// `bazaar_outbox_oldest_age_seconds` (how late the oldest is), the relay lag;
    /// and `bazaar_outbox_reads_total` and `bazaar_outbox_handed_published_total`,
    /// which path carries the events.
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
        metrics.register(
            "bazaar_outbox_reads",
            "Times the relay read the outbox table back",
            m.reads.clone(),
        );
        metrics.register(
            "bazaar_outbox_handed_published",
            "Events published as handed over at commit, without reading the table",
            m.handed.clone(),
        );
        self.metrics = Some(m);
        self
    }

    /// Refreshes the gauges, at most once a second: a backlog is drained batch
    /// after batch, and a COUNT per batch would be work on the hot path.
    async fn observe(&self, last: &mut Option<std::time::Instant>, recent: &mut Recent) {
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *last = Some(std::time::Instant::now());
        if let Some(m) = &self.metrics
            // Rows gone out are not counted as waiting.
            && self.delete_published(recent, true).await.is_ok()
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

    /// Deletes the published rows `recent` holds, when enough wait or the oldest
    /// has waited long enough (see [`DELETE_AT`]), or at once with `now`.
    async fn delete_published(&self, recent: &mut Recent, now: bool) -> Result<(), sqlx::Error> {
        match recent.delete_due_in() {
            Some(left) if now || left.is_zero() => {}
            _ => return Ok(()),
        }
        let doomed = recent.take_undeleted();
        for chunk in doomed.chunks(DELETE_AT) {
            let sql = format!(
                "DELETE FROM messaging_outbox WHERE seq IN ({})",
                crate::sql::placeholders(chunk.len())
            );
            let mut query = sqlx::query(&sql);
            for seq in chunk {
                query = query.bind(*seq);
            }
            if let Err(e) = query.execute(&self.pool).await {
                // Published, not yet deleted: deleted with the next batch (until then
                // `recent` keeps them from going out again; deleting a row twice is
                // harmless).
                recent.keep_undeleted(doomed);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Reads one batch from the table and publishes it; returns how many rows it
    /// read.
    async fn read_and_publish(&self, recent: &mut Recent) -> Result<usize, OutboxError> {
        // Published rows first go: a read of the table's head would find them and
        // never reach the rows behind them.
        self.delete_published(recent, true).await?;
        let rows = sqlx::query(
            "SELECT seq, topic, event_key, payload FROM messaging_outbox ORDER BY seq LIMIT $1",
        )
        .bind(self.batch)
        .fetch_all(&self.pool)
        .await?;
        let read = rows.len();
        let mut out = Vec::with_capacity(read);
        for row in rows {
            let seq: i64 = row.try_get(0)?;
            let payload: String = row.try_get(3)?;
            match CloudEvent::from_json(payload.as_bytes()) {
                Ok(event) => out.push(Enqueued {
                    seq,
                    topic: row.try_get(1)?,
                    key: row.try_get(2)?,
                    event,
                }),
                // Cannot happen for rows written by `enqueue`; never block on one.
                Err(e) => {
                    tracing::error!(seq, error = %e, "dropping an outbox row that is not an event");
                    recent.delete_later(seq);
                }
            }
        }
        self.publish_rows(out, recent).await?;
        Ok(read)
    }

    /// Publishes `rows` (in `seq` order per key) and deletes what went out, with the
    /// undeletable rows `recent` kept; returns how many went out. A key's events go
    /// one after another and a key stops at its first failure, so a later event never
    /// overtakes an earlier one; different keys go concurrently (a batching client
    /// then carries them in few calls).
    async fn publish_rows(
        &self,
        rows: Vec<Enqueued>,
        recent: &mut Recent,
    ) -> Result<usize, OutboxError> {
        let mut by_key: HashMap<(String, String), Vec<(i64, CloudEvent)>> = HashMap::new();
        for row in rows {
            if recent.contains(row.seq) {
                continue;
            }
            by_key
                .entry((row.topic, row.key))
                .or_default()
                .push((row.seq, row.event));
        }
        let chains = by_key.into_iter().map(|((topic, key), mut rows)| async move {
            rows.sort_unstable_by_key(|(seq, _)| *seq);
            let mut done = Vec::new();
            for (seq, event) in rows {
                if let Err(e) = self.bus.publish(&topic, &key, &event).await {
                    tracing::warn!(error = %e, pending_from = seq, "broker unavailable; the outbox keeps the events");
                    return (done, false);
                }
                done.push(seq);
            }
            (done, true)
        });
        let mut published = Vec::new();
        let mut complete = true;
        for (done, all) in futures::future::join_all(chains).await {
            published.extend(done);
            complete &= all;
        }
        for &seq in &published {
            recent.delete_later(seq);
        }
        let count = published.len();
        self.delete_published(recent, false).await?;
        if !complete {
            return Err(OutboxError::Unpublished(count));
        }
        Ok(count)
    }

    /// Relays until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut failures = 0u32;
        let mut observed = None;
        // When the lease was last confirmed: renewing it is a write, and a write per
        // batch competed with the service's own transactions, so it is renewed once a
        // third of its term has passed (well before another relay may take it).
        let mut held_since: Option<Instant> = None;
        let mut recent = Recent::default();
        // The last read found the table drained and published all of it: every row
        // committed since is in the hand-over (or flagged), so what is handed over
        // goes out without reading the table, until the poll interval has passed.
        let mut trusted = false;
        let mut last_read: Option<Instant> = None;
        // Handed-over rows waiting behind a missing `seq`, and since when.
        let mut waiting: Vec<Enqueued> = Vec::new();
        let mut gap_since: Option<Instant> = None;
        while !shutdown.is_cancelled() {
            let fresh = held_since.is_some_and(|t| t.elapsed() < self.lease / 3);
            let holding = if fresh {
                Ok(true)
            } else {
                let held = self.hold_lease().await;
                held_since = matches!(held, Ok(true)).then(Instant::now);
                held
            };
            let (mut handed, read_table) = self.outbox.take_handed();
            if !waiting.is_empty() {
                waiting.append(&mut handed);
                handed = std::mem::take(&mut waiting);
            }
            let pause = match holding {
                Ok(true) => {
                    let mut read = !trusted
                        || read_table
                        || last_read.is_none_or(|t| t.elapsed() >= self.poll)
                        // A `seq` below the highest gone out that never went out: a
                        // transaction still open when the table was read (another
                        // instance's, or a rolled-back one). Until it shows or a poll
                        // interval passes, the table is read, so its row keeps its
                        // place before this instance's later rows of its key.
                        || recent.holes_within(self.poll);
                    let mut gap_left = None;
                    if !read {
                        // Handed-over rows must continue the highest `seq` gone out
                        // without a gap: a missing number is a transaction of this
                        // instance about to hand its row over (worth a moment's
                        // wait), or a row of another instance of the service (or, on
                        // PostgreSQL, a rolled-back transaction's), and then only a
                        // read keeps the key's order.
                        let cut = continuous(&mut handed, &recent);
                        if cut == handed.len() {
                            gap_since = None;
                        } else {
                            let waited = gap_since.get_or_insert_with(Instant::now).elapsed();
                            if waited >= GAP_WAIT {
                                read = true;
                            } else {
                                waiting = handed.split_off(cut);
                                gap_left = Some(GAP_WAIT - waited);
                            }
                        }
                    }
                    let cycle = if read {
                        // The handed rows committed before the read starts: it finds them.
                        drop(handed);
                        gap_since = None;
                        last_read = Some(Instant::now());
                        if let Some(m) = &self.metrics {
                            m.reads.inc();
                        }
                        self.read_and_publish(&mut recent)
                            .await
                            .map(|n| n as i64 == self.batch)
                    } else if handed.is_empty() {
                        self.delete_published(&mut recent, false)
                            .await
                            .map(|()| false)
                            .map_err(OutboxError::from)
                    } else {
                        let published = self.publish_rows(handed, &mut recent).await;
                        if let (Ok(count), Some(m)) = (&published, &self.metrics) {
                            m.handed.inc_by(*count as u64);
                        }
                        published.map(|_| false)
                    };
                    match cycle {
                        // A full batch: more rows wait in the table.
                        Ok(true) => {
                            failures = 0;
                            trusted = false;
                            Duration::ZERO
                        }
                        Ok(false) => {
                            failures = 0;
                            trusted = true;
                            let since = last_read.map(|t| t.elapsed()).unwrap_or_default();
                            let next_read = self.poll.saturating_sub(since);
                            [gap_left, recent.delete_due_in()]
                                .into_iter()
                                .flatten()
                                .fold(next_read, Duration::min)
                        }
                        Err(e) => {
                            failures += 1;
                            trusted = false;
                            tracing::warn!(error = %e, failures, "outbox relay failed");
                            Duration::from_secs(1)
                        }
                    }
                }
                Ok(false) => {
                    // Another instance relays; it reads what this one's producers wrote
                    // (and would publish again what this one did not delete).
                    let _ = self.delete_published(&mut recent, true).await;
                    waiting.clear();
                    trusted = false;
                    self.lease / 2
                }
                Err(e) => {
                    waiting.clear();
                    trusted = false;
                    tracing::warn!(error = %e, "outbox lease unavailable");
                    Duration::from_secs(1)
                }
            };
            self.observe(&mut observed, &mut recent).await;
            if pause.is_zero() {
                continue;
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.outbox.written.notified() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
        // What went out leaves the table, so a restart does not publish it again.
        if let Err(e) = self.delete_published(&mut recent, true).await {
            tracing::warn!(error = %e, "published outbox rows left in the table; they go out again at the next start");
        }
    }
}

/// Sorts `handed` by `seq` and says how many of them, from the first, continue the
/// highest `seq` gone out without a gap (rows at or below it are late commits of
/// this instance, which the last read could not see, and go out as they are; rows
/// gone out already are skipped when published).
fn continuous(handed: &mut [Enqueued], recent: &Recent) -> usize {
    handed.sort_unstable_by_key(|row| row.seq);
    let Some(mut next) = recent.high else {
        return 0;
    };
    for (n, row) in handed.iter().enumerate() {
        if recent.contains(row.seq) || row.seq <= next {
            continue;
        }
        if row.seq != next + 1 {
            return n;
        }
        next = row.seq;
    }
    handed.len()
}

/// What the relay published (or dropped) lately, so a row both read back and handed
/// over, or read again before its delete landed, goes out once.
#[derive(Debug, Default)]
struct Recent {
    seen: HashSet<i64>,
    order: VecDeque<i64>,
    /// Published rows not yet deleted from the table, and since when there are some.
    undeleted: Vec<i64>,
    undeleted_since: Option<Instant>,
    /// The highest `seq` gone out.
    high: Option<i64>,
    /// `seq`s below `high` that have not gone out, and since when they are missing.
    holes: BTreeMap<i64, Instant>,
    /// Since when more were missing than `holes` lists.
    blind_since: Option<Instant>,
}

impl Recent {
    fn contains(&self, seq: i64) -> bool {
        self.seen.contains(&seq)
    }

    /// Remembers `seq` as gone out; its row is deleted with the batch.
    fn delete_later(&mut self, seq: i64) {
        if let Some(high) = self.high
            && seq > high + 1
        {
            let now = Instant::now();
            let skipped = usize::try_from(seq - high - 1).unwrap_or(usize::MAX);
            if skipped.saturating_add(self.holes.len()) > HOLES_CAP {
                self.holes.clear();
                self.blind_since = Some(now);
            } else {
                self.holes
                    .extend((high + 1..seq).map(|missing| (missing, now)));
            }
        }
        self.holes.remove(&seq);
        self.high = self.high.max(Some(seq));
        if self.seen.insert(seq) {
            self.order.push_back(seq);
            if self.order.len() > RECENT_CAP
                && let Some(old) = self.order.pop_front()
            {
                self.seen.remove(&old);
            }
        }
        self.undeleted.push(seq);
        self.undeleted_since.get_or_insert_with(Instant::now);
    }

    fn take_undeleted(&mut self) -> Vec<i64> {
        self.undeleted_since = None;
        std::mem::take(&mut self.undeleted)
    }

    /// Rows whose delete failed, kept for the next.
    fn keep_undeleted(&mut self, seqs: Vec<i64>) {
        if !seqs.is_empty() {
            self.undeleted.extend(seqs);
            self.undeleted_since.get_or_insert_with(Instant::now);
        }
    }

    /// How long until the published rows are due for deletion (zero when they
    /// are); `None` when there are none.
    fn delete_due_in(&self) -> Option<Duration> {
        let since = self
            .undeleted_since
            .filter(|_| !self.undeleted.is_empty())?;
        Some(match self.undeleted.len() >= DELETE_AT {
            true => Duration::ZERO,
            false => DELETE_AFTER.saturating_sub(since.elapsed()),
        })
    }

    /// Whether some `seq` below the highest gone out has been missing for less
    /// than `within` (older ones are forgotten: rolled back, or left to the reads
    /// of the poll interval).
    fn holes_within(&mut self, within: Duration) -> bool {
        self.holes.retain(|_, since| since.elapsed() < within);
        if self
            .blind_since
            .is_some_and(|since| since.elapsed() >= within)
        {
            self.blind_since = None;
        }
        !self.holes.is_empty() || self.blind_since.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(seqs: &[i64]) -> Vec<Enqueued> {
        seqs.iter()
            .map(|&seq| Enqueued {
                seq,
                topic: "t".into(),
                key: "k".into(),
                event: CloudEvent::new("/test", "test.event", None, serde_json::json!({})),
            })
            .collect()
    }

    fn published(seqs: &[i64]) -> Recent {
        let mut recent = Recent::default();
        for &seq in seqs {
            recent.delete_later(seq);
        }
        recent
    }

    #[test]
    fn handed_rows_go_out_alone_only_up_to_a_gap() {
        let recent = published(&[1, 2, 3]);
        // Commit order is not seq order; sorted, 4 5 6 follow 3.
        let mut handed = rows(&[6, 4, 5]);
        assert_eq!(continuous(&mut handed, &recent), 3);
        assert_eq!(handed.iter().map(|r| r.seq).collect::<Vec<_>>(), [4, 5, 6]);
        // 6 is missing: another writer's row, or a transaction still open.
        assert_eq!(continuous(&mut rows(&[7, 5, 4]), &recent), 2);
        assert_eq!(continuous(&mut rows(&[5, 6]), &recent), 0);
        // Late commits below the highest gone out, and rows gone out already.
        assert_eq!(continuous(&mut rows(&[2, 3, 4]), &published(&[1, 3])), 3);
        // Nothing gone out yet: no baseline, so a read.
        assert_eq!(continuous(&mut rows(&[1]), &Recent::default()), 0);
    }

    #[test]
    fn a_seq_skipped_below_the_highest_is_a_hole_until_it_goes_out_or_ages() {
        let mut recent = published(&[1, 2, 5]);
        assert_eq!(recent.holes.keys().copied().collect::<Vec<_>>(), [3, 4]);
        assert!(recent.holes_within(Duration::from_secs(60)));
        recent.delete_later(3);
        recent.delete_later(4);
        assert!(!recent.holes_within(Duration::from_secs(60)));
        recent.delete_later(7);
        assert!(recent.holes_within(Duration::from_secs(60)));
        assert!(!recent.holes_within(Duration::ZERO), "aged out");
        // Too many to list: the relay reads until the interval has passed.
        recent.delete_later(7 + HOLES_CAP as i64 + 2);
        assert!(recent.holes.is_empty() && recent.blind_since.is_some());
        assert!(recent.holes_within(Duration::from_secs(60)));
        assert!(!recent.holes_within(Duration::ZERO));
    }

    #[test]
    fn published_rows_are_due_for_deletion_in_numbers_or_with_age() {
        let mut recent = Recent::default();
        assert_eq!(recent.delete_due_in(), None);
        recent.delete_later(1);
        let left = recent.delete_due_in().unwrap();
        assert!(left > Duration::ZERO && left <= DELETE_AFTER, "{left:?}");
        for seq in 2..=DELETE_AT as i64 {
            recent.delete_later(seq);
        }
        assert_eq!(recent.delete_due_in(), Some(Duration::ZERO), "enough wait");
        let doomed = recent.take_undeleted();
        assert_eq!(doomed.len(), DELETE_AT);
        assert_eq!(recent.delete_due_in(), None);
        // A failed delete keeps its rows, still remembered as gone out.
        recent.keep_undeleted(doomed);
        assert!(recent.delete_due_in().is_some() && recent.contains(1));
    }

    #[test]
    fn recent_forgets_the_oldest_past_its_cap() {
        let recent = published(&(0..=RECENT_CAP as i64).collect::<Vec<_>>());
        assert!(!recent.contains(0));
        assert!(recent.contains(1) && recent.contains(RECENT_CAP as i64));
        assert_eq!(recent.high, Some(RECENT_CAP as i64));
    }
}
