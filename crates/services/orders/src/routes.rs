//! HTTP routes: place an order, read one, list one's own.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chassis::client::{ClientError, HttpClient};
use chassis::extract::{Json, Path, Query};
use chassis::identity::Identity;
use chassis::{FieldError, Problem};
use serde::{Deserialize, Serialize};
use sqlx::AnyPool;
use utoipa::OpenApi;
use uuid::Uuid;

use crate::catalog::{Catalog, Product};
use crate::domain::{LineInput, Lines, Order, OrderItem, SagaStep, Status};
use crate::repository::{self, InsertError, NewOrder};

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// Longest idempotency key accepted (Stripe's limit).
const MAX_KEY_LEN: usize = 255;
const DEFAULT_LIMIT: u32 = 20;
const MAX_LIMIT: u32 = 100;

#[derive(Clone)]
pub struct AppState {
    pub pool: AnyPool,
    pub client: HttpClient,
    pub max_lines: usize,
    pub max_quantity: i64,
    pub outbox: messaging::outbox::Outbox,
    pub saga: crate::saga::Saga,
    pub catalog: Catalog,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Bazaar orders",
        description = "Placing and reading orders (signed-in users)."
    ),
    paths(place_order, list_orders, get_order, admin_orders),
    components(schemas(
        PlaceOrder,
        LineInput,
        Order,
        OrderItem,
        SagaStep,
        Status,
        OrderPage,
        Problem,
        FieldError,
        AdminOrder,
        AdminLine,
        AdminOrderPage
    ))
)]
pub struct ApiDoc;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/orders", get(list_orders).post(place_order))
        .route("/orders/{id}", get(get_order))
        .route("/admin/orders", get(admin_orders))
        .with_state(state)
}

/// An order as operators see it (every user's).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AdminOrder {
    pub id: String,
    pub user_id: String,
    pub status: Status,
    pub reason: Option<String>,
    pub total_cents: i64,
    /// `[{product_id, quantity}]`
    pub items: Vec<AdminLine>,
    /// RFC 3339.
    pub created_at: String,
    /// When it ended (RFC 3339), for a CONFIRMED or CANCELLED order.
    pub ended_at: Option<String>,
    /// Milliseconds from placed to ended: the saga's completion latency.
    pub saga_ms: Option<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AdminLine {
    pub product_id: String,
    pub quantity: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AdminOrderPage {
    pub items: Vec<AdminOrder>,
    /// Pass as `after` for the next page; null on the last.
    pub next: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct AdminQuery {
    /// 1 to 1000, default 500.
    limit: Option<u32>,
    /// The `next` of the previous page.
    after: Option<String>,
}

/// Every order, oldest first (loopback only: `bazaar verify` reads it).
#[utoipa::path(get, path = "/admin/orders", params(AdminQuery),
    responses((status = 200, body = AdminOrderPage), (status = 403, body = Problem), (status = 422, body = Problem)))]
async fn admin_orders(
    _local: chassis::http::LocalOnly,
    State(state): State<AppState>,
    Query(q): Query<AdminQuery>,
) -> Result<Json<AdminOrderPage>, Problem> {
    let limit = chassis::extract::page_limit(q.limit, 500, 1000)?;
    let (items, next) =
        repository::all(&state.pool, q.after.as_deref().unwrap_or_default(), limit).await?;
    Ok(Json(AdminOrderPage { items, next }))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct PlaceOrder {
    items: Vec<LineInput>,
}

/// A page of the catalog as products answers it.
#[derive(Debug, Deserialize)]
struct CatalogPage {
    items: Vec<Product>,
}

/// Place an order. With an `Idempotency-Key`, retrying the same request returns the
/// same order; reusing the key for a different order is a 422.
#[utoipa::path(post, path = "/orders", request_body = PlaceOrder,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe")),
    responses((status = 201, body = Order), (status = 401, body = Problem), (status = 422, body = Problem),
        (status = 503, body = Problem)))]
async fn place_order(
    State(state): State<AppState>,
    identity: Identity,
    headers: HeaderMap,
    Json(body): Json<PlaceOrder>,
) -> Result<Response, Problem> {
    let key = idempotency_key(&headers)?;
    let lines = Lines::parse(&body.items, state.max_lines, state.max_quantity)
        .map_err(Problem::validation)?;
    let fingerprint = lines.fingerprint();
    let user = identity.subject.as_str();

    if let Some(key) = key
        && let Some((order, hash)) = repository::by_idempotency_key(&state.pool, user, key).await?
    {
        return replay(order, &hash, &fingerprint);
    }
    let (items, currency, total_cents) =
        price(&state.catalog, &state.pool, &state.client, &lines).await?;
    let inserted = repository::insert(
        &state.pool,
        &state.outbox,
        state.saga.orchestrator.as_ref(),
        NewOrder {
            user_id: user,
            idempotency_key: key,
            request_hash: &fingerprint,
            items,
            currency,
            total_cents,
        },
    )
    .await;
    match inserted {
        Ok(order) => {
            tracing::info!(order_id = %order.id, total_cents, "order placed");
            Ok(created(order, false))
        }
        // A concurrent request with the same key won: answer as its replay.
        Err(InsertError::DuplicateKey) => {
            let key = key.unwrap_or_default();
            match repository::by_idempotency_key(&state.pool, user, key).await? {
                Some((order, hash)) => replay(order, &hash, &fingerprint),
                None => Err(Problem::internal(
                    "idempotency key conflict without an order",
                )),
            }
        }
        Err(InsertError::Db(e)) => Err(e.into()),
        Err(InsertError::Outbox(e)) => Err(Problem::internal(format!("outbox: {e}"))),
        Err(InsertError::Saga(e)) => Err(Problem::internal(e)),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, Problem> {
    let Some(value) = headers.get(&IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(k)
            if !k.is_empty()
                && k.len() <= MAX_KEY_LEN
                && k.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(Some(k))
        }
        _ => Err(Problem::validation(vec![FieldError::new(
            "Idempotency-Key",
            format!("must be 1 to {MAX_KEY_LEN} visible ASCII characters"),
        )])),
    }
}

fn replay(order: Order, stored_hash: &str, fingerprint: &str) -> Result<Response, Problem> {
    if stored_hash != fingerprint {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "Idempotency key reused",
        )
        .with_detail(
            "this Idempotency-Key was used for a different order; use a new key for a new order",
        ));
    }
    Ok(created(order, true))
}

fn created(order: Order, replayed: bool) -> Response {
    let location = HeaderValue::from_str(&format!("/orders/{}", order.id)).ok();
    let mut response = (StatusCode::CREATED, Json(order)).into_response();
    let headers = response.headers_mut();
    if let Some(l) = location {
        headers.insert(header::LOCATION, l);
    }
    if replayed {
        headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    response
}

/// Prices every line from the replicated catalog ([`crate::catalog`]), asking products in
/// one batch call for the products not replicated yet.
async fn price(
    catalog: &Catalog,
    pool: &AnyPool,
    client: &HttpClient,
    lines: &Lines,
) -> Result<(Vec<OrderItem>, String, i64), Problem> {
    let wanted = lines.product_ids();
    // The replica first; products is asked only for what it has not heard of yet.
    let mut catalog = catalog.known(pool, &wanted).await?;
    let mut missing: Vec<String> = wanted
        .iter()
        .filter(|id| !catalog.contains_key(id))
        .map(Uuid::to_string)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if !missing.is_empty() {
        let page = ask_products(client, &missing).await?;
        catalog.extend(page.items.into_iter().map(|p| (p.id, p)));
    }
    let mut errors = Vec::new();
    let mut items = Vec::new();
    let mut currency: Option<String> = None;
    let mut total: i64 = 0;
    for (i, line) in lines.iter().enumerate() {
        let Some(product) = catalog.get(&line.product_id) else {
            errors.push(FieldError::new(
                format!("items[{i}].product_id"),
                "no such product",
            ));
            continue;
        };
        match &currency {
            Some(c) if *c != product.currency => {
                errors.push(FieldError::new(
                    format!("items[{i}].product_id"),
                    "is priced in another currency than the rest of the order",
                ));
                continue;
            }
            Some(_) => {}
            None => currency = Some(product.currency.clone()),
        }
        let line_total = product.price_cents.checked_mul(line.quantity);
        total = match line_total.and_then(|t| total.checked_add(t)) {
            Some(t) => t,
            None => {
                errors.push(FieldError::new(
                    format!("items[{i}].quantity"),
                    "makes the total too large",
                ));
                continue;
            }
        };
        items.push(OrderItem {
            product_id: product.id,
            name: product.name.clone(),
            quantity: line.quantity,
            unit_price_cents: product.price_cents,
            line_total_cents: line_total.unwrap_or_default(),
        });
    }
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    Ok((items, currency.unwrap_or_default(), total))
}

/// The catalog's page of `ids`, from products.
async fn ask_products(client: &HttpClient, ids: &[String]) -> Result<CatalogPage, Problem> {
    client
        .get_json(crate::PRODUCTS, &format!("/products?ids={}", ids.join(",")))
        .await
        .map_err(|e| match e {
            e @ (ClientError::CircuitOpen { .. }
            | ClientError::RateLimited { .. }
            | ClientError::BulkheadFull { .. }) => {
                let seconds = e.retry_after().map(|d| d.as_secs().max(1)).unwrap_or(1);
                Problem::unavailable(
                    "the catalog has been failing or is busy, so pricing is paused; try again shortly",
                )
                .with_header(header::RETRY_AFTER, HeaderValue::from(seconds))
            }
            e if e.is_unavailable() => {
                tracing::warn!(error = %e, "catalog unavailable");
                Problem::unavailable(
                    "the catalog is unavailable, so the order cannot be priced; try again shortly",
                )
            }
            e => Problem::internal(e),
        })
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OrderPage {
    pub items: Vec<Order>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    /// Page size, 1 to 100 (default 20).
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// The caller's orders, newest first.
#[utoipa::path(get, path = "/orders", params(ListQuery),
    responses((status = 200, body = OrderPage), (status = 401, body = Problem)))]
async fn list_orders(
    State(state): State<AppState>,
    identity: Identity,
    Query(query): Query<ListQuery>,
) -> Result<Json<OrderPage>, Problem> {
    let limit = chassis::extract::page_limit(query.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let before = query
        .cursor
        .as_deref()
        .map(|c| {
            URL_SAFE_NO_PAD
                .decode(c)
                .ok()
                .and_then(|b| Uuid::from_slice(&b).ok())
                .ok_or_else(|| {
                    Problem::bad_request(
                        "invalid `cursor`: pass the `next_cursor` of a previous page",
                    )
                })
        })
        .transpose()?;
    let mut items = repository::list(&state.pool, &identity.subject, before, limit + 1).await?;
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items
            .last()
            .map(|o| URL_SAFE_NO_PAD.encode(o.id.as_bytes()))
    } else {
        None
    };
    Ok(Json(OrderPage { items, next_cursor }))
}

/// One of the caller's orders. Another user's order is a 404, as if it did not exist.
#[utoipa::path(get, path = "/orders/{id}", params(("id" = Uuid, Path, description = "Order id")),
    responses((status = 200, body = Order), (status = 404, body = Problem), (status = 401, body = Problem)))]
async fn get_order(
    State(state): State<AppState>,
    identity: Identity,
    Path(id): Path<Uuid>,
) -> Result<Json<Order>, Problem> {
    let mut order = repository::get(&state.pool, &identity.subject, id)
        .await?
        .ok_or_else(|| Problem::not_found(&format!("order {id}")))?;
    order.steps = state
        .saga
        .history(&id.to_string())
        .await?
        .into_iter()
        .map(|h| SagaStep {
            step: h.step,
            what: h.what,
            at: h
                .at
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
        })
        .collect();
    Ok(Json(order))
}
