//! [`EventBus`] over the embedded broker's HTTP protocol.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use super::server::{RecordJson, StartJson, encode_batch};
use crate::bus::{
    Acker, BoxFuture, BusError, Delivery, EventBus, Position, StartFrom, SubscribeOptions,
    Subscription, check_name,
};
use crate::envelope::CloudEvent;

/// How long one fetch waits on the broker for messages.
const FETCH_WAIT: Duration = Duration::from_secs(20);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Most records, and bytes, one batch call carries.
const BATCH_RECORDS: usize = 512;
const BATCH_BYTES: usize = 512 << 10;
/// Publish calls in flight at once.
const BATCHES_IN_FLIGHT: usize = 4;
/// Settle calls in flight at once: acks that arrive while one is out wait for it
/// and go together in the next (a settle is a few bytes; its cost is the call).
const SETTLES_IN_FLIGHT: usize = 1;

/// A client of the control plane's embedded broker. Cheap to clone.
///
/// Publishes made concurrently (by different tasks) are coalesced into batch calls,
/// as a Kafka producer batches: under load one HTTP call and one fsync carry many
/// records; alone, a publish goes out at once. A task's publishes stay in its order
/// (it awaits each).
#[derive(Clone, Debug)]
pub struct EmbeddedBus {
    base: String,
    http: reqwest::Client,
    publishes: Arc<std::sync::OnceLock<mpsc::Sender<Publish>>>,
    settles: Arc<std::sync::OnceLock<mpsc::Sender<Settle>>>,
}

/// Work the batchers coalesce: grouped by `key`, each group one call.
trait Batched: Send + 'static {
    type Key: std::hash::Hash + Eq + Send + 'static;
    fn key(&self) -> Self::Key;
    fn size(&self) -> usize;
}

#[derive(Debug)]
struct Publish {
    topic: String,
    key: String,
    payload: Bytes,
    reply: oneshot::Sender<Result<u64, BusError>>,
}

impl Batched for Publish {
    type Key = String;
    fn key(&self) -> String {
        self.topic.clone()
    }
    fn size(&self) -> usize {
        self.payload.len() + self.key.len()
    }
}

/// An ack (no delay) or a nack.
#[derive(Debug)]
struct Settle {
    topic: String,
    group: String,
    offset: u64,
    token: u64,
    nack_delay: Option<Duration>,
    reply: oneshot::Sender<Result<(), BusError>>,
}

impl Batched for Settle {
    /// Every group's settles share a call (`POST /v1/log/settle`).
    type Key = ();
    fn key(&self) {}
    fn size(&self) -> usize {
        32
    }
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

impl EmbeddedBus {
    /// `base` like `http://127.0.0.1:8500` (the control plane).
    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder()
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
            publishes: Arc::default(),
            settles: Arc::default(),
        }
    }

    /// A batcher's queue, its task started on first use. The task ends when every
    /// clone of this bus is gone (it holds no clone itself).
    fn queue<T, S, Fut>(
        &self,
        cell: &std::sync::OnceLock<mpsc::Sender<T>>,
        in_flight: usize,
        send: S,
    ) -> mpsc::Sender<T>
    where
        T: Batched,
        S: Fn(String, reqwest::Client, T::Key, Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        cell.get_or_init(|| {
            let (tx, rx) = mpsc::channel(BATCH_RECORDS * BATCHES_IN_FLIGHT);
            let (base, http) = (self.base.clone(), self.http.clone());
            tokio::spawn(batch_loop(base, http, rx, in_flight, send));
            tx
        })
        .clone()
    }

    async fn settle(
        &self,
        topic: &str,
        group: &str,
        offset: u64,
        token: u64,
        nack_delay: Option<Duration>,
    ) -> Result<(), BusError> {
        let (reply, answer) = oneshot::channel();
        let settle = Settle {
            topic: topic.to_owned(),
            group: group.to_owned(),
            offset,
            token,
            nack_delay,
            reply,
        };
        let closed = || BusError::Unavailable("the client stopped".into());
        self.queue(&self.settles, SETTLES_IN_FLIGHT, send_settles)
            .send(settle)
            .await
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    fn group_url(&self, topic: &str, group: &str, verb: &str) -> String {
        format!("{}/v1/log/topics/{topic}/groups/{group}/{verb}", self.base)
    }

    async fn post_json(
        &self,
        url: String,
        body: Value,
        timeout: Duration,
    ) -> Result<reqwest::Response, BusError> {
        let response = self
            .http
            .post(url)
            .timeout(timeout)
            .json(&body)
            .send()
            .await
            .map_err(unavailable)?;
        check(response).await
    }

    async fn append(&self, topic: &str, key: &str, payload: Bytes) -> Result<u64, BusError> {
        check_name(topic)?;
        let (reply, answer) = oneshot::channel();
        let publish = Publish {
            topic: topic.to_owned(),
            key: key.to_owned(),
            payload,
            reply,
        };
        let closed = || BusError::Unavailable("the publisher stopped".into());
        self.queue(&self.publishes, BATCHES_IN_FLIGHT, send_publishes)
            .send(publish)
            .await
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

/// Takes everything waiting once a call may start, one call per key, `in_flight`
/// calls at most.
async fn batch_loop<T, S, Fut>(
    base: String,
    http: reqwest::Client,
    mut queue: mpsc::Receiver<T>,
    in_flight: usize,
    send: S,
) where
    T: Batched,
    S: Fn(String, reqwest::Client, T::Key, Vec<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let in_flight = Arc::new(tokio::sync::Semaphore::new(in_flight));
    loop {
        // A free slot first, then what is waiting: what arrives while every slot is
        // busy joins the next call instead of waiting in a call of its own.
        let Ok(free) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = queue.recv().await else {
            return;
        };
        let mut free = Some(free);
        let mut groups: HashMap<T::Key, Vec<T>> = HashMap::new();
        let mut bytes = first.size();
        let mut count = 1;
        groups.entry(first.key()).or_default().push(first);
        while count < BATCH_RECORDS && bytes < BATCH_BYTES {
            match queue.try_recv() {
                Ok(item) => {
                    bytes += item.size();
                    count += 1;
                    groups.entry(item.key()).or_default().push(item);
                }
                Err(_) => break,
            }
        }
        for (key, batch) in groups {
            let permit = match free.take() {
                Some(permit) => permit,
                None => match in_flight.clone().acquire_owned().await {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let call = send(base.clone(), http.clone(), key, batch);
            tokio::spawn(async move {
                call.await;
                drop(permit);
            });
        }
    }
}

/// Answers every waiter of a failed call with (a copy of) its error.
fn fail_all<T>(
    error: &BusError,
    waiters: impl IntoIterator<Item = oneshot::Sender<Result<T, BusError>>>,
) {
    let text = error.to_string();
    for reply in waiters {
        let copy = match error {
            BusError::Refused(_) => BusError::Refused(text.clone()),
            _ => BusError::Unavailable(text.clone()),
        };
        let _ = reply.send(Err(copy));
    }
}

async fn send_settles(base: String, http: reqwest::Client, _: (), batch: Vec<Settle>) {
    let items: Vec<Value> = batch
        .iter()
        .map(|s| {
            let mut item = json!({
                "topic": s.topic, "group": s.group, "offset": s.offset, "token": s.token,
            });
            if let Some(d) = s.nack_delay {
                item["delay_ms"] = json!(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            }
            item
        })
        .collect();
    let result = match post_settles(&http, format!("{base}/v1/log/settle"), &items).await {
        Ok(None) => settle_per_group(&http, &base, &batch, &items).await,
        other => other.map(Option::unwrap_or_default),
    };
    match result {
        Ok(results) => {
            for (s, r) in batch.into_iter().zip(results) {
                let _ = s.reply.send(match r.as_str() {
                    None => Ok(()),
                    Some(problem) => Err(BusError::Refused(problem.to_owned())),
                });
            }
        }
        Err(e) => fail_all(&e, batch.into_iter().map(|s| s.reply)),
    }
}

/// One settle call: each item's answer, or `None` if the broker has no such call.
async fn post_settles(
    http: &reqwest::Client,
    url: String,
    items: &[Value],
) -> Result<Option<Vec<Value>>, BusError> {
    let response = http
        .post(url)
        .timeout(CALL_TIMEOUT)
        .json(items)
        .send()
        .await
        .map_err(unavailable)?;
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        // Every item's problem is in the answer's body, so a 404 is the route: a
        // broker older than `/v1/log/settle` (a rolling upgrade).
        return Ok(None);
    }
    let answer: Value = check(response).await?.json().await.map_err(unavailable)?;
    match answer["results"].as_array() {
        Some(results) if results.len() == items.len() => Ok(Some(results.clone())),
        _ => Err(BusError::Refused(format!("unexpected answer {answer}"))),
    }
}

/// The batch as one call per topic and group, for a broker without
/// `/v1/log/settle` (the per-group call ignores the items' topic and group).
async fn settle_per_group(
    http: &reqwest::Client,
    base: &str,
    batch: &[Settle],
    items: &[Value],
) -> Result<Vec<Value>, BusError> {
    let mut results = vec![Value::Null; batch.len()];
    let mut groups: Vec<((&str, &str), Vec<usize>)> = Vec::new();
    for (n, s) in batch.iter().enumerate() {
        let key = (s.topic.as_str(), s.group.as_str());
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(n),
            None => groups.push((key, vec![n])),
        }
    }
    for ((topic, group), members) in groups {
        let url = format!("{base}/v1/log/topics/{topic}/groups/{group}/settle");
        let own: Vec<Value> = members.iter().map(|&n| items[n].clone()).collect();
        let answers = post_settles(http, url, &own).await?.ok_or_else(|| {
            BusError::Refused(format!("the broker has no settle call for {topic}/{group}"))
        })?;
        for (n, answer) in members.into_iter().zip(answers) {
            results[n] = answer;
        }
    }
    Ok(results)
}

async fn send_publishes(base: String, http: reqwest::Client, topic: String, batch: Vec<Publish>) {
    let mut body = Vec::new();
    for p in &batch {
        encode_batch(&mut body, &p.key, &p.payload);
    }
    let result = async {
        let response = http
            .post(format!("{base}/v1/log/topics/{topic}/batch"))
            .timeout(CALL_TIMEOUT)
            .body(body)
            .send()
            .await
            .map_err(unavailable)?;
        let answer: Value = check(response).await?.json().await.map_err(unavailable)?;
        let offsets: Vec<u64> = answer["offsets"]
            .as_array()
            .map(|o| o.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        if offsets.len() != batch.len() {
            return Err(BusError::Refused(format!("unexpected answer {answer}")));
        }
        Ok(offsets)
    }
    .await;
    match result {
        Ok(offsets) => {
            for (p, offset) in batch.into_iter().zip(offsets) {
                let _ = p.reply.send(Ok(offset));
            }
        }
        Err(e) => fail_all(&e, batch.into_iter().map(|p| p.reply)),
    }
}

async fn check(response: reqwest::Response) -> Result<reqwest::Response, BusError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    Err(if status.is_server_error() {
        BusError::Unavailable(format!("{status}: {body}"))
    } else {
        BusError::Refused(format!("{status}: {body}"))
    })
}

/// Deliveries fetched and not yet handed out, shared with the ackers: a nack makes
/// the later ones of its partition stale (the broker sends them again).
type Buffer = Arc<Mutex<VecDeque<RecordJson>>>;

struct EmbeddedAcker {
    bus: EmbeddedBus,
    topic: String,
    group: String,
    partition: u32,
    offset: u64,
    token: u64,
    buffer: Buffer,
}

impl EmbeddedAcker {
    async fn settle(self, delay: Option<Duration>) -> Result<(), BusError> {
        self.bus
            .settle(&self.topic, &self.group, self.offset, self.token, delay)
            .await?;
        if delay.is_some() {
            let (partition, offset) = (self.partition, self.offset);
            self.buffer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|r| r.partition != partition || r.offset <= offset);
        }
        Ok(())
    }
}

impl Acker for EmbeddedAcker {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BusError>> {
        Box::pin(self.settle(None))
    }

    fn nack(self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<(), BusError>> {
        Box::pin(self.settle(Some(delay)))
    }
}

struct EmbeddedSubscription {
    bus: EmbeddedBus,
    topic: String,
    group: String,
    member: String,
    options: SubscribeOptions,
    buffer: Buffer,
}

impl EmbeddedSubscription {
    fn pop(&self) -> Option<RecordJson> {
        self.buffer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }
}

impl Subscription for EmbeddedSubscription {
    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, BusError>> {
        Box::pin(async move {
            let r = loop {
                if let Some(r) = self.pop() {
                    break r;
                }
                let body = json!({
                    "member": self.member,
                    "start": StartJson::from(self.options.start.clone()),
                    "max": 64,
                    "wait_ms": u64::try_from(FETCH_WAIT.as_millis()).unwrap_or(20_000),
                    "ack_wait_ms": u64::try_from(self.options.ack_wait.as_millis()).unwrap_or(u64::MAX),
                });
                let url = self.bus.group_url(&self.topic, &self.group, "fetch");
                let response = self
                    .bus
                    .post_json(url, body, FETCH_WAIT + CALL_TIMEOUT)
                    .await?;
                let records: Vec<RecordJson> = response.json().await.map_err(unavailable)?;
                self.buffer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(records);
            };
            let payload = Bytes::from(
                B64.decode(&r.payload)
                    .map_err(|e| BusError::Refused(e.to_string()))?,
            );
            let event = CloudEvent::from_json(&payload);
            let acker = EmbeddedAcker {
                bus: self.bus.clone(),
                topic: self.topic.clone(),
                group: self.group.clone(),
                partition: r.partition,
                offset: r.offset,
                token: r.token.unwrap_or_default(),
                buffer: self.buffer.clone(),
            };
            let at = Position {
                topic: self.topic.clone(),
                key: r.key,
                partition: r.partition,
                offset: r.offset,
                attempt: r.attempt.unwrap_or(1),
            };
            Ok(Delivery::new(at, event, payload, Box::new(acker)))
        })
    }
}

impl EventBus for EmbeddedBus {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        key: &'a str,
        event: &'a CloudEvent,
    ) -> BoxFuture<'a, Result<Option<u64>, BusError>> {
        // Structured mode: the log stores the event document as it is.
        let append = self.append(topic, key, Bytes::from(event.to_json()));
        Box::pin(async move { append.await.map(Some) })
    }

    fn publish_raw<'a>(
        &'a self,
        topic: &'a str,
        key: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Option<u64>, BusError>> {
        Box::pin(async move { self.append(topic, key, payload).await.map(Some) })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, BusError>> {
        Box::pin(async move {
            check_name(topic)?;
            check_name(group)?;
            // Joining creates the group at its start, as the first fetch would.
            let url = self.group_url(topic, group, "fetch");
            let body =
                json!({ "start": StartJson::from(options.start.clone()), "max": 0, "wait_ms": 0 });
            let _ = self.post_json(url, body, CALL_TIMEOUT).await?;
            Ok(Box::new(EmbeddedSubscription {
                bus: self.clone(),
                topic: topic.to_owned(),
                group: group.to_owned(),
                member: uuid::Uuid::new_v4().to_string(),
                options,
                buffer: Buffer::default(),
            }) as Box<dyn Subscription>)
        })
    }

    fn topics(&self) -> BoxFuture<'_, Result<Vec<String>, BusError>> {
        Box::pin(async move {
            let response = self
                .http
                .get(format!("{}/v1/log/topics", self.base))
                .timeout(CALL_TIMEOUT)
                .send()
                .await
                .map_err(unavailable)?;
            let list: Vec<Value> = check(response).await?.json().await.map_err(unavailable)?;
            Ok(list
                .iter()
                .filter_map(|t| t["topic"].as_str().map(str::to_owned))
                .collect())
        })
    }

    fn delete_group<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            check_name(topic)?;
            check_name(group)?;
            let response = self
                .http
                .delete(format!(
                    "{}/v1/log/topics/{topic}/groups/{group}",
                    self.base
                ))
                .timeout(CALL_TIMEOUT)
                .send()
                .await
                .map_err(unavailable)?;
            check(response).await.map(|_| ())
        })
    }

    fn reset<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        start: StartFrom,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            check_name(topic)?;
            check_name(group)?;
            let url = self.group_url(topic, group, "reset");
            self.post_json(
                url,
                json!({ "start": StartJson::from(start) }),
                CALL_TIMEOUT,
            )
            .await
            .map(|_| ())
        })
    }
}
