//! Response aggregation (KrakenD's merge): a route with `aggregate` parts asks each
//! part's service in parallel, each under its own deadline, and answers one JSON
//! object: a part with a `key` under that key, a part without merged into the top
//! level. A part that fails, times out, answers other than 2xx or not in JSON is
//! missing: its key is `null`, its name (key or service) is listed in `_missing`,
//! and `Bazaar-Completed: false` says the answer is partial. A `required` part that
//! fails fails the request instead; so does every part failing.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use chassis::Problem;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Map, Value};

use crate::configuration::AggregatePart;
use crate::proxy::{Proxy, upstream_problem};
use crate::routes::{MISSING, Route, fill, with_query};
use crate::runtime::Runtime;
use crate::upstream::{Call, UpstreamError};

/// Whether every part answered.
pub const COMPLETED: HeaderName = HeaderName::from_static("bazaar-completed");
/// Largest part body read, in bytes.
const MAX_PART_BYTES: usize = 8 * 1024 * 1024;

/// Why a part is missing.
#[derive(Debug)]
enum PartError {
    Upstream(UpstreamError),
    TimedOut(Duration),
    Status(StatusCode),
    Body(String),
    NotJson,
}

impl std::fmt::Display for PartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PartError::Upstream(e) => write!(f, "{e}"),
            PartError::TimedOut(after) => write!(f, "no whole answer within {after:?}"),
            PartError::Status(s) => write!(f, "answered {s}"),
            PartError::Body(e) => write!(f, "the body could not be read: {e}"),
            PartError::NotJson => write!(f, "the answer is not JSON"),
        }
    }
}

impl PartError {
    fn problem(self, service: &str) -> Problem {
        match self {
            PartError::Upstream(e) => upstream_problem(service, e),
            PartError::TimedOut(after) => Problem::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream-timeout",
                "Upstream timed out",
            )
            .with_detail(format!(
                "`{service}` did not answer within {after:?}, and the answer needs it"
            )),
            other => Problem::new(
                StatusCode::BAD_GATEWAY,
                "upstream-failed",
                "Upstream failed",
            )
            .with_detail(format!("`{service}` {other}, and the answer needs it")),
        }
    }
}

/// Asks every part of `route` and merges the answers. `head` is the request as it
/// would be forwarded (identity and forwarding headers set).
pub async fn fan_out(
    proxy: &Proxy,
    runtime: &Runtime,
    route: &Route,
    head: &http::request::Parts,
    params: &[(String, String)],
    default_timeout: Duration,
) -> Result<Response, Problem> {
    let query = head.uri.query();
    let calls = route.config.aggregate.iter().map(|part| async move {
        let target = with_query(fill(&part.path, params), query);
        let timeout = part.timeout.map_or(default_timeout, |t| t.0);
        let outcome = tokio::time::timeout(
            timeout,
            ask(proxy, runtime, route, part, head, &target, timeout),
        )
        .await;
        outcome.unwrap_or(Err(PartError::TimedOut(timeout)))
    });
    let answers = futures::future::join_all(calls).await;
    let mut merged = Map::new();
    let mut missing = Vec::new();
    for (part, answer) in route.config.aggregate.iter().zip(answers) {
        let name = part.key.clone().unwrap_or_else(|| part.service.clone());
        let answer = answer.and_then(|value| match (&part.key, value) {
            (Some(_), value) => Ok(value),
            (None, Value::Object(o)) => Ok(Value::Object(o)),
            (None, _) => Err(PartError::Body(
                "not a JSON object, and the part has no `key` to put it under".into(),
            )),
        });
        match answer {
            Ok(Value::Object(o)) if part.key.is_none() => merged.extend(o),
            Ok(value) => {
                if let Some(key) = &part.key {
                    merged.insert(key.clone(), value);
                }
            }
            Err(e) if part.required => return Err(e.problem(&part.service)),
            Err(e) => {
                tracing::warn!(route = %route.label, part = %name, error = %e, "an aggregated part is missing");
                if let Some(key) = &part.key {
                    merged.insert(key.clone(), Value::Null);
                }
                missing.push(Value::String(name));
            }
        }
    }
    if missing.len() == route.config.aggregate.len() {
        return Err(Problem::new(
            StatusCode::BAD_GATEWAY,
            "upstream-unavailable",
            "Upstream unavailable",
        )
        .with_detail("no part of this answer could be fetched; try again shortly"));
    }
    let completed = missing.is_empty();
    if !completed {
        merged.insert(MISSING.to_owned(), Value::Array(missing));
    }
    let mut response = axum::Json(Value::Object(merged)).into_response();
    response.headers_mut().insert(
        COMPLETED,
        HeaderValue::from_static(if completed { "true" } else { "false" }),
    );
    Ok(response)
}

/// One part: its answer as JSON.
async fn ask(
    proxy: &Proxy,
    runtime: &Runtime,
    route: &Route,
    part: &AggregatePart,
    head: &http::request::Parts,
    target: &str,
    timeout: Duration,
) -> Result<Value, PartError> {
    let (mut part_head, ()) = Request::builder()
        .method(Method::GET)
        .uri(target)
        .body(())
        .map_err(|e| PartError::Body(e.to_string()))?
        .into_parts();
    part_head.headers = head.headers.clone();
    // The client's conditionals and content headers concern the whole, not a part.
    for name in [
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::CONTENT_LENGTH,
        header::CONTENT_TYPE,
    ] {
        part_head.headers.remove(name);
    }
    part_head
        .headers
        .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    let response = proxy
        .upstreams
        .send(
            Call {
                service: &part.service,
                config: runtime.upstream(&part.service),
                timeout,
                hash_key: None,
                retries: route.retries,
                added: &[],
                as_fields: None,
            },
            &part_head,
            bytes::Bytes::new(),
            // The parts run side by side: each times its own calls.
            None,
            &mut crate::upstream::Report::default(),
        )
        .await
        .map_err(PartError::Upstream)?;
    if !response.status().is_success() {
        return Err(PartError::Status(response.status()));
    }
    let body = http_body_util::Limited::new(response.into_body(), MAX_PART_BYTES)
        .collect()
        .await
        .map_err(|e| PartError::Body(e.to_string()))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|_| PartError::NotJson)
}
