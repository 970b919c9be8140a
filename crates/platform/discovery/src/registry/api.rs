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
use serde::{Deserialize, Serialize};
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

fn with_index_bytes(index: u64, body: Vec<u8>) -> Response {
    let mut response = (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response();
    response
        .headers_mut()
        .insert(INDEX_HEADER, HeaderValue::from(index));
    response
}

fn with_index(index: u64, body: Value) -> Response {
    let mut response = axum::Json(body).into_response();
    response
        .headers_mut()
        .insert(INDEX_HEADER, HeaderValue::from(index));
    response
}

/// `/v1/health/service/{name}` entries, serialized straight from the registry's
/// entries (building `serde_json::Value`s first cost most of the query's time).
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry<'a> {
    node: NodeJson,
    service: ServiceJson<'a>,
    checks: Vec<CheckJson<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct NodeJson {
    #[serde(rename = "ID")]
    id: &'static str,
    node: &'static str,
    address: &'static str,
    datacenter: &'static str,
}

const NODE_JSON: NodeJson = NodeJson {
    id: NODE,
    node: NODE,
    address: "127.0.0.1",
    datacenter: DATACENTER,
};

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceJson<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    service: &'a str,
    tags: &'a [String],
    address: &'a str,
    port: u16,
    meta: &'a std::collections::BTreeMap<String, String>,
    create_index: u64,
    modify_index: u64,
}

impl<'a> ServiceJson<'a> {
    fn of(e: &'a Entry) -> Self {
        let r = &e.registration;
        Self {
            id: &r.id,
            service: &r.name,
            tags: &r.tags,
            address: &r.address,
            port: r.port,
            meta: &r.meta,
            create_index: e.create_index,
            modify_index: e.modify_index,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CheckJson<'a> {
    node: &'static str,
    #[serde(rename = "CheckID")]
    check_id: &'a str,
    name: &'a str,
    status: &'static str,
    output: &'a str,
    #[serde(rename = "ServiceID")]
    service_id: &'a str,
    service_name: &'a str,
    #[serde(rename = "Type")]
    kind: &'static str,
}

fn health_json(entries: &[&Entry]) -> Vec<u8> {
    let body: Vec<HealthEntry<'_>> = entries
        .iter()
        .map(|e| HealthEntry {
            node: NODE_JSON,
            service: ServiceJson::of(e),
            checks: e
                .checks
                .iter()
                .map(|c| CheckJson {
                    node: NODE,
                    check_id: &c.spec.id,
                    name: &c.spec.name,
                    status: c.health.as_str(),
                    output: &c.output,
                    service_id: &e.registration.id,
                    service_name: &e.registration.name,
                    kind: match c.spec.kind {
                        super::CheckKind::Http { .. } => "http",
                        super::CheckKind::Tcp { .. } => "tcp",
                        super::CheckKind::Ttl { .. } => "ttl",
                    },
                })
                .collect(),
        })
        .collect();
    serde_json::to_vec(&body).unwrap_or_default()
}

async fn health(
    State(registry): State<Arc<Registry>>,
    Path(name): Path<String>,
    Query(q): Query<Blocking>,
) -> Response {
    if let Err(r) = q.wait(&registry, Some(&name)).await {
        return r;
    }
    let (index, body) =
        registry.with_instances(&name, q.passing(), q.tag.as_deref(), |index, entries| {
            (index, health_json(entries))
        });
    with_index_bytes(index, body)
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
