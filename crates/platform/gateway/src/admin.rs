//! The admin API, on its own listener (loopback by default): what the gateway
//! serves with and a way to reload it. Never on the public port.
//!
//! - `GET /config`: version, when and from where it was loaded, the last reload;
//! - `GET /routes`: the compiled route table, in matching order;
//! - `GET /upstreams`: each routed service's instances as balancing sees them
//!   (outstanding requests, EWMA latency, failures, ejection);
//! - `GET /metrics`: Prometheus, for scrapers not on the gateway's host (the public
//!   port answers `/metrics` to loopback only);
//! - `GET /cache`: the in-memory cache's entries and bytes; `DELETE /cache` drops
//!   every cached answer, in memory and in Redis;
//! - `POST /reload`: re-reads the configuration; 200 with the new version, or 422
//!   with every error (the current configuration keeps serving).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chassis::Problem;
use std::sync::atomic::Ordering;

use crate::proxy::Proxy;
use http::StatusCode;
use serde_json::{Value, json};

use crate::runtime::{Config, rfc3339};

#[derive(Clone)]
pub struct Admin {
    pub config: Arc<Config>,
    pub proxy: Arc<Proxy>,
    /// Each listener's bound address and whether it terminates TLS.
    pub listeners: Arc<Vec<Value>>,
    pub metrics: telemetry::metrics::Metrics,
}

pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/config", get(config))
        .route("/routes", get(routes))
        .route("/upstreams", get(upstreams))
        .route("/cache", get(cache).delete(purge))
        .route("/metrics", get(metrics))
        .route("/reload", post(reload))
        .with_state(admin)
}

async fn config(State(admin): State<Admin>) -> Response {
    let runtime = admin.config.current();
    axum::Json(json!({
        "version": runtime.version,
        "loaded_at": rfc3339(runtime.loaded_at),
        "source": admin.config.source().describe(),
        "listeners": *admin.listeners,
        "routes": runtime.table.iter().count(),
        "rate_limits": runtime.limiters.keys().collect::<Vec<_>>(),
        "slashes": format!("{:?}", runtime.config.slashes).to_lowercase(),
        "last_reload": admin.config.last_reload(),
    }))
    .into_response()
}

async fn metrics(State(admin): State<Admin>) -> Response {
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        admin.metrics.encode(),
    )
        .into_response()
}

async fn cache(State(admin): State<Admin>) -> Response {
    let (entries, bytes) = admin.proxy.cache.memory_usage();
    axum::Json(json!({
        "entries": entries,
        "bytes": bytes,
        "max_bytes": admin.proxy.cache.max_bytes(),
        "policies": admin.config.current().config.caches.keys().collect::<Vec<_>>(),
    }))
    .into_response()
}

async fn purge(State(admin): State<Admin>) -> Response {
    admin.proxy.cache.purge_memory();
    match admin.proxy.cache.purge_redis().await {
        Ok(redis_keys) => {
            axum::Json(json!({ "purged": true, "redis_keys": redis_keys })).into_response()
        }
        Err(e) => Problem::unavailable(format!(
            "the memory cache is purged, but Redis could not be: {e}; retry when it is reachable"
        ))
        .into_response(),
    }
}

async fn routes(State(admin): State<Admin>) -> Response {
    let runtime = admin.config.current();
    let routes: Vec<Value> = runtime
        .table
        .iter()
        .map(|r| {
            let mut v = json!({
                "name": &*r.label,
                "host": r.host,
                "methods": r.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
                "service": &*r.service,
                "rewrite": r.rewrite,
                "timeout_ms": r.timeout.map(|t| t.as_millis() as u64),
                "auth": format!("{:?}", r.auth).to_lowercase(),
                "consumers": r.consumers,
                "rate_limit": r.rate_limit,
            });
            v[r.pattern.kind()] = json!(r.pattern.describe());
            v
        })
        .collect();
    axum::Json(json!({"version": runtime.version, "routes": routes})).into_response()
}

async fn upstreams(State(admin): State<Admin>) -> Response {
    let runtime = admin.config.current();
    let upstreams = &admin.proxy.upstreams;
    let resolver = upstreams.resolver();
    let services: Vec<Value> = runtime
        .table
        .services()
        .into_iter()
        .map(|service| {
            let config = runtime.upstream(&service);
            let error = resolver.resolve(&service).err().map(|e| e.to_string());
            let instances: Vec<Value> = upstreams
                .states(&service, config)
                .into_iter()
                .map(|(i, st, ejected)| {
                    json!({
                        "id": i.id, "url": i.base_url.to_string(), "ejected": ejected,
                        "outstanding": st.outstanding.load(Ordering::Relaxed),
                        "ewma_ms": st.ewma_us.load(Ordering::Relaxed) as f64 / 1000.0,
                        "consecutive_failures": st.consecutive_failures.load(Ordering::Relaxed),
                        "ejections": st.ejections.load(Ordering::Relaxed),
                    })
                })
                .collect();
            json!({
                "service": service,
                "lb": format!("{:?}", config.lb).to_lowercase(),
                "instances": instances,
                "stale": resolver.stale(&service),
                "error": error,
            })
        })
        .collect();
    axum::Json(json!({"upstreams": services})).into_response()
}

async fn reload(State(admin): State<Admin>) -> Response {
    match admin.config.reload("admin API").await {
        Ok(version) => axum::Json(json!({"version": version})).into_response(),
        Err(errors) => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-configuration",
            "Invalid configuration",
        )
        .with_detail(format!(
            "{} problem(s) in {}; the configuration in service is unchanged",
            errors.len(),
            admin.config.source().describe()
        ))
        .with_extension("errors", json!(errors))
        .into_response(),
    }
}
