//! `notifications`: consumes order events and records the message each would send
//! its customer, exactly once per event (inbox in the same transaction), and serves
//! a customer their own messages.
#![forbid(unsafe_code)]

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use chassis::config_section;
use chassis::extract::{Json, Query};
use chassis::http::Service;
use chassis::identity::Identity;
use chassis::secrecy::{ExposeSecret, SecretString};
use chassis::{Chassis, Problem, ServiceConfig};
use messaging::consumer::{HandlerError, Meta, ReadSide, Store};
use messaging::inbox::Inbox;
use messaging::{BoxFuture, CloudEvent};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{AnyConnection, AnyPool, Row};
use utoipa::OpenApi;

pub const NAME: &str = "notifications";
/// The topic and consumer group this service reads.
pub const TOPIC: &str = "orders";
/// The types the `orders` topic carries (docs/events.md); any other is dead-lettered.
pub const ORDER_EVENTS: &[&str] = &["order.created", "order.confirmed", "order.cancelled"];

/// The schema (public for tests that drive the handler directly).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

config_section! {
    /// `[notifications]`
    pub struct Settings {
        /// Listening port; 0 picks a free one.
        pub port: u16 = 0,
        /// `sqlite://...` or `postgres://...`; unset means `<data_dir>/notifications.db`.
        pub database_url: Option<SecretString> = None,
    }
}

pub struct Config {
    pub service: ServiceConfig,
    pub database_url: SecretString,
    pub settings: Settings,
}

/// One message sent to a customer.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Notification {
    pub id: String,
    /// `order_received`, then `order_confirmed` or `order_cancelled`: exactly one of
    /// the last two per order that ended.
    pub kind: String,
    pub order_id: String,
    pub text: String,
    /// RFC 3339.
    pub created_at: String,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NotificationPage {
    pub items: Vec<Notification>,
}

/// A message as operators see it (every customer's).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AdminNotification {
    pub id: String,
    pub user_id: String,
    pub kind: String,
    pub order_id: String,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AdminPage {
    pub items: Vec<AdminNotification>,
    /// Pass as `after` for the next page; null on the last.
    pub next: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct AdminQuery {
    /// 1 to 1000, default 500.
    pub limit: Option<u32>,
    /// The `next` of the previous page.
    pub after: Option<String>,
}

/// Every message sent, oldest first (loopback only: `bazaar verify` reads it).
#[utoipa::path(get, path = "/admin/notifications", params(AdminQuery),
    responses((status = 200, body = AdminPage), (status = 403, body = Problem), (status = 422, body = Problem)))]
async fn admin_list(
    _local: chassis::http::LocalOnly,
    State(pool): State<AnyPool>,
    Query(q): Query<AdminQuery>,
) -> Result<Json<AdminPage>, Problem> {
    let limit = chassis::extract::page_limit(q.limit, 500, 1000)?;
    let rows = sqlx::query(
        "SELECT id, user_id, kind, order_id FROM notifications WHERE id > $1 ORDER BY id LIMIT $2",
    )
    .bind(q.after.unwrap_or_default())
    .bind(i64::from(limit))
    .fetch_all(&pool)
    .await?;
    let items = rows
        .iter()
        .map(|r| {
            Ok(AdminNotification {
                id: r.try_get(0)?,
                user_id: r.try_get(1)?,
                kind: r.try_get(2)?,
                order_id: r.try_get(3)?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let next = chassis::extract::next_after(&items, limit, |i| i.id.clone());
    Ok(Json(AdminPage { items, next }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    /// 1 to 100, default 20.
    pub limit: Option<u32>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Bazaar notifications",
        description = "The messages sent to the signed-in customer."
    ),
    paths(list, admin_list),
    components(schemas(Notification, NotificationPage, AdminNotification, AdminPage, Problem))
)]
struct ApiDoc;

/// The caller's messages, newest first.
#[utoipa::path(get, path = "/notifications", params(ListQuery),
    responses((status = 200, body = NotificationPage), (status = 401, body = Problem)))]
async fn list(
    State(pool): State<AnyPool>,
    identity: Identity,
    Query(q): Query<ListQuery>,
) -> Result<Json<NotificationPage>, Problem> {
    let limit = chassis::extract::page_limit(q.limit, 20, 100)?;
    let rows = sqlx::query(
        "SELECT id, kind, order_id, text, created_at FROM notifications \
         WHERE user_id = $1 ORDER BY id DESC LIMIT $2",
    )
    .bind(identity.subject.as_str())
    .bind(i64::from(limit))
    .fetch_all(&pool)
    .await?;
    let items = rows
        .iter()
        .map(|r| {
            Ok(Notification {
                id: r.try_get(0)?,
                kind: r.try_get(1)?,
                order_id: r.try_get(2)?,
                text: r.try_get(3)?,
                created_at: chassis::clock::rfc3339(r.try_get(4)?),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(NotificationPage { items }))
}

/// Handles one event from the orders topic in a transaction of its own, claimed in
/// `inbox` (the service's consumer runs [`apply`] for a window of events at once).
pub async fn handle(
    pool: &AnyPool,
    inbox: &Inbox,
    event: CloudEvent,
    meta: Meta,
) -> Result<(), HandlerError> {
    let store = Store {
        pool: pool.clone(),
        inbox: inbox.clone(),
    };
    messaging::consumer::handle_one(&store, &READ_SIDE, &event, &meta).await
}

/// The service's consumer of the orders topic.
pub const READ_SIDE: ReadSide = ReadSide {
    handles: ORDER_EVENTS,
    topic_types: ORDER_EVENTS,
    apply,
};

/// What one event from the orders topic changes, in `tx` where it is claimed.
pub fn apply<'a>(
    tx: &'a mut AnyConnection,
    event: &'a CloudEvent,
) -> BoxFuture<'a, Result<(), HandlerError>> {
    Box::pin(async move {
        if !messaging::consumer::triage(event, ORDER_EVENTS, ORDER_EVENTS)? {
            return Ok(());
        }
        let (kind, text) = match event.ty.as_str() {
            "order.created" => ("order_received", order_received(&event.data)?),
            "order.confirmed" => (
                "order_confirmed",
                "Your order is confirmed: it is on its way.".to_owned(),
            ),
            _ => ("order_cancelled", order_cancelled(&event.data)),
        };
        let field = |name: &str| {
            event.data[name]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| HandlerError::Reject(format!("{} has no string `{name}`", event.ty)))
        };
        let (user_id, order_id) = (field("user_id")?, field("order_id")?);
        sqlx::query(
            "INSERT INTO notifications (id, user_id, kind, order_id, text, event_id, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(&user_id)
        .bind(kind)
        .bind(&order_id)
        .bind(&text)
        .bind(&event.id)
        .bind(chassis::clock::now_millis())
        .execute(&mut *tx)
        .await?;
        tracing::info!(order_id, user_id, kind, "notification sent");
        Ok(())
    })
}

fn order_cancelled(data: &Value) -> String {
    // Stock runs out before a charge is asked for, and a declined charge took
    // nothing; an order that timed out may have been charged before the refund
    // that cancelling it brings.
    let (why, money) = match data["reason"].as_str() {
        Some("out_of_stock") => ("an item ran out of stock", "You were not charged."),
        Some("payment_declined") => ("the payment was declined", "You were not charged."),
        Some("timeout") => (
            "it could not be completed in time",
            "Any payment taken for it is refunded.",
        ),
        _ => (
            "it could not be completed",
            "Any payment taken for it is refunded.",
        ),
    };
    format!("Your order was cancelled: {why}. {money}")
}

fn order_received(data: &Value) -> Result<String, HandlerError> {
    let items = data["items"]
        .as_array()
        .ok_or_else(|| HandlerError::Reject("order.created has no `items` array".into()))?;
    let total = data["total_cents"]
        .as_i64()
        .ok_or_else(|| HandlerError::Reject("order.created has no integer `total_cents`".into()))?;
    let currency = data["currency"].as_str().unwrap_or("EUR");
    let units: i64 = items.iter().filter_map(|i| i["quantity"].as_i64()).sum();
    Ok(format!(
        "We received your order of {units} item{}: {}.{:02} {currency}.",
        if units == 1 { "" } else { "s" },
        total / 100,
        total % 100
    ))
}

/// Builds the service; the chassis's [`Service`] runs it.
pub struct Application;

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Service> {
        let db = chassis::db::Database::connect(config.database_url.expose_secret(), &MIGRATOR)
            .await
            .context("notifications database")?;
        let chassis = Chassis::bind(config.service)
            .await
            .context("binding the listener")?;
        let routes = Router::new()
            .route("/notifications", get(list))
            .route("/admin/notifications", get(admin_list));
        Service::fed_by(chassis, db, routes, ApiDoc::openapi(), TOPIC, READ_SIDE)
            .await
            .context("notifications inbox")
    }
}
