//! The embedded broker's HTTP protocol (documented in docs/events.md). Errors are
//! RFC 9457 problem documents.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::groups::{Leased, SettleError};
use super::store::{MAX_RECORD, Record};
use super::{Broker, Topic};
use crate::bus::{StartFrom, check_name};

/// Header naming the partition key of a published record.
pub const KEY_HEADER: &str = "bazaar-key";
/// Longest a fetch may wait.
const MAX_WAIT: Duration = Duration::from_secs(60);

pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/v1/log/topics", get(list))
        .route("/v1/log/topics/{topic}/records", post(publish).get(read))
        .route("/v1/log/topics/{topic}/batch", post(publish_batch))
        .route("/v1/log/topics/{topic}/groups/{group}/fetch", post(fetch))
        .route("/v1/log/topics/{topic}/groups/{group}/ack", post(ack))
        .route("/v1/log/topics/{topic}/groups/{group}/nack", post(nack))
        .route("/v1/log/topics/{topic}/groups/{group}/reset", post(reset))
        .route("/v1/log/settle", post(settle_across))
        .route(
            "/v1/log/topics/{topic}/groups/{group}/settle",
            post(settle_many),
        )
        .route(
            "/v1/log/topics/{topic}/groups/{group}",
            delete(delete_group),
        )
        .with_state(broker)
}

fn problem(status: StatusCode, title: &str, detail: impl Into<String>) -> Response {
    let body = json!({
        "type": "about:blank", "title": title, "status": status.as_u16(), "detail": detail.into(),
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

fn unavailable(e: std::io::Error) -> Response {
    tracing::error!(error = %e, "embedded log I/O failed");
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "Log unavailable",
        e.to_string(),
    )
}

fn topic(broker: &Broker, name: &str) -> Result<Arc<Topic>, Response> {
    check_name(name)
        .map_err(|e| problem(StatusCode::BAD_REQUEST, "Invalid topic", e.to_string()))?;
    broker.topic(name).map_err(unavailable)
}

fn group_name(name: &str) -> Result<(), Response> {
    check_name(name).map_err(|e| problem(StatusCode::BAD_REQUEST, "Invalid group", e.to_string()))
}

/// `"earliest"`, `"latest"`, `{"offset": n}` or `{"time": "<RFC 3339>"}`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartJson {
    #[default]
    Earliest,
    Latest,
    Offset(u64),
    #[serde(with = "time::serde::rfc3339")]
    Time(time::OffsetDateTime),
}

impl From<StartJson> for StartFrom {
    fn from(s: StartJson) -> Self {
        match s {
            StartJson::Earliest => StartFrom::Earliest,
            StartJson::Latest => StartFrom::Latest,
            StartJson::Offset(o) => StartFrom::Offset(o),
            StartJson::Time(t) => StartFrom::Time(t),
        }
    }
}

impl From<StartFrom> for StartJson {
    fn from(s: StartFrom) -> Self {
        match s {
            StartFrom::Earliest => StartJson::Earliest,
            StartFrom::Latest => StartJson::Latest,
            StartFrom::Offset(o) => StartJson::Offset(o),
            StartFrom::Time(t) => StartJson::Time(t),
        }
    }
}

/// A record on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub struct RecordJson {
    pub offset: u64,
    pub time_ms: i64,
    pub partition: u32,
    pub key: String,
    /// Base64.
    pub payload: String,
    /// Deliveries to a group only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
}

impl RecordJson {
    fn of(r: &Record) -> Self {
        Self {
            offset: r.offset,
            time_ms: r.time_ms,
            partition: r.partition,
            key: r.key.clone(),
            payload: B64.encode(&r.payload),
            attempt: None,
            token: None,
        }
    }

    fn leased(l: &Leased) -> Self {
        Self {
            attempt: Some(l.attempt),
            token: Some(l.token),
            ..Self::of(&l.record)
        }
    }
}

async fn publish(
    State(broker): State<Arc<Broker>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let topic = match topic(&broker, &name) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let key = headers
        .get(KEY_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if body.len() + key.len() > MAX_RECORD {
        return problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Record too large",
            format!("records are limited to {MAX_RECORD} bytes"),
        );
    }
    match topic.log.append(key, body).await {
        Ok(offset) => axum::Json(json!({ "offset": offset })).into_response(),
        Err(e) => unavailable(e),
    }
}

#[derive(Deserialize)]
struct ReadQuery {
    from: Option<u64>,
    limit: Option<usize>,
}

async fn read(
    State(broker): State<Arc<Broker>>,
    Path(name): Path<String>,
    Query(q): Query<ReadQuery>,
) -> Response {
    let topic = match topic(&broker, &name) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let (first, next) = topic.log.bounds();
    match topic
        .log
        .read_from(q.from.unwrap_or(first), q.limit.unwrap_or(100).min(1000))
    {
        Ok(records) => axum::Json(json!({
            "first": first, "next": next,
            "records": records.iter().map(RecordJson::of).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => unavailable(e),
    }
}

async fn list(State(broker): State<Arc<Broker>>) -> Response {
    let mut out = Vec::new();
    for name in broker.topics() {
        let Ok(t) = broker.topic(&name) else { continue };
        let (first, next) = t.log.bounds();
        let groups: Vec<_> = t
            .groups
            .lag()
            .into_iter()
            .map(|(group, lag)| json!({ "group": group, "lag": lag }))
            .collect();
        out.push(json!({
            "topic": name, "first": first, "next": next, "bytes": t.log.size(),
            "partitions": t.log.partitions, "groups": groups,
        }));
    }
    axum::Json(out).into_response()
}

#[derive(Deserialize)]
struct FetchRequest {
    /// The subscriber, so it can hold partitions across fetches; without one each
    /// fetch is a member of its own.
    member: Option<String>,
    #[serde(default)]
    start: StartJson,
    max: Option<usize>,
    wait_ms: Option<u64>,
    ack_wait_ms: Option<u64>,
}

async fn fetch(
    State(broker): State<Arc<Broker>>,
    Path((name, group)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let (request, topic) = match group_request::<FetchRequest>(&broker, &name, &group, &body) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let wait = Duration::from_millis(request.wait_ms.unwrap_or(30_000)).min(MAX_WAIT);
    let ack_wait = Duration::from_millis(request.ack_wait_ms.unwrap_or(30_000).max(10));
    match topic
        .groups
        .fetch(
            &group,
            &request
                .member
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            &request.start.into(),
            request.max.unwrap_or(64).min(1024),
            ack_wait,
            wait,
        )
        .await
    {
        Ok(got) => {
            axum::Json(got.iter().map(RecordJson::leased).collect::<Vec<_>>()).into_response()
        }
        Err(e) => unavailable(e),
    }
}

/// A request on a group: its body, the group name checked, the topic opened.
fn group_request<T: serde::de::DeserializeOwned>(
    broker: &Broker,
    name: &str,
    group: &str,
    body: &[u8],
) -> Result<(T, Arc<Topic>), Response> {
    let request = parse(body)?;
    group_name(group)?;
    Ok((request, topic(broker, name)?))
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    let body = if body.is_empty() { &b"{}"[..] } else { body };
    serde_json::from_slice(body).map_err(|e| {
        problem(
            StatusCode::BAD_REQUEST,
            "Invalid request body",
            e.to_string(),
        )
    })
}

#[derive(Deserialize)]
struct Settle {
    offset: u64,
    token: u64,
    delay_ms: Option<u64>,
}

impl Settle {
    /// Acks (no delay) or nacks it in `group`: `None` when done, else the problem.
    fn apply(&self, topic: &Topic, group: &str) -> Option<String> {
        let done = match self.delay_ms {
            None => topic.groups.ack(group, self.offset, self.token),
            Some(ms) => {
                let delay = Duration::from_millis(ms);
                topic.groups.nack(group, self.offset, self.token, delay)
            }
        };
        done.err().map(|e| e.to_string())
    }
}

fn settled(result: Result<(), SettleError>) -> Response {
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e @ SettleError::UnknownGroup(_)) => {
            problem(StatusCode::NOT_FOUND, "Unknown group", e.to_string())
        }
        Err(e @ SettleError::LeaseLost(_)) => {
            problem(StatusCode::CONFLICT, "Lease lost", e.to_string())
        }
    }
}

async fn ack(
    State(broker): State<Arc<Broker>>,
    Path((name, group)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    match group_request::<Settle>(&broker, &name, &group, &body) {
        Ok((s, topic)) => settled(topic.groups.ack(&group, s.offset, s.token)),
        Err(r) => r,
    }
}

async fn nack(
    State(broker): State<Arc<Broker>>,
    Path((name, group)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    match group_request::<Settle>(&broker, &name, &group, &body) {
        Ok((s, topic)) => {
            let delay = Duration::from_millis(s.delay_ms.unwrap_or(0));
            settled(topic.groups.nack(&group, s.offset, s.token, delay))
        }
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct ResetRequest {
    start: StartJson,
}

async fn reset(
    State(broker): State<Arc<Broker>>,
    Path((name, group)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    match group_request::<ResetRequest>(&broker, &name, &group, &body) {
        Ok((request, topic)) => {
            topic.groups.reset(&group, &request.start.into());
            StatusCode::NO_CONTENT.into_response()
        }
        Err(r) => r,
    }
}

async fn delete_group(
    State(broker): State<Arc<Broker>>,
    Path((name, group)): Path<(String, String)>,
) -> Response {
    if let Err(r) = group_name(&group) {
        return r;
    }
    let topic = match topic(&broker, &name) {
        Ok(t) => t,
        Err(r) => return r,
    };
    match topic.groups.delete(&group) {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => problem(
            StatusCode::NOT_FOUND,
            "Unknown group",
            format!("no consumer group `{group}`"),
        ),
        Err(e) => unavailable(e),
    }
}

/// Splits a batch body: `(u16 key length, key, u32 payload length, payload)*`, big
/// endian; `None` if it does not parse.
pub fn decode_batch(mut body: &[u8]) -> Option<Vec<(String, Bytes)>> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let key_len = u16::from_be_bytes(body.get(..2)?.try_into().ok()?) as usize;
        let key = std::str::from_utf8(body.get(2..2 + key_len)?)
            .ok()?
            .to_owned();
        body = &body[2 + key_len..];
        let len = u32::from_be_bytes(body.get(..4)?.try_into().ok()?) as usize;
        let payload = Bytes::copy_from_slice(body.get(4..4 + len)?);
        body = &body[4 + len..];
        out.push((key, payload));
    }
    Some(out)
}

/// Appends to the batch body `buffer`.
pub fn encode_batch(buffer: &mut Vec<u8>, key: &str, payload: &[u8]) {
    let key = &key.as_bytes()[..key.len().min(u16::MAX as usize)];
    buffer.extend_from_slice(&(key.len() as u16).to_be_bytes());
    buffer.extend_from_slice(key);
    buffer.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    buffer.extend_from_slice(payload);
}

/// Many records in one call (the client coalesces concurrent publishes): all
/// appended under the same group commit; answers their offsets in order.
async fn publish_batch(
    State(broker): State<Arc<Broker>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let topic = match topic(&broker, &name) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let Some(records) = decode_batch(&body) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "Invalid batch",
            "the body must be (u16 key length, key, u32 payload length, payload) repeated",
        );
    };
    if let Some((key, payload)) = records.iter().find(|(k, p)| k.len() + p.len() > MAX_RECORD) {
        return problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Record too large",
            format!(
                "a record of key `{key}` has {} bytes; records are limited to {MAX_RECORD}",
                payload.len()
            ),
        );
    }
    let appends = records.into_iter().map(|(key, payload)| {
        let log = topic.log.clone();
        async move { log.append(&key, payload).await }
    });
    match futures::future::try_join_all(appends).await {
        Ok(offsets) => axum::Json(json!({ "offsets": offsets })).into_response(),
        Err(e) => unavailable(e),
    }
}

/// Many acks and nacks in one call (the client coalesces them): each item is
/// `{"offset", "token"}` (ack) or with `"delay_ms"` (nack); answers per item `null`
/// (done) or the problem's detail.
async fn settle_many(
    State(broker): State<Arc<Broker>>,
    Path((name, group)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let (items, topic) = match group_request::<Vec<Settle>>(&broker, &name, &group, &body) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let results: Vec<Option<String>> = items.iter().map(|s| s.apply(&topic, &group)).collect();
    axum::Json(json!({ "results": results })).into_response()
}

#[derive(Deserialize)]
struct SettleOf {
    topic: String,
    group: String,
    offset: u64,
    token: u64,
    delay_ms: Option<u64>,
}

/// Acks and nacks of any topics and groups in one call: a client with several
/// consumers coalesces all of theirs, so a process makes one settle call where it
/// would make one per group. Each item is a `settle` item with its `"topic"` and
/// `"group"`; answers per item `null` (done) or the problem's detail (an unknown
/// group or an invalid name fails its item, not the call).
async fn settle_across(State(broker): State<Arc<Broker>>, body: Bytes) -> Response {
    let items = match parse::<Vec<SettleOf>>(&body) {
        Ok(items) => items,
        Err(r) => return r,
    };
    // Most batches name a few topics many times: open each once.
    let mut topics: Vec<(String, Arc<Topic>)> = Vec::new();
    let mut results: Vec<Option<String>> = Vec::with_capacity(items.len());
    for s in items {
        let (name, group) = (s.topic, s.group);
        if let Err(e) = check_name(&name).and_then(|()| check_name(&group)) {
            results.push(Some(e.to_string()));
            continue;
        }
        let topic = match topics.iter().find(|(n, _)| *n == name) {
            Some((_, t)) => t.clone(),
            None => match broker.topic(&name) {
                Ok(t) => {
                    topics.push((name, t.clone()));
                    t
                }
                Err(e) => {
                    results.push(Some(e.to_string()));
                    continue;
                }
            },
        };
        let settle = Settle {
            offset: s.offset,
            token: s.token,
            delay_ms: s.delay_ms,
        };
        results.push(settle.apply(&topic, &group));
    }
    axum::Json(json!({ "results": results })).into_response()
}
