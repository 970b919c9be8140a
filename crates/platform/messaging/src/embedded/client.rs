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
/// Batch calls in flight at once.
const BATCHES_IN_FLIGHT: usize = 4;

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
    batcher: Arc<std::sync::OnceLock<mpsc::Sender<Publish>>>,
}

#[derive(Debug)]
struct Publish {
    topic: String,
    key: String,
    payload: Bytes,
    reply: oneshot::Sender<Result<u64, BusError>>,
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
            batcher: Arc::default(),
        }
    }

    /// The batcher task's queue, started on first use. The task ends when every
    /// clone of this bus is gone (it holds no clone itself).
    fn batcher(&self) -> &mpsc::Sender<Publish> {
        self.batcher.get_or_init(|| {
            let (tx, rx) = mpsc::channel(BATCH_RECORDS * BATCHES_IN_FLIGHT);
            tokio::spawn(batch_loop(self.base.clone(), self.http.clone(), rx));
            tx
        })
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
        self.batcher().send(publish).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

/// Takes every publish waiting, one call per topic, a few calls in flight.
async fn batch_loop(base: String, http: reqwest::Client, mut queue: mpsc::Receiver<Publish>) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        let mut by_topic: HashMap<String, Vec<Publish>> = HashMap::new();
        let mut bytes = first.payload.len();
        let mut count = 1;
        by_topic.entry(first.topic.clone()).or_default().push(first);
        while count < BATCH_RECORDS && bytes < BATCH_BYTES {
            match queue.try_recv() {
                Ok(p) => {
                    bytes += p.payload.len() + p.key.len();
                    count += 1;
                    by_topic.entry(p.topic.clone()).or_default().push(p);
                }
                Err(_) => break,
            }
        }
        for (topic, batch) in by_topic {
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                return;
            };
            let (base, http) = (base.clone(), http.clone());
            tokio::spawn(async move {
                send_batch(&base, &http, &topic, batch).await;
                drop(permit);
            });
        }
    }
}

async fn send_batch(base: &str, http: &reqwest::Client, topic: &str, batch: Vec<Publish>) {
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
        Err(e) => {
            let text = e.to_string();
            for p in batch {
                let error = match &e {
                    BusError::Refused(_) => BusError::Refused(text.clone()),
                    _ => BusError::Unavailable(text.clone()),
                };
                let _ = p.reply.send(Err(error));
            }
        }
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
    async fn settle(self, verb: &str, delay: Option<Duration>) -> Result<(), BusError> {
        let mut body = json!({ "offset": self.offset, "token": self.token });
        if let Some(d) = delay {
            body["delay_ms"] = json!(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        }
        let url = self.bus.group_url(&self.topic, &self.group, verb);
        self.bus.post_json(url, body, CALL_TIMEOUT).await?;
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
        Box::pin(self.settle("ack", None))
    }

    fn nack(self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<(), BusError>> {
        Box::pin(self.settle("nack", Some(delay)))
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
    ) -> BoxFuture<'a, Result<u64, BusError>> {
        // Structured mode: the log stores the event document as it is.
        Box::pin(self.append(topic, key, Bytes::from(event.to_json())))
    }

    fn publish_raw<'a>(
        &'a self,
        topic: &'a str,
        key: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<u64, BusError>> {
        Box::pin(self.append(topic, key, payload))
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
