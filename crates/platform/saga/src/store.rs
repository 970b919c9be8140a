//! The orchestrator's durable side: sagas and their history live in the host
//! service's own database, and each transition is one transaction there: the saga's
//! new state, its history lines, the command it sends (through the outbox) and the
//! host's own reaction to a saga that ended. A crash loses nothing: a saga waiting for
//! a reply that never comes is retried by the timer, a reply delivered twice finds the
//! saga already past it.

use std::sync::Arc;
use std::time::Duration;

use messaging::BoxFuture;
use messaging::CloudEvent;
use messaging::outbox::{Enqueued, Outbox};
use serde_json::Value;
use sqlx::{AnyConnection, AnyPool, Row};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::machine::{Command, Definition, Input, Phase, Saga, Transition};

const SCHEMA: [&str; 3] = [
    "CREATE TABLE IF NOT EXISTS saga_instances (
        id TEXT PRIMARY KEY, definition TEXT NOT NULL, phase TEXT NOT NULL,
        step BIGINT NOT NULL, attempt BIGINT NOT NULL, deadline_ms BIGINT NOT NULL,
        reason TEXT, data TEXT NOT NULL, version BIGINT NOT NULL,
        created_ms BIGINT NOT NULL, updated_ms BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS saga_instances_due ON saga_instances (phase, deadline_ms)",
    "CREATE TABLE IF NOT EXISTS saga_history (
        saga_id TEXT NOT NULL, seq BIGINT NOT NULL, step TEXT NOT NULL,
        what TEXT NOT NULL, at_ms BIGINT NOT NULL, PRIMARY KEY (saga_id, seq))",
];

#[derive(Debug, thiserror::Error)]
pub enum SagaError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("outbox: {0}")]
    Outbox(#[from] messaging::outbox::OutboxError),
    /// Another transition of the same saga committed first: try again.
    #[error("saga {0} changed under this transition")]
    Conflict(String),
    #[error("saga {id}: stored state unreadable: {problem}")]
    Corrupt { id: String, problem: String },
}

/// A command as the host publishes it.
pub struct Outgoing {
    pub topic: String,
    pub key: String,
    pub event: CloudEvent,
}

/// Builds the event for a command (the host knows its participants' topics).
pub type Route = Arc<dyn Fn(&Saga, &Command) -> Outgoing + Send + Sync>;

/// The host's reaction to a saga that ended (an order confirmed or cancelled), run
/// in the transition's transaction; what it enqueues in the outbox goes in `sent`.
pub type OnFinish = Arc<
    dyn for<'c> Fn(
            &'c mut AnyConnection,
            &'c Saga,
            &'c mut Vec<Enqueued>,
        ) -> BoxFuture<'c, Result<(), sqlx::Error>>
        + Send
        + Sync,
>;

/// A line of a saga's history.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HistoryLine {
    pub step: String,
    pub what: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// Runs sagas of one definition. Cheap to clone.
#[derive(Clone)]
pub struct Orchestrator {
    def: Arc<Definition>,
    outbox: Outbox,
    route: Route,
    on_finish: OnFinish,
}

fn millis(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn from_millis(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

impl Orchestrator {
    pub fn new(def: Definition, outbox: Outbox, route: Route, on_finish: OnFinish) -> Self {
        Self {
            def: Arc::new(def),
            outbox,
            route,
            on_finish,
        }
    }

    pub fn definition(&self) -> &Definition {
        &self.def
    }

    /// Creates the tables if needed.
    pub async fn install(pool: &AnyPool) -> Result<(), sqlx::Error> {
        for statement in SCHEMA {
            sqlx::query(statement).execute(pool).await?;
        }
        Ok(())
    }

    /// Starts saga `id` on `data` inside the caller's transaction (the one that
    /// writes what the saga is about), sending its first command: the outbox row
    /// goes in `sent`, for [`Outbox::committed`] once the transaction has committed.
    pub async fn start(
        &self,
        tx: &mut AnyConnection,
        id: &str,
        data: Value,
        now: OffsetDateTime,
        sent: &mut Vec<Enqueued>,
    ) -> Result<Saga, SagaError> {
        let (saga, transition) = Saga::start(&self.def, id, data, now);
        sqlx::query(
            "INSERT INTO saga_instances (id, definition, phase, step, attempt, deadline_ms,
                reason, data, version, created_ms, updated_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, $9, $9)",
        )
        .bind(&saga.id)
        .bind(&self.def.name)
        .bind(saga.phase.as_str())
        .bind(i64::try_from(saga.step).unwrap_or(i64::MAX))
        .bind(i64::from(saga.attempt))
        .bind(millis(saga.deadline))
        .bind(saga.reason.as_deref())
        .bind(saga.data.to_string())
        .bind(millis(now))
        .execute(&mut *tx)
        .await?;
        self.record(tx, &saga, &transition, now, sent).await?;
        Ok(saga)
    }

    /// The saga and its history.
    pub async fn load(
        &self,
        conn: &mut AnyConnection,
        id: &str,
    ) -> Result<Option<(Saga, Vec<HistoryLine>)>, SagaError> {
        let Some((saga, _)) = self.read(conn, id).await? else {
            return Ok(None);
        };
        let rows = sqlx::query(
            "SELECT step, what, at_ms FROM saga_history WHERE saga_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
        let history = rows
            .iter()
            .map(|r| {
                Ok(HistoryLine {
                    step: r.try_get(0)?,
                    what: r.try_get(1)?,
                    at: from_millis(r.try_get(2)?),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(Some((saga, history)))
    }

    async fn read(
        &self,
        conn: &mut AnyConnection,
        id: &str,
    ) -> Result<Option<(Saga, i64)>, SagaError> {
        let Some(row) = sqlx::query(
            "SELECT phase, step, attempt, deadline_ms, reason, data, version
             FROM saga_instances WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        else {
            return Ok(None);
        };
        let corrupt = |problem: String| SagaError::Corrupt {
            id: id.to_owned(),
            problem,
        };
        let phase: String = row.try_get(0)?;
        let data: String = row.try_get(5)?;
        let saga = Saga {
            id: id.to_owned(),
            phase: Phase::parse(&phase).ok_or_else(|| corrupt(format!("phase `{phase}`")))?,
            step: usize::try_from(row.try_get::<i64, _>(1)?)
                .map_err(|e| corrupt(format!("step: {e}")))?,
            attempt: u32::try_from(row.try_get::<i64, _>(2)?)
                .map_err(|e| corrupt(format!("attempt: {e}")))?,
            deadline: from_millis(row.try_get(3)?),
            reason: row.try_get(4)?,
            data: serde_json::from_str(&data).map_err(|e| corrupt(format!("data: {e}")))?,
        };
        Ok(Some((saga, row.try_get(6)?)))
    }

    /// Applies `input` to saga `id` inside `tx`: `None` if there is no such saga or
    /// nothing changed (a duplicate or late reply), else the saga after it. The
    /// outbox rows it wrote go in `sent`, as with [`Orchestrator::start`].
    pub async fn apply(
        &self,
        tx: &mut AnyConnection,
        id: &str,
        input: Input,
        now: OffsetDateTime,
        sent: &mut Vec<Enqueued>,
    ) -> Result<Option<Saga>, SagaError> {
        let Some((mut saga, version)) = self.read(tx, id).await? else {
            return Ok(None);
        };
        let transition = saga.apply(&self.def, input, now);
        if transition.is_noop() {
            return Ok(None);
        }
        let updated = sqlx::query(
            "UPDATE saga_instances SET phase = $1, step = $2, attempt = $3, deadline_ms = $4,
                reason = $5, data = $6, version = version + 1, updated_ms = $7
             WHERE id = $8 AND version = $9",
        )
        .bind(saga.phase.as_str())
        .bind(i64::try_from(saga.step).unwrap_or(i64::MAX))
        .bind(i64::from(saga.attempt))
        .bind(millis(saga.deadline))
        .bind(saga.reason.as_deref())
        .bind(saga.data.to_string())
        .bind(millis(now))
        .bind(id)
        .bind(version)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            return Err(SagaError::Conflict(id.to_owned()));
        }
        self.record(tx, &saga, &transition, now, sent).await?;
        if saga.phase.is_terminal() {
            (self.on_finish)(tx, &saga, sent).await?;
        }
        Ok(Some(saga))
    }

    /// Writes the transition's history and sends its command.
    async fn record(
        &self,
        tx: &mut AnyConnection,
        saga: &Saga,
        transition: &Transition,
        now: OffsetDateTime,
        sent: &mut Vec<Enqueued>,
    ) -> Result<(), SagaError> {
        let mut lines: Vec<(String, String)> = transition
            .history
            .iter()
            .map(|e| (self.step_name(e.step), e.what.clone()))
            .collect();
        match saga.phase {
            Phase::Completed if transition.send.is_none() => {
                lines.push(("-".to_owned(), "completed".to_owned()))
            }
            Phase::Compensated if transition.send.is_none() => lines.push((
                "-".to_owned(),
                format!("compensated: {}", saga.reason.as_deref().unwrap_or("-")),
            )),
            _ => {}
        }
        if messaging::sql::buffers_returning(tx) {
            // One statement a line, each numbered after the saga's last: SQLite
            // answers in-process, where the one-statement form below (an `INSERT`
            // reading its own table) built three temporary tables each time.
            for (step, what) in lines {
                sqlx::query(
                    "INSERT INTO saga_history (saga_id, seq, step, what, at_ms) VALUES ($1, \
                     (SELECT COALESCE(MAX(seq), 0) + 1 FROM saga_history WHERE saga_id = $1), $2, $3, $4)",
                )
                .bind(&saga.id)
                .bind(step)
                .bind(what)
                .bind(millis(now))
                .execute(&mut *tx)
                .await?;
            }
        } else if !lines.is_empty() {
            // Numbered after the saga's last line and written in one statement: each
            // statement is a round trip to PostgreSQL. A VALUES list's columns are
            // column1, column2...
            let values: Vec<String> = (0..lines.len())
                .map(|n| format!("({}, ${}, ${})", n + 1, 3 + 2 * n, 4 + 2 * n))
                .collect();
            let sql = format!(
                "INSERT INTO saga_history (saga_id, seq, step, what, at_ms) \
                 SELECT $1, base.m + v.column1, v.column2, v.column3, $2 \
                 FROM (SELECT COALESCE(MAX(seq), 0) AS m FROM saga_history WHERE saga_id = $1) AS base, \
                 (VALUES {}) AS v",
                values.join(", ")
            );
            let mut query = sqlx::query(&sql).bind(&saga.id).bind(millis(now));
            for (step, what) in lines {
                query = query.bind(step).bind(what);
            }
            query.execute(&mut *tx).await?;
        }
        if let Some(command) = &transition.send {
            let out = (self.route)(saga, command);
            sent.push(
                self.outbox
                    .enqueue(tx, &out.topic, &out.key, &out.event)
                    .await?,
            );
        }
        Ok(())
    }

    fn step_name(&self, step: usize) -> String {
        self.def
            .steps
            .get(step)
            .map_or_else(|| "-".to_owned(), |s| s.name.clone())
    }

    /// Sagas whose current attempt is past its deadline.
    pub async fn due(
        &self,
        pool: &AnyPool,
        now: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<String>, SagaError> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM saga_instances
             WHERE phase IN ('running', 'compensating') AND deadline_ms <= $1 AND definition = $2
             ORDER BY deadline_ms LIMIT $3",
        )
        .bind(millis(now))
        .bind(&self.def.name)
        .bind(limit)
        .fetch_all(pool)
        .await?)
    }

    /// Retries or gives up what is past its deadline, each saga in its own
    /// transaction: how many changed.
    pub async fn tick(&self, pool: &AnyPool, now: OffsetDateTime) -> Result<usize, SagaError> {
        let mut changed = 0;
        for id in self.due(pool, now, 500).await? {
            let mut tx = pool.begin().await?;
            let mut sent = Vec::new();
            match self.apply(&mut tx, &id, Input::Tick, now, &mut sent).await {
                Ok(Some(_)) => {
                    tx.commit().await?;
                    self.outbox.committed(sent);
                    changed += 1;
                }
                Ok(None) => tx.rollback().await?,
                // A reply got there first; the next tick sees the new state.
                Err(SagaError::Conflict(_)) => tx.rollback().await?,
                Err(e) => return Err(e),
            }
        }
        Ok(changed)
    }

    /// Ticks every `every` until `stop`: after a crash, this is what resumes the
    /// sagas in flight (with the replies still on their way).
    pub async fn run_timer(self, pool: AnyPool, every: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.tick(&pool, OffsetDateTime::now_utc()).await {
                tracing::warn!(saga = %self.def.name, error = %e, "saga timer failed; retrying");
            }
        }
    }
}
