//! Reads for `bazaar verify` and people: one order's charges and refunds, and a
//! keyset-paged list of every order this service has charged or refunded.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chassis::extract::{Json, Path, Query};
use chassis::{FieldError, Problem};
use serde::{Deserialize, Serialize};
use sqlx::{AnyPool, Row};
use utoipa::OpenApi;

/// Default and largest page.
const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 500;

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Charge {
    pub charge_id: String,
    /// `charged` or `declined`.
    pub status: String,
    pub amount_cents: i64,
    pub currency: String,
    /// RFC 3339.
    pub created_at: String,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Refund {
    /// `null` when nothing had been charged: the order can then no longer be charged.
    pub refund_id: Option<String>,
    pub amount_cents: i64,
    /// RFC 3339.
    pub created_at: String,
}

/// What happened to one order's money (each list holds at most one entry).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OrderPayments {
    pub order_id: String,
    pub charges: Vec<Charge>,
    pub refunds: Vec<Refund>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PaymentPage {
    /// By order id.
    pub items: Vec<OrderPayments>,
    /// Pass as `after` for the next page; `null` on the last.
    pub next: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    /// 1 to 500, default 100.
    pub limit: Option<u32>,
    /// The `next` of the previous page.
    pub after: Option<String>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Bazaar payments",
        description = "Charges and refunds of orders, as the simulated provider decided them."
    ),
    paths(get_order, list),
    components(schemas(OrderPayments, Charge, Refund, PaymentPage, Problem, FieldError))
)]
pub struct ApiDoc;

/// The service's routes, over its database.
pub fn router(pool: AnyPool) -> Router {
    Router::new()
        .route("/payments", get(list))
        .route("/payments/{order_id}", get(get_order))
        .with_state(pool)
}

/// One order's charges and refunds; empty lists for an order never seen.
#[utoipa::path(get, path = "/payments/{order_id}",
    params(("order_id" = String, Path, description = "The order's id")),
    responses((status = 200, body = OrderPayments)))]
async fn get_order(
    State(pool): State<AnyPool>,
    Path(order_id): Path<String>,
) -> Result<Json<OrderPayments>, Problem> {
    let rows = sqlx::query(&format!("{SELECT} WHERE p.order_id = $1"))
        .bind(&order_id)
        .fetch_all(&pool)
        .await?;
    let found = rows.iter().map(order_payments).next().transpose()?;
    Ok(Json(found.unwrap_or(OrderPayments {
        order_id,
        charges: Vec::new(),
        refunds: Vec::new(),
    })))
}

/// Orders with a charge or a refund, by order id.
#[utoipa::path(get, path = "/payments", params(ListQuery),
    responses((status = 200, body = PaymentPage), (status = 400, body = Problem),
        (status = 422, body = Problem)))]
async fn list(
    State(pool): State<AnyPool>,
    Query(q): Query<ListQuery>,
) -> Result<Json<PaymentPage>, Problem> {
    let limit = chassis::extract::page_limit(q.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    // One more than asked tells whether another page follows.
    let fetch = i64::from(limit) + 1;
    let rows = match q.after.as_deref().map(decode_cursor).transpose()? {
        Some(after) => {
            sqlx::query(&format!(
                "{SELECT} WHERE p.order_id > $1 ORDER BY p.order_id LIMIT $2"
            ))
            .bind(after)
            .bind(fetch)
            .fetch_all(&pool)
            .await?
        }
        None => {
            sqlx::query(&format!("{SELECT} ORDER BY p.order_id LIMIT $1"))
                .bind(fetch)
                .fetch_all(&pool)
                .await?
        }
    };
    let mut items = rows
        .iter()
        .map(order_payments)
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let next = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|o| encode_cursor(&o.order_id))
    } else {
        None
    };
    Ok(Json(PaymentPage { items, next }))
}

/// An order has at most one charge and one refund, so the joins give one row per order.
const SELECT: &str = "SELECT p.order_id, \
    c.charge_id, c.status, c.amount_cents AS charge_cents, c.currency, c.created_at AS charged_at, \
    r.refund_id, r.amount_cents AS refund_cents, r.created_at AS refunded_at \
    FROM payment_orders p \
    LEFT JOIN charges c ON c.order_id = p.order_id \
    LEFT JOIN refunds r ON r.order_id = p.order_id";

fn order_payments(row: &sqlx::any::AnyRow) -> Result<OrderPayments, sqlx::Error> {
    let charge = match row.try_get::<Option<String>, _>("charge_id")? {
        Some(charge_id) => vec![Charge {
            charge_id,
            status: row.try_get("status")?,
            amount_cents: row.try_get("charge_cents")?,
            currency: row.try_get("currency")?,
            created_at: chassis::clock::rfc3339(row.try_get("charged_at")?),
        }],
        None => Vec::new(),
    };
    // A tombstone has no refund id, so the row's presence is read from its time.
    let refund = match row.try_get::<Option<i64>, _>("refunded_at")? {
        Some(at) => vec![Refund {
            refund_id: row.try_get("refund_id")?,
            amount_cents: row.try_get("refund_cents")?,
            created_at: chassis::clock::rfc3339(at),
        }],
        None => Vec::new(),
    };
    Ok(OrderPayments {
        order_id: row.try_get("order_id")?,
        charges: charge,
        refunds: refund,
    })
}

/// Order ids are free text: the cursor hides them from the query string's rules.
fn encode_cursor(order_id: &str) -> String {
    URL_SAFE_NO_PAD.encode(order_id.as_bytes())
}

fn decode_cursor(cursor: &str) -> Result<String, Problem> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| Problem::bad_request("invalid `after`: pass the `next` of a previous page"))
}
