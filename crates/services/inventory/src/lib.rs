//! `inventory`: stock per product and reservations keyed by order id, a participant
//! of the place-order saga.
//!
//! Stock appears with each `product.created` (at `inventory.initial_stock`). A
//! reservation takes stock from `available` to `reserved` for one order, all items or
//! none; the order's confirmation moves it to `sold`, its cancellation (or the
//! reservation's expiry) gives it back. The database refuses negative stock and any
//! row where `available + reserved + sold` is not `initial`, whatever the code does.
//! Every change happens in one transaction with the event that announces it (outbox)
//! and the inbox claim of the message that caused it, so each message acts once.
//!
//! Orchestration: commands on `inventory.commands` (`inventory.reserve`,
//! `inventory.release`). Choreography: `order.created` reserves, `order.cancelled`
//! releases. In both, `order.confirmed` sells what was reserved, and outcomes go to
//! the `inventory` topic: `inventory.reserved`, `inventory.rejected`,
//! `inventory.released`.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use chassis::config::HumanDuration;
use chassis::config_section;
use chassis::extract::{Json, Path, Query};
use chassis::http::{Readiness, Service};
use chassis::secrecy::{ExposeSecret, SecretString};
use chassis::settings::SagaMode;
use chassis::{Chassis, Problem, ServiceConfig};
use messaging::consumer::{
    AfterCommit, HandlerError, Meta, Prepared, Store, Transactional, triage,
};
use messaging::inbox::Inbox;
use messaging::outbox::{Enqueued, Outbox};
use messaging::{BoxFuture, CloudEvent};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{AnyConnection, AnyPool, Row};
use utoipa::OpenApi;

pub const NAME: &str = "inventory";
/// Where outcomes go.
pub const TOPIC: &str = "inventory";
/// Where the orchestrator's commands come from.
pub const COMMANDS: &str = "inventory.commands";
pub const COMMAND_TYPES: &[&str] = &["inventory.reserve", "inventory.release"];
pub const ORDER_EVENTS: &[&str] = &["order.created", "order.confirmed", "order.cancelled"];
pub const PRODUCT_EVENTS: &[&str] = &["product.created"];

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Deliveries of a reservation naming a product inventory has not heard of before
/// it counts as out of stock.
const UNKNOWN_PRODUCT_ATTEMPTS: u32 = 3;

config_section! {
    /// `[inventory]`
    pub struct Settings {
        /// Listening port; 0 picks a free one.
        pub port: u16 = 0,
        /// `sqlite://...` or `postgres://...`; unset means `<data_dir>/inventory.db`.
        pub database_url: Option<SecretString> = None,
        /// Units of stock a new product starts with.
        pub initial_stock: i64 = 100,
        /// A reservation not confirmed or cancelled within this gives its stock back.
        pub reservation_ttl: HumanDuration = HumanDuration::secs(600),
    }
}

pub struct Config {
    pub service: ServiceConfig,
    pub database_url: SecretString,
    pub settings: Settings,
    pub saga_mode: SagaMode,
}

/// A product's stock.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StockLevel {
    pub product_id: String,
    /// What it started with: always `available + reserved + sold`.
    pub initial: i64,
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StockPage {
    pub items: Vec<StockLevel>,
    /// Pass as `after` for the next page; null on the last.
    pub next: Option<String>,
}

/// An order's reservation.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Reservation {
    pub order_id: String,
    /// `held`, `committed`, `released`, `expired`, `rejected` or `cancelled`.
    pub status: String,
    pub reason: Option<String>,
    /// `[{product_id, quantity}]`
    pub items: Value,
    /// RFC 3339.
    pub expires_at: String,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct PageQuery {
    /// 1 to 500, default 100.
    pub limit: Option<u32>,
    /// The `next` of the previous page.
    pub after: Option<String>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Bazaar inventory",
        description = "Stock per product and reservations per order."
    ),
    paths(stock_list, stock_one, reservation_list, reservation),
    components(schemas(StockLevel, StockPage, Reservation, ReservationPage, Problem))
)]
struct ApiDoc;

fn level(r: &sqlx::any::AnyRow) -> Result<StockLevel, sqlx::Error> {
    Ok(StockLevel {
        product_id: r.try_get(0)?,
        initial: r.try_get(1)?,
        available: r.try_get(2)?,
        reserved: r.try_get(3)?,
        sold: r.try_get(4)?,
    })
}

/// Every product's stock, by product id.
#[utoipa::path(get, path = "/inventory", params(PageQuery),
    responses((status = 200, body = StockPage), (status = 400, body = Problem)))]
async fn stock_list(
    State(pool): State<AnyPool>,
    Query(q): Query<PageQuery>,
) -> Result<Json<StockPage>, Problem> {
    let limit = chassis::extract::page_limit(q.limit, 100, 500)?;
    let rows = sqlx::query(
        "SELECT product_id, initial, available, reserved, sold FROM stock \
         WHERE product_id > $1 ORDER BY product_id LIMIT $2",
    )
    .bind(q.after.unwrap_or_default())
    .bind(i64::from(limit))
    .fetch_all(&pool)
    .await?;
    let items = rows.iter().map(level).collect::<Result<Vec<_>, _>>()?;
    let next = chassis::extract::next_after(&items, limit, |i| i.product_id.clone());
    Ok(Json(StockPage { items, next }))
}

/// One product's stock.
#[utoipa::path(get, path = "/inventory/{product_id}",
    responses((status = 200, body = StockLevel), (status = 404, body = Problem)))]
async fn stock_one(
    State(pool): State<AnyPool>,
    Path(product_id): Path<String>,
) -> Result<Json<StockLevel>, Problem> {
    let row = sqlx::query(
        "SELECT product_id, initial, available, reserved, sold FROM stock WHERE product_id = $1",
    )
    .bind(&product_id)
    .fetch_optional(&pool)
    .await?
    .ok_or_else(|| Problem::not_found("product stock"))?;
    Ok(Json(level(&row)?))
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReservationPage {
    pub items: Vec<Reservation>,
    /// Pass as `after` for the next page; null on the last.
    pub next: Option<String>,
}

fn reservation_of(row: &sqlx::any::AnyRow) -> Result<Reservation, sqlx::Error> {
    let items: String = row.try_get(3)?;
    Ok(Reservation {
        order_id: row.try_get(0)?,
        status: row.try_get(1)?,
        reason: row.try_get(2)?,
        items: serde_json::from_str(&items).unwrap_or(Value::Null),
        expires_at: chassis::clock::rfc3339(row.try_get(4)?),
    })
}

/// Every reservation, by order id.
#[utoipa::path(get, path = "/reservations", params(PageQuery),
    responses((status = 200, body = ReservationPage), (status = 422, body = Problem)))]
async fn reservation_list(
    State(pool): State<AnyPool>,
    Query(q): Query<PageQuery>,
) -> Result<Json<ReservationPage>, Problem> {
    let limit = chassis::extract::page_limit(q.limit, 100, 500)?;
    let rows = sqlx::query(
        "SELECT order_id, status, reason, items, expires_at FROM reservations \
         WHERE order_id > $1 ORDER BY order_id LIMIT $2",
    )
    .bind(q.after.unwrap_or_default())
    .bind(i64::from(limit))
    .fetch_all(&pool)
    .await?;
    let items = rows
        .iter()
        .map(reservation_of)
        .collect::<Result<Vec<_>, _>>()?;
    let next = chassis::extract::next_after(&items, limit, |i| i.order_id.clone());
    Ok(Json(ReservationPage { items, next }))
}

/// An order's reservation.
#[utoipa::path(get, path = "/reservations/{order_id}",
    responses((status = 200, body = Reservation), (status = 404, body = Problem)))]
async fn reservation(
    State(pool): State<AnyPool>,
    Path(order_id): Path<String>,
) -> Result<Json<Reservation>, Problem> {
    let row = sqlx::query(
        "SELECT order_id, status, reason, items, expires_at FROM reservations WHERE order_id = $1",
    )
    .bind(&order_id)
    .fetch_optional(&pool)
    .await?
    .ok_or_else(|| Problem::not_found("reservation"))?;
    Ok(Json(reservation_of(&row)?))
}

/// What a reserve needs to know of the order (the command's data, or the
/// `order.created` it reacts to).
#[derive(Clone, Debug, Deserialize)]
struct OrderRef {
    order_id: String,
    user_id: String,
    total_cents: i64,
    currency: String,
    items: Vec<Line>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
struct Line {
    product_id: String,
    quantity: i64,
}

fn parse<T: serde::de::DeserializeOwned>(event: &CloudEvent) -> Result<T, HandlerError> {
    serde_json::from_value(event.data.clone())
        .map_err(|e| HandlerError::Reject(format!("{}: {e}", event.ty)))
}

fn order_id(event: &CloudEvent) -> Result<String, HandlerError> {
    event.data["order_id"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| HandlerError::Reject(format!("{} has no string `order_id`", event.ty)))
}

/// The service's state and its message handlers (public for tests that drive them).
#[derive(Clone)]
pub struct Inventory {
    pub pool: AnyPool,
    pub outbox: Outbox,
    inbox: Inbox,
    initial_stock: i64,
    ttl: Duration,
    mode: SagaMode,
}

impl Inventory {
    /// Over a migrated database (installs the outbox and inbox tables).
    pub async fn new(
        pool: AnyPool,
        settings: &Settings,
        mode: SagaMode,
    ) -> Result<Self, sqlx::Error> {
        Outbox::install(&pool).await?;
        Inbox::install(&pool).await?;
        Ok(Self {
            pool,
            outbox: Outbox::new(),
            inbox: Inbox::new(NAME),
            initial_stock: settings.initial_stock.max(0),
            ttl: settings.reservation_ttl.0,
            mode,
        })
    }

    async fn emit(
        &self,
        tx: &mut AnyConnection,
        sent: &mut Vec<Enqueued>,
        order_id: &str,
        ty: &str,
        data: Value,
    ) -> Result<(), HandlerError> {
        let event = CloudEvent::new("/bazaar/inventory", ty, Some(order_id), data);
        sent.push(self.outbox.enqueue(tx, TOPIC, order_id, &event).await?);
        Ok(())
    }

    /// `products`: a new product gets its initial stock.
    pub async fn on_product(&self, event: CloudEvent, meta: Meta) -> Result<(), HandlerError> {
        self.alone(Topic::Products, &event, &meta).await
    }

    /// `inventory.commands` (orchestration).
    pub async fn on_command(&self, event: CloudEvent, meta: Meta) -> Result<(), HandlerError> {
        self.alone(Topic::Commands, &event, &meta).await
    }

    /// `orders`: a confirmed order's reservation is sold, a cancelled one's
    /// released; in choreography a new order is reserved.
    pub async fn on_order(&self, event: CloudEvent, meta: Meta) -> Result<(), HandlerError> {
        self.alone(Topic::Orders, &event, &meta).await
    }

    /// One event in a transaction of its own, claimed in the inbox (the service's
    /// consumers handle a window of events per transaction: [`Consumer`]).
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
            inventory: self.clone(),
            topic,
        };
        messaging::consumer::handle_one(&store, &consumer, event, meta).await
    }

    /// The order events this service acts on: in orchestration a new order is
    /// reserved on the orchestrator's command, not on `order.created`.
    fn order_events(&self) -> &'static [&'static str] {
        match self.mode {
            SagaMode::Choreography => ORDER_EVENTS,
            SagaMode::Orchestration => &["order.confirmed", "order.cancelled"],
        }
    }

    /// What an event of `topic` that [`Consumer`] accepts changes, in `tx` where it
    /// is claimed.
    async fn apply(
        &self,
        topic: Topic,
        tx: &mut AnyConnection,
        event: &CloudEvent,
        meta: &Meta,
        sent: &mut Vec<Enqueued>,
    ) -> Result<(), HandlerError> {
        match topic {
            Topic::Products => {
                let product_id = event.data["product_id"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| {
                        HandlerError::Reject("product.created has no `product_id`".into())
                    })?;
                let exists: Option<String> =
                    sqlx::query_scalar("SELECT product_id FROM stock WHERE product_id = $1")
                        .bind(product_id)
                        .fetch_optional(&mut *tx)
                        .await?;
                if exists.is_none() {
                    sqlx::query(
                        "INSERT INTO stock (product_id, initial, available, reserved, sold) \
                         VALUES ($1, $2, $2, 0, 0)",
                    )
                    .bind(product_id)
                    .bind(self.initial_stock)
                    .execute(&mut *tx)
                    .await?;
                }
                Ok(())
            }
            Topic::Commands => match event.ty.as_str() {
                "inventory.reserve" => {
                    let order: OrderRef = parse(event)?;
                    self.reserve(tx, &order, meta.attempt, sent).await
                }
                _ => self.release(tx, &order_id(event)?, None, sent).await,
            },
            Topic::Orders => match event.ty.as_str() {
                "order.created" => {
                    let order: OrderRef = parse(event)?;
                    self.reserve(tx, &order, meta.attempt, sent).await
                }
                "order.confirmed" => self.commit(tx, &order_id(event)?).await,
                _ => self.release(tx, &order_id(event)?, None, sent).await,
            },
        }
    }

    /// Takes the order's stock, all lines or none, and says which.
    async fn reserve(
        &self,
        tx: &mut AnyConnection,
        order: &OrderRef,
        attempt: u32,
        sent: &mut Vec<Enqueued>,
    ) -> Result<(), HandlerError> {
        let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
        for line in &order.items {
            if line.quantity <= 0 {
                return Err(HandlerError::Reject(format!(
                    "order {}: quantity {} of {} is not positive",
                    order.order_id, line.quantity, line.product_id
                )));
            }
            *wanted.entry(line.product_id.as_str()).or_default() += line.quantity;
        }
        if wanted.is_empty() {
            return Err(HandlerError::Reject(format!(
                "order {} has no items",
                order.order_id
            )));
        }
        let id = order.order_id.as_str();
        let existing: Option<(String, Option<String>)> =
            sqlx::query("SELECT status, reason FROM reservations WHERE order_id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| Ok::<_, sqlx::Error>((r.try_get(0)?, r.try_get(1)?)))
                .transpose()?;
        let now = chassis::clock::now_millis();
        match existing {
            // Asked again (a retried command): the same answer.
            Some((status, _)) if status == "held" || status == "committed" => {
                self.emit(tx, sent, id, "inventory.reserved", reserved(order))
                    .await?;
            }
            Some((status, reason)) => {
                let reason = if status == "rejected" {
                    reason.unwrap_or_else(|| "out_of_stock".to_owned())
                } else {
                    // Released, expired or cancelled before this arrived.
                    "cancelled".to_owned()
                };
                self.emit(
                    tx,
                    sent,
                    id,
                    "inventory.rejected",
                    json!({"order_id": id, "reason": reason}),
                )
                .await?;
            }
            None => {
                let short = match self.first_short(tx, &wanted).await? {
                    // Its product.created may still be on its way (a fresh shop):
                    // ask again a few times before calling it out of stock.
                    Some((product, false)) if attempt < UNKNOWN_PRODUCT_ATTEMPTS => {
                        return Err(HandlerError::Retry(format!(
                            "product {product} not known yet"
                        )));
                    }
                    short => short.map(|(product, _)| product),
                };
                let (status, reason) = match &short {
                    Some(_) => ("rejected", Some("out_of_stock")),
                    None => ("held", None),
                };
                if short.is_none() {
                    for (product, quantity) in &wanted {
                        let taken = sqlx::query(
                            "UPDATE stock SET available = available - $1, reserved = reserved + $1 \
                             WHERE product_id = $2 AND available >= $1",
                        )
                        .bind(*quantity)
                        .bind(*product)
                        .execute(&mut *tx)
                        .await?;
                        if taken.rows_affected() != 1 {
                            // Taken by a concurrent reservation since the check: the
                            // transaction rolls back and the message comes again.
                            return Err(HandlerError::Retry(format!("stock of {product} moved")));
                        }
                    }
                }
                let lines: Vec<Line> = wanted
                    .iter()
                    .map(|(p, q)| Line {
                        product_id: (*p).to_owned(),
                        quantity: *q,
                    })
                    .collect();
                let ttl = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX);
                sqlx::query(
                    "INSERT INTO reservations (order_id, status, reason, items, expires_at, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $6)",
                )
                .bind(id)
                .bind(status)
                .bind(reason)
                .bind(serde_json::to_string(&lines).unwrap_or_else(|_| "[]".to_owned()))
                .bind(now.saturating_add(ttl))
                .bind(now)
                .execute(&mut *tx)
                .await?;
                match short {
                    Some(product) => {
                        tracing::info!(order_id = id, product_id = %product, "out of stock");
                        self.emit(
                            tx,
                            sent,
                            id,
                            "inventory.rejected",
                            json!({"order_id": id, "reason": "out_of_stock", "product_id": product}),
                        )
                        .await?
                    }
                    None => {
                        self.emit(tx, sent, id, "inventory.reserved", reserved(order))
                            .await?
                    }
                }
            }
        }
        Ok(())
    }

    /// The first product whose available stock is short of what is wanted, and
    /// whether it is known at all.
    async fn first_short(
        &self,
        tx: &mut AnyConnection,
        wanted: &BTreeMap<&str, i64>,
    ) -> Result<Option<(String, bool)>, HandlerError> {
        for (product, quantity) in wanted {
            let available: Option<i64> =
                sqlx::query_scalar("SELECT available FROM stock WHERE product_id = $1")
                    .bind(*product)
                    .fetch_optional(&mut *tx)
                    .await?;
            match available {
                None => return Ok(Some(((*product).to_owned(), false))),
                Some(a) if a < *quantity => return Ok(Some(((*product).to_owned(), true))),
                Some(_) => {}
            }
        }
        Ok(None)
    }

    /// Gives a held reservation's stock back (`released`, or `expired` when its time
    /// ran out), and says so; a release before any reservation leaves a tombstone so
    /// a late reserve is refused.
    async fn release(
        &self,
        tx: &mut AnyConnection,
        order_id: &str,
        expired: Option<i64>,
        sent: &mut Vec<Enqueued>,
    ) -> Result<(), HandlerError> {
        let now = chassis::clock::now_millis();
        let status = if expired.is_some() {
            "expired"
        } else {
            "released"
        };
        let claimed = claim(tx, order_id, "held", status, now).await?;
        // An expiry that lost the race (the reservation was sold or released
        // meanwhile) says nothing: `expired` would end a running order.
        if expired.is_some() && claimed.is_none() {
            return Ok(());
        }
        match claimed {
            Some(lines) => {
                for line in &lines {
                    sqlx::query(
                        "UPDATE stock SET available = available + $1, reserved = reserved - $1 \
                         WHERE product_id = $2",
                    )
                    .bind(line.quantity)
                    .bind(&line.product_id)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            None => match status_of(tx, order_id).await?.as_deref() {
                Some("committed") => {
                    tracing::warn!(order_id, "release of a sold reservation ignored");
                }
                Some(_) => {}
                None => {
                    sqlx::query(
                            "INSERT INTO reservations (order_id, status, reason, items, expires_at, created_at, updated_at) \
                             VALUES ($1, 'cancelled', 'released before reserved', '[]', $2, $2, $2)",
                        )
                        .bind(order_id)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                }
            },
        }
        let mut data = json!({"order_id": order_id});
        if expired.is_some() {
            data["reason"] = json!("expired");
        }
        self.emit(tx, sent, order_id, "inventory.released", data)
            .await?;
        Ok(())
    }

    /// A confirmed order's reserved stock becomes sold.
    async fn commit(&self, tx: &mut AnyConnection, order_id: &str) -> Result<(), HandlerError> {
        let now = chassis::clock::now_millis();
        // Claimed as in `release` (see `claim`). A held reservation's stock is taken from
        // `reserved`; one whose time ran out before the confirmation, from
        // `available` if it is there (the reservation TTL is meant to be far
        // longer than a saga).
        let mut claimed = None;
        for (was, from) in [("held", "reserved"), ("expired", "available")] {
            if let Some(lines) = claim(tx, order_id, was, "committed", now).await? {
                claimed = Some((lines, from));
                break;
            }
        }
        let Some((lines, from)) = claimed else {
            if status_of(tx, order_id).await?.is_none() {
                tracing::warn!(order_id, "confirmed order without a reservation");
            }
            return Ok(());
        };
        for line in &lines {
            let moved = sqlx::query(&format!(
                "UPDATE stock SET {from} = {from} - $1, sold = sold + $1 \
                 WHERE product_id = $2 AND {from} >= $1"
            ))
            .bind(line.quantity)
            .bind(&line.product_id)
            .execute(&mut *tx)
            .await?;
            if moved.rows_affected() != 1 {
                tracing::error!(order_id, product_id = %line.product_id, "confirmed order whose expired reservation cannot be taken again: stock ran out");
            }
        }
        Ok(())
    }

    /// Releases reservations whose time ran out: how many.
    pub async fn expire(&self, now_ms: i64) -> Result<usize, HandlerError> {
        let due: Vec<String> = sqlx::query_scalar(
            "SELECT order_id FROM reservations WHERE status = 'held' AND expires_at <= $1 \
             ORDER BY expires_at LIMIT 100",
        )
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        for order_id in &due {
            let mut tx = self.pool.begin().await?;
            let mut sent = Vec::new();
            self.release(&mut tx, order_id, Some(now_ms), &mut sent)
                .await?;
            tx.commit().await?;
            self.outbox.committed(sent);
        }
        Ok(due.len())
    }
}

/// Moves order `order_id`'s reservation from status `from` to `to` and returns its
/// lines, or `None` when it was not in `from`. The status moves first, and only the
/// transaction that moved it moves stock: a release, an expiry and a sale of the
/// same reservation may run at once (PostgreSQL, several instances), and a status
/// read first would let two of them both see it held.
async fn claim(
    tx: &mut AnyConnection,
    order_id: &str,
    from: &str,
    to: &str,
    now: i64,
) -> Result<Option<Vec<Line>>, HandlerError> {
    macro_rules! update {
        () => {
            "UPDATE reservations SET status = $1, updated_at = $2 WHERE order_id = $3 AND status = $4"
        };
    }
    let row = messaging::sql::updated_row(
        tx,
        (update!(), concat!(update!(), " RETURNING items")),
        |query| query.bind(to).bind(now).bind(order_id).bind(from),
        sqlx::query("SELECT items FROM reservations WHERE order_id = $1").bind(order_id),
    )
    .await?;
    let items: Option<String> = row.map(|r| r.try_get(0)).transpose()?;
    items
        .map(|items| {
            serde_json::from_str(&items)
                .map_err(|e| HandlerError::Retry(format!("reservation {order_id}: {e}")))
        })
        .transpose()
}

/// The status of order `order_id`'s reservation, if it has one.
async fn status_of(tx: &mut AnyConnection, order_id: &str) -> Result<Option<String>, HandlerError> {
    Ok(
        sqlx::query_scalar("SELECT status FROM reservations WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(&mut *tx)
            .await?,
    )
}

/// The topics the service consumes.
#[derive(Clone, Copy, Debug)]
enum Topic {
    Products,
    Orders,
    Commands,
}

/// One of the service's consumers: a window of a topic's events in one transaction.
pub struct Consumer {
    inventory: Inventory,
    topic: Topic,
}

impl Transactional for Consumer {
    fn accepts(&self, event: &CloudEvent, _meta: &Meta) -> Result<bool, HandlerError> {
        match self.topic {
            Topic::Products => triage(event, PRODUCT_EVENTS, PRODUCT_EVENTS),
            Topic::Commands => triage(event, COMMAND_TYPES, COMMAND_TYPES),
            Topic::Orders => triage(event, self.inventory.order_events(), ORDER_EVENTS),
        }
    }

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
            self.inventory
                .apply(self.topic, tx, event, meta, &mut sent)
                .await?;
            after.hand_over(&self.inventory.outbox, sent);
            Ok(())
        })
    }
}

fn reserved(order: &OrderRef) -> Value {
    json!({
        "order_id": order.order_id, "user_id": order.user_id,
        "total_cents": order.total_cents, "currency": order.currency,
        "items": order.items,
    })
}

/// Builds the service; the chassis's [`Service`] runs it.
pub struct Application;

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Service> {
        let db = chassis::db::Database::connect(config.database_url.expose_secret(), &MIGRATOR)
            .await
            .context("inventory database")?;
        let inventory = Inventory::new(db.pool().clone(), &config.settings, config.saga_mode)
            .await
            .context("inventory outbox and inbox tables")?;
        let chassis = Chassis::bind(config.service)
            .await
            .context("binding the listener")?;
        let routes = Router::new()
            .route("/inventory", get(stock_list))
            .route("/inventory/{product_id}", get(stock_one))
            .route("/reservations", get(reservation_list))
            .route("/reservations/{order_id}", get(reservation))
            .with_state(db.pool().clone());
        let router = chassis.router(
            routes,
            Readiness {
                database: Some(db.clone()),
                dependencies: Vec::new(),
            },
            Some(ApiDoc::openapi()),
        );
        let pool = db.pool().clone();
        let consumer = |topic| Consumer {
            inventory: inventory.clone(),
            topic,
        };
        let expiry = inventory.clone();
        let mut service = Service::new(chassis, router, Some(db))
            .with_outbox_relay(pool.clone(), inventory.outbox.clone())
            .with_transactional_consumer("products", NAME, pool.clone(), consumer(Topic::Products))
            .with_transactional_consumer("orders", NAME, pool.clone(), consumer(Topic::Orders))
            .with_background(move |stop| async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    if let Err(e) = expiry.expire(chassis::clock::now_millis()).await {
                        tracing::warn!(error = %e, "releasing expired reservations failed; retrying");
                    }
                }
            });
        if config.saga_mode == SagaMode::Orchestration {
            service = service.with_transactional_consumer(
                COMMANDS,
                NAME,
                pool,
                consumer(Topic::Commands),
            );
        }
        Ok(service)
    }
}
