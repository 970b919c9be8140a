//! HTTP routes of the catalog.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chassis::extract::{Json, Path, Query};
use chassis::{FieldError, Problem};
use serde::{Deserialize, Serialize};
use sqlx::AnyPool;
use utoipa::OpenApi;
use uuid::Uuid;

use crate::domain::Product;
use crate::repository;

/// Page size when the caller gives none.
const DEFAULT_LIMIT: u32 = 20;
/// Largest page, and the most ids one batch read may ask for.
const MAX_LIMIT: u32 = 100;
/// Longest search text: longer is never a real search.
const MAX_QUERY_LEN: usize = 100;

#[derive(Clone)]
pub struct AppState {
    pub pool: AnyPool,
    /// What catalog reads say of their freshness: see [`cache_control`].
    pub cache_control: HeaderValue,
}

/// `Cache-Control` for catalog reads that may be reused for `max_age`: shared
/// caches included (the catalog is the same for every caller), `no-cache` for zero.
pub fn cache_control(max_age: std::time::Duration) -> HeaderValue {
    match max_age.as_secs() {
        0 => HeaderValue::from_static("no-cache"),
        secs => HeaderValue::try_from(format!("public, max-age={secs}"))
            .unwrap_or(HeaderValue::from_static("no-cache")),
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Bazaar products", description = "The catalog: public reads."),
    paths(list_products, get_product),
    components(schemas(Product, ProductPage, Problem, FieldError))
)]
pub struct ApiDoc;

pub fn router(state: AppState) -> Router {
    let cache_control = state.cache_control.clone();
    Router::new()
        .route("/products", get(list_products))
        .route("/products/{id}", get(get_product))
        // Only found answers: a problem (a bad id, an unknown product) is not worth
        // keeping.
        .layer(axum::middleware::map_response(
            move |mut response: Response| {
                let cache_control = cache_control.clone();
                async move {
                    if response.status() == StatusCode::OK {
                        response
                            .headers_mut()
                            .insert(header::CACHE_CONTROL, cache_control);
                    }
                    response
                }
            },
        ))
        .with_state(state)
}

/// A page of products.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProductPage {
    pub items: Vec<Product>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    /// Page size, 1 to 100 (default 20).
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Case-insensitive search in name and description.
    q: Option<String>,
    /// Batch read: comma-separated ids (at most 100); unknown ids are left out.
    ids: Option<String>,
}

/// List, search, or batch-read products.
#[utoipa::path(get, path = "/products", params(ListQuery),
    responses((status = 200, body = ProductPage), (status = 400, body = Problem), (status = 422, body = Problem)))]
async fn list_products(
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
) -> Result<Json<ProductPage>, Problem> {
    if let Some(ids) = query.ids {
        if query.cursor.is_some() || query.q.is_some() || query.limit.is_some() {
            return Err(Problem::bad_request(
                "`ids` is a batch read and cannot be combined with `cursor`, `q` or `limit`",
            ));
        }
        let ids = parse_ids(&ids)?;
        let items = repository::get_many(&state.pool, &ids).await?;
        return Ok(Json(ProductPage {
            items,
            next_cursor: None,
        }));
    }
    let limit = chassis::extract::page_limit(query.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let after = query.cursor.as_deref().map(decode_cursor).transpose()?;
    let search = query.q.as_deref().map(str::trim).filter(|q| !q.is_empty());
    if search.is_some_and(|q| q.chars().count() > MAX_QUERY_LEN) {
        return Err(Problem::validation(vec![FieldError::new(
            "q",
            format!("must be at most {MAX_QUERY_LEN} characters"),
        )]));
    }
    // One extra row tells whether there is a next page.
    let mut items = repository::list(&state.pool, after, search, limit + 1).await?;
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|p| encode_cursor(p.id))
    } else {
        None
    };
    Ok(Json(ProductPage { items, next_cursor }))
}

/// One product.
#[utoipa::path(get, path = "/products/{id}",
    params(("id" = Uuid, Path, description = "Product id")),
    responses((status = 200, body = Product), (status = 404, body = Problem), (status = 400, body = Problem)))]
async fn get_product(
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
) -> Result<Json<Product>, Problem> {
    repository::get(&state.pool, id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(&format!("product {id}")))
}

fn parse_ids(raw: &str) -> Result<Vec<Uuid>, Problem> {
    let parts: Vec<&str> = raw
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if parts.is_empty() || parts.len() > MAX_LIMIT as usize {
        return Err(Problem::validation(vec![FieldError::new(
            "ids",
            format!("give between 1 and {MAX_LIMIT} comma-separated ids"),
        )]));
    }
    let mut ids = Vec::with_capacity(parts.len());
    let mut errors = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        match Uuid::parse_str(part) {
            Ok(id) if !ids.contains(&id) => ids.push(id),
            Ok(_) => {}
            Err(_) => errors.push(FieldError::new(format!("ids[{i}]"), "is not a UUID")),
        }
    }
    if errors.is_empty() {
        Ok(ids)
    } else {
        Err(Problem::validation(errors))
    }
}

fn encode_cursor(id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(id.as_bytes())
}

fn decode_cursor(cursor: &str) -> Result<Uuid, Problem> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| Uuid::from_slice(&bytes).ok())
        .ok_or_else(|| {
            Problem::bad_request("invalid `cursor`: pass the `next_cursor` of a previous page")
        })
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use chassis::testing::{Engine, TestDb};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    async fn routes() -> (Router, TestDb) {
        let db = TestDb::new(Engine::Sqlite);
        let database = chassis::db::Database::connect(&db.url, &crate::startup::MIGRATOR)
            .await
            .unwrap();
        messaging::outbox::Outbox::install(database.pool())
            .await
            .unwrap();
        repository::seed(database.pool(), &messaging::outbox::Outbox::new())
            .await
            .unwrap();
        (
            router(AppState {
                pool: database.pool().clone(),
                cache_control: cache_control(std::time::Duration::from_secs(10)),
            }),
            db,
        )
    }

    async fn get(router: &Router, uri: &str) -> (u16, serde_json::Value) {
        let response = router
            .clone()
            .oneshot(axum::http::Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
    }

    #[tokio::test]
    async fn batch_reads_dedupe_and_refuse_mixing_with_paging() {
        let (router, _db) = routes().await;
        let (_, page) = get(&router, "/products?limit=2").await;
        let a = page["items"][0]["id"].as_str().unwrap().to_owned();
        let (status, batch) = get(&router, &format!("/products?ids={a},{a}")).await;
        assert_eq!(status, 200);
        assert_eq!(batch["items"].as_array().unwrap().len(), 1);
        let (status, _) = get(&router, &format!("/products?ids={a}&limit=5")).await;
        assert_eq!(status, 400);
        let ids = vec![a.as_str(); 101].join(",");
        let (status, body) = get(&router, &format!("/products?ids={ids}")).await;
        assert_eq!(
            (status, &body["errors"][0]["field"]),
            (422, &serde_json::json!("ids"))
        );
    }

    #[tokio::test]
    async fn found_reads_say_how_long_they_may_be_reused_and_problems_do_not() {
        let (router, _db) = routes().await;
        let status_and_cache = |uri: &str| {
            let router = router.clone();
            let uri = uri.to_owned();
            async move {
                let response = router
                    .oneshot(axum::http::Request::get(uri).body(Body::empty()).unwrap())
                    .await
                    .unwrap();
                let cache = response.headers().get(header::CACHE_CONTROL).cloned();
                (response.status().as_u16(), cache)
            }
        };
        let (_, page) = get(&router, "/products?limit=1").await;
        let id = page["items"][0]["id"].as_str().unwrap().to_owned();
        let fresh = Some(HeaderValue::from_static("public, max-age=10"));
        assert_eq!(
            status_and_cache("/products?limit=1").await,
            (200, fresh.clone())
        );
        assert_eq!(
            status_and_cache(&format!("/products/{id}")).await,
            (200, fresh)
        );
        assert_eq!(
            status_and_cache(&format!("/products/{}", Uuid::now_v7())).await,
            (404, None)
        );
        assert_eq!(status_and_cache("/products/not-a-uuid").await.1, None);
        assert_eq!(cache_control(std::time::Duration::ZERO), "no-cache");
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor(id)).unwrap(), id);
        assert!(decode_cursor("not base64!").is_err());
        assert!(decode_cursor("AAAA").is_err());
    }
}
