//! A Eureka REST API subset over the same registry, so JVM services with Eureka
//! clients join the shop: register, renew, cancel, and the application listings,
//! as JSON when asked (`Accept: application/json`) and otherwise as XML, Eureka's
//! default that several clients (py-eureka-client among them) rely on. Each Eureka lease is a TTL check of its `durationInSecs`; an instance
//! whose lease lapses that long again is evicted, as Eureka does.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde_json::{Value, json};

use super::model::{CheckKind, CheckSpec, FieldProblem, Health, Registration};
use super::{Entry, Registry};

/// Eureka's default lease duration.
const DEFAULT_LEASE: u64 = 90;

pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/eureka/apps", get(apps))
        // Jersey (Eureka's server) takes a trailing slash; some clients send one.
        .route("/eureka/apps/", get(apps))
        .route("/eureka/apps/{app}", get(app).post(register))
        .route("/eureka/apps/{app}/{id}", put(renew).delete(cancel))
        .with_state(registry)
}

fn bad_request(problems: Vec<FieldProblem>) -> Response {
    let body = json!({
        "type": "about:blank", "title": "Invalid instance", "status": 400,
        "detail": problems.iter().map(|p| format!("{}: {}", p.field, p.message)).collect::<Vec<_>>().join("; "),
        "errors": problems,
    });
    let mut response = (StatusCode::BAD_REQUEST, body.to_string()).into_response();
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/problem+json"),
    );
    response
}

fn problem(field: &str, message: &str) -> FieldProblem {
    FieldProblem {
        field: field.to_owned(),
        message: message.to_owned(),
    }
}

fn check_id(id: &str) -> String {
    format!("eureka:{id}")
}

/// Parses `{"instance": {...}}` into a registration; Eureka's `port` is
/// `{"$": 8080, "@enabled": "true"}` or a bare number.
fn parse(app: &str, body: &[u8]) -> Result<Registration, Vec<FieldProblem>> {
    let doc: Value = serde_json::from_slice(body)
        .map_err(|e| vec![problem("body", &format!("not JSON: {e}"))])?;
    let instance = doc
        .get("instance")
        .ok_or_else(|| vec![problem("instance", "is required")])?;
    let mut problems = Vec::new();
    let text = |key: &str| instance.get(key).and_then(Value::as_str).map(str::to_owned);
    let address = text("ipAddr").or_else(|| text("hostName"));
    if address.is_none() {
        problems.push(problem(
            "instance.ipAddr",
            "is required (or instance.hostName)",
        ));
    }
    let port = match instance.get("port") {
        Some(Value::Object(p)) => p
            .get("$")
            .and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok())),
        Some(v) => v.as_u64().or_else(|| v.as_str()?.parse().ok()),
        None => None,
    };
    let port = match port.map(u16::try_from) {
        Some(Ok(p)) => p,
        _ => {
            problems.push(problem(
                "instance.port",
                "must be a port number, 0 to 65535",
            ));
            0
        }
    };
    let lease = instance
        .pointer("/leaseInfo/durationInSecs")
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_LEASE)
        .max(1);
    if !problems.is_empty() {
        return Err(problems);
    }
    let address = address.unwrap_or_default();
    let id = text("instanceId").unwrap_or_else(|| format!("{address}:{app}:{port}"));
    let up = text("status").is_none_or(|s| s.eq_ignore_ascii_case("UP"));
    let ttl = Duration::from_secs(lease);
    Ok(Registration {
        name: app.to_ascii_lowercase(),
        address,
        port,
        tags: vec!["eureka".to_owned()],
        meta: [("eureka.app".to_owned(), app.to_owned())].into(),
        checks: vec![CheckSpec {
            id: check_id(&id),
            name: format!("Eureka lease of {id}"),
            kind: CheckKind::Ttl { ttl },
            initial: if up {
                Health::Passing
            } else {
                Health::Critical
            },
            deregister_after: Some(ttl),
        }],
        id,
    })
}

async fn register(
    State(registry): State<Arc<Registry>>,
    Path(app): Path<String>,
    body: Bytes,
) -> Response {
    match parse(&app, &body) {
        Ok(r) => {
            // The registration starts the lease (its TTL runs from now).
            registry.register(r);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(problems) => bad_request(problems),
    }
}

async fn renew(
    State(registry): State<Arc<Registry>>,
    Path((_app, id)): Path<(String, String)>,
) -> Response {
    if registry.update_ttl(&check_id(&id), Health::Passing, "renewed") {
        StatusCode::OK.into_response()
    } else {
        // Eureka clients re-register when a renewal answers 404.
        StatusCode::NOT_FOUND.into_response()
    }
}

async fn cancel(
    State(registry): State<Arc<Registry>>,
    Path((_app, id)): Path<(String, String)>,
) -> Response {
    if registry.deregister(&id) {
        StatusCode::OK.into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

fn instance_json(e: &Entry) -> Value {
    let r = &e.registration;
    let app = r
        .meta
        .get("eureka.app")
        .cloned()
        .unwrap_or_else(|| r.name.to_ascii_uppercase());
    let home = format!("http://{}:{}/", r.address, r.port);
    let metadata: serde_json::Map<String, Value> = r
        .meta
        .iter()
        .filter(|(k, _)| !k.starts_with("eureka."))
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "instanceId": r.id, "hostName": r.address, "app": app, "ipAddr": r.address,
        "status": if e.health() == Health::Passing { "UP" } else { "DOWN" },
        "overriddenstatus": "UNKNOWN",
        "port": { "$": r.port, "@enabled": "true" },
        "securePort": { "$": 443, "@enabled": "false" },
        "countryId": 1,
        "dataCenterInfo": { "@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo", "name": "MyOwn" },
        "metadata": metadata,
        "homePageUrl": home,
        "vipAddress": r.name,
        "secureVipAddress": r.name,
        "isCoordinatingDiscoveryServer": "false",
        "lastUpdatedTimestamp": e.modify_index.to_string(),
        "lastDirtyTimestamp": e.modify_index.to_string(),
        "actionType": "ADDED",
    })
}

fn application_json(name: &str, entries: &[Entry]) -> Value {
    json!({
        "name": name.to_ascii_uppercase(),
        "instance": entries.iter().map(instance_json).collect::<Vec<_>>(),
    })
}

/// `{root: body}` as JSON when the client accepts it, else as Eureka's XML.
fn negotiate(headers: &HeaderMap, root: &str, body: Value) -> Response {
    let wants_json = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("json"));
    if wants_json {
        let mut document = serde_json::Map::new();
        document.insert(root.to_owned(), body);
        return axum::Json(Value::Object(document)).into_response();
    }
    let mut xml = String::from(r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    to_xml(root, &body, &mut xml);
    ([(header::CONTENT_TYPE, "application/xml")], xml).into_response()
}

/// Eureka's JSON/XML mapping: `@name` keys are attributes, `$` is the text, an
/// array repeats its element.
fn to_xml(tag: &str, value: &Value, out: &mut String) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| to_xml(tag, item, out)),
        Value::Object(map) => {
            out.push('<');
            out.push_str(tag);
            for (key, v) in map.iter().filter(|(k, _)| k.starts_with('@')) {
                out.push_str(&format!(" {}=\"{}\"", &key[1..], escape(&scalar(v))));
            }
            out.push('>');
            if let Some(text) = map.get("$") {
                out.push_str(&escape(&scalar(text)));
            }
            for (key, v) in map.iter().filter(|(k, _)| !k.starts_with('@') && *k != "$") {
                to_xml(key, v, out);
            }
            out.push_str(&format!("</{tag}>"));
        }
        Value::Null => out.push_str(&format!("<{tag}/>")),
        v => out.push_str(&format!("<{tag}>{}</{tag}>", escape(&scalar(v)))),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Every service in the registry, Eureka-registered or not.
async fn apps(State(registry): State<Arc<Registry>>, headers: HeaderMap) -> Response {
    let (index, services) = registry.services();
    let applications: Vec<Value> = services
        .keys()
        .map(|name| application_json(name, &registry.instances(name, false, None).1))
        .collect();
    let up = applications
        .iter()
        .flat_map(|a| a["instance"].as_array().cloned().unwrap_or_default())
        .filter(|i| i["status"] == "UP")
        .count();
    let body = json!({
        "versions__delta": index.to_string(),
        "apps__hashcode": format!("UP_{up}_"),
        "application": applications,
    });
    negotiate(&headers, "applications", body)
}

async fn app(
    State(registry): State<Arc<Registry>>,
    Path(app): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (_, entries) = registry.instances(&app.to_ascii_lowercase(), false, None);
    if entries.is_empty() {
        return StatusCode::NOT_FOUND.into_response();
    }
    negotiate(&headers, "application", application_json(&app, &entries))
}
