//! A Consul-compatible HTTP API subset over the registry, so unmodified Consul
//! clients can register, discover and deregister.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Entry, Health, Registry, parse_registration};

const INDEX_HEADER: HeaderName = HeaderName::from_static("x-consul-index");
/// The node every instance is reported on: the registry is its own single node.
const NODE: &str = "bazaar";
const DATACENTER: &str = "dc1";
/// Consul's default and maximum blocking-query waits.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);

pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/v1/agent/service/register", put(register))
        .route("/v1/agent/service/deregister/{id}", put(deregister))
        .route(
            "/v1/agent/check/pass/{id}",
            put(|s, p, q| ttl(s, p, q, Health::Passing)),
        )
        .route(
            "/v1/agent/check/warn/{id}",
            put(|s, p, q| ttl(s, p, q, Health::Warning)),
        )
        .route(
            "/v1/agent/check/fail/{id}",
            put(|s, p, q| ttl(s, p, q, Health::Critical)),
        )
        .route("/v1/health/service/{name}", get(health))
        .route("/v1/catalog/services", get(catalog_services))
        .route("/v1/catalog/service/{name}", get(catalog_service))
        .with_state(registry)
}

/// Errors are RFC 9457 documents (what every Bazaar API answers); their `detail`
/// carries the text a Consul agent would send.
fn problem(
    status: StatusCode,
    title: &str,
    detail: String,
    errors: Vec<super::FieldProblem>,
) -> Response {
    let body = json!({
        "type": "about:blank", "title": title, "status": status.as_u16(),
        "detail": detail, "errors": errors,
    });
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

fn bad_request(problems: Vec<super::FieldProblem>) -> Response {
    let text: Vec<String> = problems
        .iter()
        .map(|p| format!("{}: {}", p.field, p.message))
        .collect();
    problem(
        StatusCode::BAD_REQUEST,
        "Invalid service registration",
        format!("Invalid service registration: {}", text.join("; ")),
        problems,
    )
}

fn not_found(detail: String) -> Response {
    problem(StatusCode::NOT_FOUND, "Not Found", detail, Vec::new())
}

async fn register(State(registry): State<Arc<Registry>>, body: Bytes) -> Response {
    match parse_registration(&body) {
        Ok(r) => {
            registry.register(r);
            StatusCode::OK.into_response()
        }
        Err(problems) => bad_request(problems),
    }
}

async fn deregister(State(registry): State<Arc<Registry>>, Path(id): Path<String>) -> Response {
    if registry.deregister(&id) {
        StatusCode::OK.into_response()
    } else {
        not_found(format!("Unknown service ID {id:?}"))
    }
}

#[derive(Deserialize)]
struct Note {
    note: Option<String>,
}

async fn ttl(
    State(registry): State<Arc<Registry>>,
    Path(id): Path<String>,
    Query(note): Query<Note>,
    health: Health,
) -> Response {
    if registry.update_ttl(&id, health, note.note.as_deref().unwrap_or("")) {
        StatusCode::OK.into_response()
    } else {
        not_found(format!("Unknown TTL check ID {id:?}"))
    }
}

#[derive(Deserialize, Default)]
struct Blocking {
    index: Option<u64>,
    wait: Option<String>,
    passing: Option<String>,
    tag: Option<String>,
}

impl Blocking {
    /// Waits out a blocking query (`?index=N&wait=10s`) before the read.
    async fn wait(&self, registry: &Registry, service: Option<&str>) -> Result<(), Response> {
        let Some(index) = self.index else {
            return Ok(());
        };
        let wait = match self.wait.as_deref() {
            None => DEFAULT_WAIT,
            Some(w) => humantime::parse_duration(w).map_err(|_| {
                problem(
                    StatusCode::BAD_REQUEST,
                    "Bad Request",
                    format!("Invalid wait time {w:?}"),
                    Vec::new(),
                )
            })?,
        };
        registry.wait_past(index, wait.min(MAX_WAIT), service).await;
        Ok(())
    }

    /// `?passing` (bare), `?passing=true` or `=1`.
    fn passing(&self) -> bool {
        self.passing
            .as_deref()
            .is_some_and(|p| p.is_empty() || p == "true" || p == "1")
    }
}

fn with_index(index: u64, body: Value) -> Response {
    let mut response = axum::Json(body).into_response();
    response
        .headers_mut()
        .insert(INDEX_HEADER, HeaderValue::from(index));
    response
}

fn service_json(e: &Entry) -> Value {
    let r = &e.registration;
    json!({
        "ID": r.id, "Service": r.name, "Tags": r.tags, "Address": r.address, "Port": r.port,
        "Meta": r.meta, "CreateIndex": e.create_index, "ModifyIndex": e.modify_index,
    })
}

async fn health(
    State(registry): State<Arc<Registry>>,
    Path(name): Path<String>,
    Query(q): Query<Blocking>,
) -> Response {
    if let Err(r) = q.wait(&registry, Some(&name)).await {
        return r;
    }
    let (index, entries) = registry.instances(&name, q.passing(), q.tag.as_deref());
    let body: Vec<Value> = entries
        .iter()
        .map(|e| {
            let checks: Vec<Value> = e
                .checks
                .iter()
                .map(|c| {
                    json!({
                        "Node": NODE, "CheckID": c.spec.id, "Name": c.spec.name,
                        "Status": c.health.as_str(), "Output": c.output,
                        "ServiceID": e.registration.id, "ServiceName": e.registration.name,
                        "Type": match c.spec.kind {
                            super::CheckKind::Http { .. } => "http",
                            super::CheckKind::Tcp { .. } => "tcp",
                            super::CheckKind::Ttl { .. } => "ttl",
                        },
                    })
                })
                .collect();
            json!({
                "Node": { "ID": NODE, "Node": NODE, "Address": "127.0.0.1", "Datacenter": DATACENTER },
                "Service": service_json(e),
                "Checks": checks,
            })
        })
        .collect();
    with_index(index, Value::Array(body))
}

async fn catalog_services(
    State(registry): State<Arc<Registry>>,
    Query(q): Query<Blocking>,
) -> Response {
    if let Err(r) = q.wait(&registry, None).await {
        return r;
    }
    let (index, services) = registry.services();
    with_index(index, json!(services))
}

async fn catalog_service(
    State(registry): State<Arc<Registry>>,
    Path(name): Path<String>,
    Query(q): Query<Blocking>,
) -> Response {
    if let Err(r) = q.wait(&registry, Some(&name)).await {
        return r;
    }
    let (index, entries) = registry.instances(&name, false, q.tag.as_deref());
    let body: Vec<Value> = entries
        .iter()
        .map(|e| {
            let r = &e.registration;
            json!({
                "ID": NODE, "Node": NODE, "Address": "127.0.0.1", "Datacenter": DATACENTER,
                "ServiceID": r.id, "ServiceName": r.name, "ServiceTags": r.tags,
                "ServiceAddress": r.address, "ServicePort": r.port, "ServiceMeta": r.meta,
                "CreateIndex": e.create_index, "ModifyIndex": e.modify_index,
            })
        })
        .collect();
    with_index(index, Value::Array(body))
}
