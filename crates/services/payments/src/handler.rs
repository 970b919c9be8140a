//! The saga's messages. Each is handled in one transaction: the inbox claim, the
//! order's charge or refund, and the answer in the outbox, so a redelivery changes
//! nothing and an order is never charged twice.

use std::sync::Arc;

use chassis::telemetry::metrics::Metrics;
use messaging::consumer::{
    AfterCommit, HandlerError, Meta, Prepared, Store, Transactional, triage,
};
use messaging::inbox::Inbox;
use messaging::outbox::{Enqueued, Outbox};
use messaging::{BoxFuture, CloudEvent};
use serde_json::json;
use sqlx::{AnyConnection, AnyPool, Row};

use crate::metrics::PaymentMetrics;
use crate::provider::{Decision, Provider};

/// `source` of the events this service emits.
pub const SOURCE: &str = "/bazaar/payments";
/// Where the answers go: `payment.charged`, `payment.declined`, `payment.refunded`.
pub const TOPIC: &str = "payments";
/// The orchestrator's commands (orchestration mode).
pub const COMMANDS_TOPIC: &str = "payments.commands";
pub const COMMANDS: &[&str] = &["payments.charge", "payments.refund"];
/// Stock events (choreography mode): a reservation is the cue to charge.
pub const INVENTORY_TOPIC: &str = "inventory";
pub const INVENTORY_EVENTS: &[&str] = &[
    "inventory.reserved",
    "inventory.rejected",
    "inventory.released",
];
/// Order events (choreography mode): a cancellation is the cue to refund.
pub const ORDERS_TOPIC: &str = "orders";
pub const ORDER_EVENTS: &[&str] = &["order.created", "order.confirmed", "order.cancelled"];
/// `reason` of a charge the provider declined.
pub const DECLINED: &str = "payment_declined";
/// `reason` of a charge refused because the order was refunded (cancelled) first.
pub const CANCELLED: &str = "cancelled";

const CHARGED: &str = "charged";
const DECLINED_STATUS: &str = "declined";

/// A charge asked for, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChargeRequest {
    pub order_id: String,
    pub user_id: String,
    pub amount_cents: i64,
    pub currency: String,
}

impl ChargeRequest {
    /// Reads `event`'s data; `amount` names its amount field (`amount_cents` in a
    /// command, `total_cents` in `inventory.reserved`).
    pub fn from_event(event: &CloudEvent, amount: &str) -> Result<Self, HandlerError> {
        let amount_cents = event.data[amount]
            .as_i64()
            .filter(|a| *a > 0)
            .ok_or_else(|| reject(event, &format!("positive integer `{amount}`")))?;
        let currency = text(event, "currency")?;
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(reject(event, "ISO 4217 `currency` like \"EUR\""));
        }
        Ok(Self {
            order_id: text(event, "order_id")?.to_owned(),
            user_id: text(event, "user_id")?.to_owned(),
            amount_cents,
            currency: currency.to_owned(),
        })
    }
}

fn reject(event: &CloudEvent, wanted: &str) -> HandlerError {
    HandlerError::Reject(format!("{} has no {wanted}", event.ty))
}

fn text<'a>(event: &'a CloudEvent, name: &str) -> Result<&'a str, HandlerError> {
    event.data[name]
        .as_str()
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| reject(event, &format!("non-empty string `{name}`")))
}

/// What the service says about an order: one `payments` event.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Answer {
    Charged {
        charge_id: String,
        amount_cents: i64,
        currency: String,
    },
    Declined {
        reason: &'static str,
    },
    Refunded {
        refund_id: Option<String>,
        amount_cents: i64,
    },
}

impl Answer {
    fn event(&self, order_id: &str) -> CloudEvent {
        let (ty, data) = match self {
            Answer::Charged {
                charge_id,
                amount_cents,
                currency,
            } => (
                "payment.charged",
                json!({"order_id": order_id, "charge_id": charge_id,
                       "amount_cents": amount_cents, "currency": currency}),
            ),
            Answer::Declined { reason } => (
                "payment.declined",
                json!({"order_id": order_id, "reason": reason}),
            ),
            Answer::Refunded {
                refund_id,
                amount_cents,
            } => (
                "payment.refunded",
                json!({"order_id": order_id, "refund_id": refund_id, "amount_cents": amount_cents}),
            ),
        };
        CloudEvent::new(SOURCE, ty, Some(order_id), data)
    }
}

struct ChargeRow {
    charge_id: String,
    status: String,
    amount_cents: i64,
    currency: String,
}

impl ChargeRow {
    fn answer(&self) -> Answer {
        if self.status == CHARGED {
            Answer::Charged {
                charge_id: self.charge_id.clone(),
                amount_cents: self.amount_cents,
                currency: self.currency.clone(),
            }
        } else {
            Answer::Declined { reason: DECLINED }
        }
    }
}

struct RefundRow {
    /// `None`: a tombstone (nothing was charged).
    refund_id: Option<String>,
    amount_cents: i64,
}

/// The message handlers, sharing the database, the outbox and the provider.
#[derive(Clone)]
pub struct Payments {
    pool: AnyPool,
    inbox: Inbox,
    outbox: Outbox,
    provider: Arc<Provider>,
    metrics: PaymentMetrics,
}

impl Payments {
    /// Handlers over `pool` (migrated, with the inbox and outbox tables installed).
    pub fn new(pool: AnyPool, outbox: Outbox, provider: Provider) -> Self {
        Self {
            pool,
            // One inbox for every topic: event ids are UUIDv7s, unique across topics.
            inbox: Inbox::new(crate::NAME),
            outbox,
            provider: Arc::new(provider),
            metrics: PaymentMetrics::default(),
        }
    }

    /// Exports the charge and refund counters in `metrics`.
    pub fn with_metrics(self, metrics: &Metrics) -> Self {
        self.metrics.register(metrics);
        self
    }

    /// One orchestrator command from `payments.commands`.
    pub async fn command(&self, event: CloudEvent, meta: Meta) -> Result<(), HandlerError> {
        self.alone(Topic::Commands, &event, &meta).await
    }

    /// One event from `inventory` (choreography): a reservation is charged.
    pub async fn inventory_event(&self, event: CloudEvent, meta: Meta) -> Result<(), HandlerError> {
        self.alone(Topic::Inventory, &event, &meta).await
    }

    /// One event from `orders` (choreography): a cancellation is refunded.
    pub async fn order_event(&self, event: CloudEvent, meta: Meta) -> Result<(), HandlerError> {
        self.alone(Topic::Orders, &event, &meta).await
    }

    /// One event in a transaction of its own (the service's consumers handle a
    /// window of events per transaction: [`Consumer`]).
    async fn alone(
        &self,
        topic: Topic,
        event: &CloudEvent,
        meta: &Meta,
    ) -> Result<(), HandlerError> {
        let store = Store {
            pool: self.pool.clone(),
            inbox: self.inbox.clone(),
        };
        let consumer = Consumer {
            payments: self.clone(),
            topic,
        };
        messaging::consumer::handle_one(&store, &consumer, event, meta).await
    }

    /// What the provider says of a charge, asked before the transaction so its
    /// latency holds neither the order's lock nor SQLite's writer lock; `None` when
    /// the order is decided already (a re-sent command, or one refunded first): the
    /// database answers and the provider is not asked again, so it need not be up.
    async fn prepare(&self, work: &Work) -> Result<Option<Decision>, HandlerError> {
        let Work::Charge(request) = work else {
            return Ok(None);
        };
        let order_id = request.order_id.as_str();
        let (charge, refund) = records_of(&mut *self.pool.acquire().await?, order_id).await?;
        if charge.is_some() || refund.is_some() {
            Ok(None)
        } else if self.provider.in_outage() {
            Err(HandlerError::Retry("payment provider unavailable".into()))
        } else {
            // The order is the charge's idempotency key with the provider.
            Ok(Some(self.provider.authorize(order_id).await))
        }
    }

    async fn apply(
        &self,
        tx: &mut AnyConnection,
        work: &Work,
        decision: Option<Decision>,
        after: &mut AfterCommit,
    ) -> Result<(), HandlerError> {
        match work {
            Work::Charge(request) => self.charge(tx, request, decision, after).await,
            Work::Refund(order_id) => self.refund(tx, order_id, after).await,
        }
    }

    /// Charges the order once; any later request for it gets the same answer.
    async fn charge(
        &self,
        tx: &mut AnyConnection,
        request: &ChargeRequest,
        decision: Option<Decision>,
        after: &mut AfterCommit,
    ) -> Result<(), HandlerError> {
        let order_id = request.order_id.as_str();
        lock(tx, order_id).await?;
        let (charge, refund) = records_of(tx, order_id).await?;
        let (answer, outcome) = match (charge, refund, decision) {
            (Some(charge), _, _) => (charge.answer(), None),
            (None, Some(_), _) => (Answer::Declined { reason: CANCELLED }, Some(CANCELLED)),
            (None, None, Some(decision)) => {
                let charge = insert_charge(tx, request, decision).await?;
                (charge.answer(), Some(outcome_label(&charge.status)))
            }
            // Rows are never deleted, so a decided order stays decided; ask again
            // rather than guess.
            (None, None, None) => {
                return Err(HandlerError::Retry(format!(
                    "order {order_id} changed while being charged"
                )));
            }
        };
        let row = self.emit(tx, order_id, &answer).await?;
        after.hand_over(&self.outbox, [row]);
        if let Some(outcome) = outcome {
            let metrics = self.metrics.clone();
            let (order_id, amount_cents) = (order_id.to_owned(), request.amount_cents);
            after.then(move || {
                metrics.charged(outcome);
                tracing::info!(order_id, outcome, amount_cents, "charge decided");
            });
        }
        Ok(())
    }

    /// Gives the order's charge back once; with nothing charged, leaves a tombstone
    /// so a late charge is refused. Always answers (the orchestrator waits for it).
    async fn refund(
        &self,
        tx: &mut AnyConnection,
        order_id: &str,
        after: &mut AfterCommit,
    ) -> Result<(), HandlerError> {
        lock(tx, order_id).await?;
        let (charge, refund) = records_of(tx, order_id).await?;
        let (answer, outcome) = match (refund, charge) {
            (Some(refund), _) => (
                Answer::Refunded {
                    refund_id: refund.refund_id,
                    amount_cents: refund.amount_cents,
                },
                None,
            ),
            (None, Some(charge)) if charge.status == CHARGED => {
                let refund_id = uuid::Uuid::now_v7().to_string();
                insert_refund(tx, order_id, Some((&refund_id, &charge))).await?;
                let answer = Answer::Refunded {
                    refund_id: Some(refund_id),
                    amount_cents: charge.amount_cents,
                };
                (answer, Some("refunded"))
            }
            // Declined: nothing was taken, and the declined charge already answers
            // any later charge request.
            (None, Some(_)) => (nothing_refunded(), Some("nothing_charged")),
            (None, None) => {
                insert_refund(tx, order_id, None).await?;
                (nothing_refunded(), Some("nothing_charged"))
            }
        };
        let row = self.emit(tx, order_id, &answer).await?;
        after.hand_over(&self.outbox, [row]);
        if let Some(outcome) = outcome {
            let (metrics, order_id) = (self.metrics.clone(), order_id.to_owned());
            after.then(move || {
                metrics.refunded(outcome);
                tracing::info!(order_id, outcome, "refund decided");
            });
        }
        Ok(())
    }

    async fn emit(
        &self,
        tx: &mut AnyConnection,
        order_id: &str,
        answer: &Answer,
    ) -> Result<Enqueued, HandlerError> {
        self.outbox
            .enqueue(tx, TOPIC, order_id, &answer.event(order_id))
            .await
            .map_err(HandlerError::from)
    }
}

fn nothing_refunded() -> Answer {
    Answer::Refunded {
        refund_id: None,
        amount_cents: 0,
    }
}

fn outcome_label(status: &str) -> &'static str {
    if status == CHARGED {
        CHARGED
    } else {
        DECLINED_STATUS
    }
}

/// Serialises the transactions about one order (see the migration).
async fn lock(conn: &mut AnyConnection, order_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO payment_orders (order_id, updated_at) VALUES ($1, $2) \
         ON CONFLICT (order_id) DO UPDATE SET updated_at = excluded.updated_at",
    )
    .bind(order_id)
    .bind(chassis::clock::now_millis())
    .execute(conn)
    .await
    .map(|_| ())
}

/// The order's charge and its refund (or tombstone), either of them missing, in one
/// statement: a query for each was two round trips in every charge and refund, and
/// two more before each charge's transaction (whether the order is decided already).
async fn records_of(
    conn: &mut AnyConnection,
    order_id: &str,
) -> Result<(Option<ChargeRow>, Option<RefundRow>), sqlx::Error> {
    let row = sqlx::query(
        "SELECT c.charge_id, c.status, c.amount_cents, c.currency, \
                r.order_id, r.refund_id, r.amount_cents \
         FROM (SELECT $1 AS order_id) o \
         LEFT JOIN charges c ON c.order_id = o.order_id \
         LEFT JOIN refunds r ON r.order_id = o.order_id",
    )
    .bind(order_id)
    .fetch_one(conn)
    .await?;
    let charge = match row.try_get::<Option<String>, _>(0)? {
        Some(charge_id) => Some(ChargeRow {
            charge_id,
            status: row.try_get(1)?,
            amount_cents: row.try_get(2)?,
            currency: row.try_get(3)?,
        }),
        None => None,
    };
    let refund = match row.try_get::<Option<String>, _>(4)? {
        Some(_) => Some(RefundRow {
            refund_id: row.try_get(5)?,
            amount_cents: row.try_get(6)?,
        }),
        None => None,
    };
    Ok((charge, refund))
}

async fn insert_charge(
    conn: &mut AnyConnection,
    request: &ChargeRequest,
    decision: Decision,
) -> Result<ChargeRow, sqlx::Error> {
    let charge = ChargeRow {
        charge_id: uuid::Uuid::now_v7().to_string(),
        status: match decision {
            Decision::Charged => CHARGED,
            Decision::Declined => DECLINED_STATUS,
        }
        .to_owned(),
        amount_cents: request.amount_cents,
        currency: request.currency.clone(),
    };
    sqlx::query(
        "INSERT INTO charges (charge_id, order_id, user_id, status, amount_cents, currency, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&charge.charge_id)
    .bind(&request.order_id)
    .bind(&request.user_id)
    .bind(&charge.status)
    .bind(charge.amount_cents)
    .bind(&charge.currency)
    .bind(chassis::clock::now_millis())
    .execute(conn)
    .await?;
    Ok(charge)
}

/// A refund of `of` = (refund id, charge), or a tombstone when `None`.
async fn insert_refund(
    conn: &mut AnyConnection,
    order_id: &str,
    of: Option<(&str, &ChargeRow)>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO refunds (order_id, refund_id, charge_id, amount_cents, created_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(order_id)
    .bind(of.map(|(id, _)| id.to_owned()))
    .bind(of.map(|(_, c)| c.charge_id.clone()))
    .bind(of.map_or(0, |(_, c)| c.amount_cents))
    .bind(chassis::clock::now_millis())
    .execute(conn)
    .await
    .map(|_| ())
}

/// The topics the service consumes.
#[derive(Clone, Copy, Debug)]
pub enum Topic {
    /// `payments.commands` (orchestration).
    Commands,
    /// `inventory` (choreography).
    Inventory,
    /// `orders` (choreography).
    Orders,
}

/// What an event the service accepts ([`Consumer`]'s `accepts`) asks of it.
enum Work {
    Charge(ChargeRequest),
    Refund(String),
}

impl Work {
    fn of(topic: Topic, event: &CloudEvent) -> Result<Self, HandlerError> {
        Ok(match (topic, event.ty.as_str()) {
            (Topic::Commands, "payments.refund") | (Topic::Orders, _) => {
                Work::Refund(text(event, "order_id")?.to_owned())
            }
            (Topic::Commands, _) => Work::Charge(ChargeRequest::from_event(event, "amount_cents")?),
            (Topic::Inventory, _) => Work::Charge(ChargeRequest::from_event(event, "total_cents")?),
        })
    }
}

/// One of the service's consumers: a window of a topic's events in one transaction,
/// the provider asked for each charge of the window side by side before it.
pub struct Consumer {
    pub payments: Payments,
    pub topic: Topic,
}

impl Transactional for Consumer {
    fn accepts(&self, event: &CloudEvent, _meta: &Meta) -> Result<bool, HandlerError> {
        match self.topic {
            Topic::Commands => triage(event, COMMANDS, COMMANDS),
            Topic::Inventory => triage(event, &["inventory.reserved"], INVENTORY_EVENTS),
            Topic::Orders => triage(event, &["order.cancelled"], ORDER_EVENTS),
        }
    }

    fn prepare<'a>(
        &'a self,
        event: &'a CloudEvent,
        _meta: &'a Meta,
    ) -> BoxFuture<'a, Result<Prepared, HandlerError>> {
        Box::pin(async move {
            let work = Work::of(self.topic, event)?;
            let decision = self.payments.prepare(&work).await?;
            let prepared: Box<dyn std::any::Any + Send> = Box::new((work, decision));
            Ok(Some(prepared))
        })
    }

    fn handle<'a>(
        &'a self,
        tx: &'a mut AnyConnection,
        event: &'a CloudEvent,
        _meta: &'a Meta,
        prepared: Prepared,
        after: &'a mut AfterCommit,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let (work, decision) =
                match prepared.and_then(|p| p.downcast::<(Work, Option<Decision>)>().ok()) {
                    Some(p) => *p,
                    None => {
                        return Err(HandlerError::Retry(format!(
                            "event {} was not prepared",
                            event.id
                        )));
                    }
                };
            self.payments.apply(tx, &work, decision, after).await
        })
    }
}
