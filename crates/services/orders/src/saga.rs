//! The place-order saga: reserve stock (`inventory`), charge (`payments`), confirm;
//! on failure, refund and release in reverse, and cancel the order with a reason
//! (`out_of_stock`, `payment_declined`, `timeout`).
//!
//! Two styles with the same outcomes, chosen by `[saga] mode`:
//! - orchestration: a durable [`Orchestrator`] here sends commands
//!   (`inventory.commands`, `payments.commands`) and takes the participants' outcome
//!   events as replies;
//! - choreography: nobody commands; `inventory` reserves on `order.created`,
//!   `payments` charges on `inventory.reserved`, and this service confirms on
//!   `payment.charged` or cancels on `inventory.rejected` / `payment.declined` (or
//!   when an order stays PENDING too long); the cancellation's `order.cancelled` is
//!   what makes the others refund and release.
//!
//! Either way an order ends exactly once: the status moves from PENDING only, in the
//! transaction that emits `order.confirmed` or `order.cancelled`.

use std::sync::Arc;
use std::time::Duration;

use messaging::consumer::{
    AfterCommit, HandlerError, Meta, Prepared, Store, Transactional, triage,
};
use messaging::inbox::Inbox;
use messaging::outbox::{Enqueued, Outbox};
use messaging::{BoxFuture, CloudEvent};
use saga::machine::{Definition, Direction, Input, Phase, Reply};
use saga::store::{HistoryLine, OnFinish, Orchestrator, Outgoing, Route, SagaError};
use serde_json::{Value, json};
use sqlx::{AnyConnection, AnyPool, Row};
use time::OffsetDateTime;

use crate::domain::Status;
use crate::repository::{SOURCE, TOPIC};

/// The outcome events of the participants.
pub const INVENTORY: &str = "inventory";
pub const INVENTORY_EVENTS: &[&str] = &[
    "inventory.reserved",
    "inventory.rejected",
    "inventory.released",
];
pub const PAYMENTS: &str = "payments";
pub const PAYMENT_EVENTS: &[&str] = &["payment.charged", "payment.declined", "payment.refunded"];

const RESERVE: usize = 0;
const CHARGE: usize = 1;

/// The saga's steps.
pub fn definition(step_timeout: Duration, attempts: u32) -> Definition {
    Definition::new("place-order")
        .step("reserve", step_timeout, attempts, true)
        .step("charge", step_timeout, attempts, true)
}

/// How an order ends.
pub enum Outcome<'a> {
    Confirmed,
    Cancelled(&'a str),
}

/// Ends a PENDING order and emits what it became, in `tx`: false if it had
/// already ended (a second outcome changes nothing).
pub async fn finish(
    tx: &mut AnyConnection,
    outbox: &Outbox,
    order_id: &str,
    outcome: Outcome<'_>,
    sent: &mut Vec<Enqueued>,
) -> Result<bool, sqlx::Error> {
    let (status, reason, ty) = match outcome {
        Outcome::Confirmed => (Status::Confirmed, None, "order.confirmed"),
        Outcome::Cancelled(reason) => (Status::Cancelled, Some(reason), "order.cancelled"),
    };
    let now = chassis::clock::now_millis();
    macro_rules! update {
        () => {
            "UPDATE orders SET status = $1, reason = $2, updated_at = $3 WHERE id = $4 AND status = 'PENDING'"
        };
    }
    // On PostgreSQL the order's head comes back with the update (RETURNING); SQLite
    // reads it after (see messaging::sql::buffers_returning).
    let head = messaging::sql::updated_row(
        tx,
        (
            update!(),
            concat!(update!(), " RETURNING user_id, total_cents, currency"),
        ),
        |query| {
            query
                .bind(status.as_str())
                .bind(reason)
                .bind(now)
                .bind(order_id)
        },
        sqlx::query("SELECT user_id, total_cents, currency FROM orders WHERE id = $1")
            .bind(order_id),
    )
    .await?;
    let Some(head) = head else {
        return Ok(false);
    };
    let items = sqlx::query(
        "SELECT product_id, product_name, quantity, unit_price_cents FROM order_items \
         WHERE order_id = $1 ORDER BY line",
    )
    .bind(order_id)
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(|r| {
        Ok(json!({
            "product_id": r.try_get::<String, _>(0)?, "product_name": r.try_get::<String, _>(1)?,
            "quantity": r.try_get::<i64, _>(2)?, "unit_price_cents": r.try_get::<i64, _>(3)?,
        }))
    })
    .collect::<Result<Vec<Value>, sqlx::Error>>()?;
    let mut data = json!({
        "order_id": order_id,
        "user_id": head.try_get::<String, _>(0)?,
        "status": status.as_str(),
        "total_cents": head.try_get::<i64, _>(1)?,
        "currency": head.try_get::<String, _>(2)?,
        "items": items,
    });
    if let Some(reason) = reason {
        data["reason"] = json!(reason);
    }
    let event = CloudEvent::new(SOURCE, ty, Some(order_id), data);
    sent.push(
        outbox
            .enqueue(tx, TOPIC, order_id, &event)
            .await
            .map_err(|e| sqlx::Error::Protocol(e.to_string()))?,
    );
    tracing::info!(order_id, status = status.as_str(), reason, "order ended");
    Ok(true)
}

/// The orchestrator of place-order: commands built from the saga's data (the
/// order), the order ended in the transaction that ends the saga.
pub fn orchestrator(definition: Definition, outbox: Outbox) -> Orchestrator {
    let route: Route = Arc::new(|saga, command| {
        let order = &saga.data;
        let (topic, ty, data) = match (command.step, command.direction) {
            (RESERVE, Direction::Do) => ("inventory.commands", "inventory.reserve", order.clone()),
            (RESERVE, Direction::Undo) => (
                "inventory.commands",
                "inventory.release",
                json!({"order_id": saga.id}),
            ),
            (_, Direction::Do) => (
                "payments.commands",
                "payments.charge",
                json!({
                    "order_id": saga.id, "user_id": order["user_id"],
                    "amount_cents": order["total_cents"], "currency": order["currency"],
                }),
            ),
            (_, Direction::Undo) => (
                "payments.commands",
                "payments.refund",
                json!({"order_id": saga.id}),
            ),
        };
        Outgoing {
            topic: topic.to_owned(),
            key: saga.id.clone(),
            event: CloudEvent::new(SOURCE, ty, Some(&saga.id), data),
        }
    });
    let finisher = outbox.clone();
    let on_finish: OnFinish = Arc::new(
        move |tx: &mut AnyConnection, saga, sent| -> BoxFuture<'_, Result<(), sqlx::Error>> {
            let outbox = finisher.clone();
            let id = saga.id.clone();
            let reason = saga.reason.clone().unwrap_or_else(|| "timeout".to_owned());
            let confirmed = saga.phase == Phase::Completed;
            Box::pin(async move {
                let outcome = if confirmed {
                    Outcome::Confirmed
                } else {
                    Outcome::Cancelled(&reason)
                };
                finish(tx, &outbox, &id, outcome, sent).await.map(|_| ())
            })
        },
    );
    Orchestrator::new(definition, outbox, route, on_finish)
}

/// A participant's outcome event as a reply to the orchestrator.
fn as_reply(event: &CloudEvent) -> Option<(usize, Direction, Reply)> {
    let reason = || event.data["reason"].as_str().unwrap_or("failed").to_owned();
    Some(match event.ty.as_str() {
        "inventory.reserved" => (RESERVE, Direction::Do, Reply::Done(Value::Null)),
        "inventory.rejected" => (RESERVE, Direction::Do, Reply::Failed(reason())),
        "inventory.released" => (RESERVE, Direction::Undo, Reply::Done(Value::Null)),
        "payment.charged" => (
            CHARGE,
            Direction::Do,
            Reply::Done(json!({"charge_id": event.data["charge_id"]})),
        ),
        "payment.declined" => (CHARGE, Direction::Do, Reply::Failed(reason())),
        "payment.refunded" => (CHARGE, Direction::Undo, Reply::Done(Value::Null)),
        _ => return None,
    })
}

fn order_id(event: &CloudEvent) -> Result<String, HandlerError> {
    event.data["order_id"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| HandlerError::Reject(format!("{} has no string `order_id`", event.ty)))
}

/// The handlers of the participants' events, for either style.
#[derive(Clone)]
pub struct Saga {
    pub pool: AnyPool,
    pub outbox: Outbox,
    inbox: Inbox,
    /// `None` in choreography.
    pub orchestrator: Option<Orchestrator>,
}

impl Saga {
    pub fn new(pool: AnyPool, outbox: Outbox, orchestrator: Option<Orchestrator>) -> Self {
        Self {
            pool,
            outbox,
            inbox: Inbox::new(crate::NAME),
            orchestrator,
        }
    }

    /// An event of `inventory` or `payments`, in a transaction of its own.
    pub async fn on_event(&self, event: CloudEvent, meta: Meta) -> Result<(), HandlerError> {
        let store = Store {
            pool: self.pool.clone(),
            inbox: self.inbox.clone(),
        };
        messaging::consumer::handle_one(&store, self, &event, &meta).await
    }

    /// What an event of `inventory` or `payments` changes, in `tx` where it is
    /// claimed: the orchestrator's next step, or (choreography) the order's history
    /// and end.
    async fn apply(
        &self,
        tx: &mut AnyConnection,
        event: &CloudEvent,
        meta: &Meta,
        sent: &mut Vec<Enqueued>,
    ) -> Result<(), HandlerError> {
        let declared = if meta.topic == INVENTORY {
            INVENTORY_EVENTS
        } else {
            PAYMENT_EVENTS
        };
        if !triage(event, declared, declared)? {
            return Ok(());
        }
        let order_id = order_id(event)?;
        let Some((step, direction, reply)) = as_reply(event) else {
            return Ok(());
        };
        // A reservation inventory released because its time ran out, not because
        // it was asked to: an order still running has lost its stock and ends as
        // timed out (its charge, if any, refunded).
        let expired =
            event.ty == "inventory.released" && event.data["reason"].as_str() == Some("expired");
        match &self.orchestrator {
            Some(orchestrator) => {
                let input = match expired {
                    true => Input::Abort("timeout".to_owned()),
                    false => Input::Reply {
                        step,
                        direction,
                        reply,
                    },
                };
                match orchestrator
                    .apply(tx, &order_id, input, OffsetDateTime::now_utc(), sent)
                    .await
                {
                    Ok(_) => {}
                    Err(SagaError::Database(e)) => return Err(e.into()),
                    Err(e) => return Err(HandlerError::Retry(e.to_string())),
                }
            }
            None => {
                let name = if step == RESERVE { "reserve" } else { "charge" };
                let what = match (&direction, &reply) {
                    _ if expired => "expired".to_owned(),
                    (Direction::Do, Reply::Done(_)) => "done".to_owned(),
                    (Direction::Do, Reply::Failed(reason)) => format!("failed: {reason}"),
                    (Direction::Undo, _) => "compensated".to_owned(),
                };
                record_step(tx, &order_id, name, &what).await?;
                let outcome = match (step, direction, &reply) {
                    _ if expired => Some(Outcome::Cancelled("timeout")),
                    (CHARGE, Direction::Do, Reply::Done(_)) => Some(Outcome::Confirmed),
                    (_, Direction::Do, Reply::Failed(reason)) => Some(Outcome::Cancelled(reason)),
                    _ => None,
                };
                if let Some(outcome) = outcome {
                    finish(tx, &self.outbox, &order_id, outcome, sent).await?;
                }
            }
        }
        Ok(())
    }

    /// Choreography's timeout: orders PENDING since before `cutoff_ms` are
    /// cancelled (their `order.cancelled` makes the others refund and release).
    pub async fn cancel_stale(&self, cutoff_ms: i64) -> Result<usize, sqlx::Error> {
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM orders WHERE status = 'PENDING' AND created_at < $1 ORDER BY created_at LIMIT 200",
        )
        .bind(cutoff_ms)
        .fetch_all(&self.pool)
        .await?;
        let mut cancelled = 0;
        for id in stale {
            let mut tx = self.pool.begin().await?;
            let mut sent = Vec::new();
            let outcome = Outcome::Cancelled("timeout");
            if finish(&mut tx, &self.outbox, &id, outcome, &mut sent).await? {
                record_step(&mut tx, &id, "-", "no outcome in time").await?;
                cancelled += 1;
            }
            tx.commit().await?;
            self.outbox.committed(sent);
        }
        Ok(cancelled)
    }

    /// The saga's history of an order, oldest first.
    pub async fn history(&self, order_id: &str) -> Result<Vec<HistoryLine>, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        if let Some(orchestrator) = &self.orchestrator {
            return match orchestrator.load(&mut conn, order_id).await {
                Ok(found) => Ok(found.map(|(_, history)| history).unwrap_or_default()),
                Err(SagaError::Database(e)) => Err(e),
                Err(e) => Err(sqlx::Error::Protocol(e.to_string())),
            };
        }
        let rows = sqlx::query(
            "SELECT step, what, at_ms FROM order_steps WHERE order_id = $1 ORDER BY seq",
        )
        .bind(order_id)
        .fetch_all(&mut *conn)
        .await?;
        rows.iter()
            .map(|r| {
                let at: i64 = r.try_get(2)?;
                Ok(HistoryLine {
                    step: r.try_get(0)?,
                    what: r.try_get(1)?,
                    at: OffsetDateTime::from_unix_timestamp_nanos(i128::from(at) * 1_000_000)
                        .unwrap_or(OffsetDateTime::UNIX_EPOCH),
                })
            })
            .collect()
    }
}

async fn record_step(
    tx: &mut AnyConnection,
    order_id: &str,
    step: &str,
    what: &str,
) -> Result<(), sqlx::Error> {
    // The next number and the line in one statement: each statement is a round trip
    // to the database (for SQLite, to its connection's thread).
    sqlx::query(
        "INSERT INTO order_steps (order_id, seq, step, what, at_ms) \
         SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3, $4 FROM order_steps WHERE order_id = $1",
    )
    .bind(order_id)
    .bind(step)
    .bind(what)
    .bind(chassis::clock::now_millis())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The consumer of the participants' events handles a window of them in one
/// transaction; the relay is woken once it has committed.
impl Transactional for Saga {
    fn handle<'a>(
        &'a self,
        tx: &'a mut AnyConnection,
        event: &'a CloudEvent,
        meta: &'a Meta,
        _prepared: Prepared,
        after: &'a mut AfterCommit,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let mut sent = Vec::new();
            self.apply(tx, event, meta, &mut sent).await?;
            after.hand_over(&self.outbox, sent);
            Ok(())
        })
    }
}
