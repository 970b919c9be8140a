//! `recommendations`: a read model fed only by order events. Each `order.confirmed`
//! (what was really bought; created or cancelled orders teach nothing) adds one to the co-purchase count of every pair of distinct products in it
//! (exactly once per event: inbox in the same transaction), and
//! `GET /recommendations/{product_id}` answers with the products most often bought
//! with that one.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use chassis::config_section;
use chassis::extract::{Json, Path, Query};
use chassis::http::Service;
use chassis::secrecy::{ExposeSecret, SecretString};
use chassis::{Chassis, FieldError, Problem, ServiceConfig};
use messaging::consumer::{HandlerError, Meta, ReadSide, Store};
use messaging::inbox::Inbox;
use messaging::{BoxFuture, CloudEvent};
use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, AnyPool, Row};
use utoipa::OpenApi;

pub const NAME: &str = "recommendations";
/// The topic this service reads.
pub const TOPIC: &str = "orders";
/// The types the `orders` topic carries (docs/events.md); any other is dead-lettered.
pub const ORDER_EVENTS: &[&str] = &["order.created", "order.confirmed", "order.cancelled"];
/// Distinct products of one order counted at most (bounds the pairs: n * (n - 1)).
const MAX_PRODUCTS: usize = 50;

/// The schema (public for tests that drive the handler directly).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

config_section! {
    /// `[recommendations]`
    pub struct Settings {
        /// Listening port; 0 picks a free one.
        pub port: u16 = 0,
        /// `sqlite://...` or `postgres://...`; unset means `<data_dir>/recommendations.db`.
        pub database_url: Option<SecretString> = None,
    }
}

pub struct Config {
    pub service: ServiceConfig,
    pub database_url: SecretString,
    pub settings: Settings,
}

/// A product often bought with the one asked about.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Recommendation {
    pub product_id: String,
    pub name: String,
    /// Orders that had both products.
    pub orders: i64,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Recommendations {
    pub product_id: String,
    pub items: Vec<Recommendation>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct TopQuery {
    /// 1 to 50, default 5.
    pub limit: Option<u32>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Bazaar recommendations",
        description = "Products often bought together."
    ),
    paths(top),
    components(schemas(Recommendations, Recommendation, Problem, FieldError))
)]
struct ApiDoc;

/// The products most often bought with `product_id`, most frequent first.
#[utoipa::path(get, path = "/recommendations/{product_id}", params(TopQuery),
    responses((status = 200, body = Recommendations), (status = 400, body = Problem)))]
async fn top(
    State(pool): State<AnyPool>,
    Path(product_id): Path<uuid::Uuid>,
    Query(q): Query<TopQuery>,
) -> Result<Json<Recommendations>, Problem> {
    let limit = chassis::extract::page_limit(q.limit, 5, 50)?;
    let product_id = product_id.to_string();
    let rows = sqlx::query(
        "SELECT c.other_id, COALESCE(n.name, ''), c.orders FROM co_purchases c \
         LEFT JOIN product_names n ON n.product_id = c.other_id \
         WHERE c.product_id = $1 ORDER BY c.orders DESC, c.other_id LIMIT $2",
    )
    .bind(&product_id)
    .bind(i64::from(limit))
    .fetch_all(&pool)
    .await?;
    let items = rows
        .iter()
        .map(|r| {
            Ok(Recommendation {
                product_id: r.try_get(0)?,
                name: r.try_get(1)?,
                orders: r.try_get(2)?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(Recommendations { product_id, items }))
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
    handles: &["order.confirmed"],
    topic_types: ORDER_EVENTS,
    apply,
};

/// What one event from the orders topic changes, in `tx` where it is claimed.
pub fn apply<'a>(
    tx: &'a mut AnyConnection,
    event: &'a CloudEvent,
) -> BoxFuture<'a, Result<(), HandlerError>> {
    Box::pin(async move {
        // Only what was really bought: a cancelled order teaches nothing.
        if !messaging::consumer::triage(event, &["order.confirmed"], ORDER_EVENTS)? {
            return Ok(());
        }
        let items = event.data["items"]
            .as_array()
            .ok_or_else(|| HandlerError::Reject(format!("{} has no `items` array", event.ty)))?;
        // Distinct products with their names, in a stable order.
        let mut products: BTreeMap<String, String> = BTreeMap::new();
        for item in items {
            let id = item["product_id"]
                .as_str()
                .ok_or_else(|| HandlerError::Reject("an item has no string `product_id`".into()))?;
            let name = item["product_name"].as_str().unwrap_or_default();
            products.insert(id.to_owned(), name.to_owned());
        }
        let products: Vec<(String, String)> = products.into_iter().take(MAX_PRODUCTS).collect();
        for (id, name) in &products {
            sqlx::query(
                "INSERT INTO product_names (product_id, name) VALUES ($1, $2) \
                 ON CONFLICT (product_id) DO UPDATE SET name = excluded.name",
            )
            .bind(id)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        }
        for (a, _) in &products {
            for (b, _) in products.iter().filter(|(b, _)| b != a) {
                sqlx::query(
                    "INSERT INTO co_purchases (product_id, other_id, orders) VALUES ($1, $2, 1) \
                     ON CONFLICT (product_id, other_id) DO UPDATE SET orders = co_purchases.orders + 1",
                )
                .bind(a)
                .bind(b)
                .execute(&mut *tx)
                .await?;
            }
        }
        Ok(())
    })
}

/// Builds the service; the chassis's [`Service`] runs it.
pub struct Application;

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Service> {
        let db = chassis::db::Database::connect(config.database_url.expose_secret(), &MIGRATOR)
            .await
            .context("recommendations database")?;
        let chassis = Chassis::bind(config.service)
            .await
            .context("binding the listener")?;
        let routes = Router::new().route("/recommendations/{product_id}", get(top));
        Service::fed_by(chassis, db, routes, ApiDoc::openapi(), TOPIC, READ_SIDE)
            .await
            .context("recommendations inbox")
    }
}
