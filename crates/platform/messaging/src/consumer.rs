//! Running a handler over a subscription: acknowledge what it handled, redeliver
//! with growing backoff what failed, and set aside in the dead-letter topic what
//! keeps failing or is not an event at all, so no message stalls its partition.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::{BusError, Delivery, EventBus, SubscribeOptions};
use crate::envelope::CloudEvent;

/// Type of the events in a dead-letter topic.
pub const DEAD_LETTER_TYPE: &str = "bazaar.dead_letter";

/// The dead-letter topic of `topic`.
pub fn dead_letter_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// Why a handler did not handle an event.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth trying again (a dependency was down): redelivered with backoff, then
    /// dead-lettered after the last attempt.
    #[error("{0}")]
    Retry(String),
    /// Will never succeed (the event makes no sense here): dead-lettered now.
    #[error("{0}")]
    Reject(String),
}

#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    pub topic: String,
    pub group: String,
    pub options: SubscribeOptions,
    /// Deliveries before an event that keeps failing is dead-lettered.
    pub max_attempts: u32,
    /// Backoff before redelivery: doubles per attempt from `base` up to `max`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

impl ConsumerConfig {
    pub fn new(topic: &str, group: &str) -> Self {
        Self {
            topic: topic.to_owned(),
            group: group.to_owned(),
            options: SubscribeOptions::default(),
            max_attempts: 5,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.base_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// Sorts an event for a handler that knows its topic's types: `Ok(true)` to handle
/// it, `Ok(false)` for a type of the topic it has no business with, and a reject
/// (dead letter) for a type nobody declared for the topic: a producer's mistake
/// should be seen, not silently skipped.
pub fn triage(
    event: &CloudEvent,
    handles: &[&str],
    topic_types: &[&str],
) -> Result<bool, HandlerError> {
    if handles.contains(&event.ty.as_str()) {
        Ok(true)
    } else if topic_types.contains(&event.ty.as_str()) {
        Ok(false)
    } else {
        Err(HandlerError::Reject(format!(
            "unknown event type `{}` (this topic carries {})",
            event.ty,
            topic_types.join(", ")
        )))
    }
}

/// What a handler learns besides the event.
#[derive(Clone, Debug)]
pub struct Meta {
    pub topic: String,
    pub key: String,
    pub offset: u64,
    pub attempt: u32,
}

/// Consumes until `shutdown`, re-subscribing after broker outages. Each partition
/// has a worker; within it each key's deliveries are handled one after another (a
/// key's events in order) while different keys and partitions run concurrently.
pub async fn run<F, Fut>(
    bus: Arc<dyn EventBus>,
    config: ConsumerConfig,
    shutdown: CancellationToken,
    handler: F,
) where
    F: Fn(CloudEvent, Meta) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    let handler = Arc::new(handler);
    let config = Arc::new(config);
    while !shutdown.is_cancelled() {
        let mut subscription = tokio::select! {
            () = shutdown.cancelled() => return,
            s = bus.subscribe(&config.topic, &config.group, config.options.clone()) => match s {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(topic = %config.topic, group = %config.group, error = %e, "cannot subscribe; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        let mut workers: HashMap<u32, mpsc::Sender<Delivery>> = HashMap::new();
        let mut tasks = Vec::new();
        loop {
            let delivery = tokio::select! {
                () = shutdown.cancelled() => break,
                d = subscription.next() => d,
            };
            match delivery {
                Ok(d) => {
                    let tx = workers.entry(d.partition).or_insert_with(|| {
                        let (tx, rx) = mpsc::channel(WORKER_QUEUE);
                        let (bus, config, handler) = (bus.clone(), config.clone(), handler.clone());
                        tasks.push(tokio::spawn(worker(bus, config, handler, rx)));
                        tx
                    });
                    if tx.send(d).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(topic = %config.topic, group = %config.group, error = %e, "subscription broke; re-subscribing");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
            }
        }
        // Workers finish what they hold (the broker redelivers the rest).
        drop(workers);
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// Deliveries waiting for one partition's worker.
const WORKER_QUEUE: usize = 64;

/// Keys of one partition handled at once. A key's deliveries go one after another
/// through its lane; different keys run side by side where the broker lets a member
/// hold several of a partition's messages (the embedded log's window; others hand
/// out one at a time, so their lanes simply take turns).
const LANES: usize = 16;

type Lane = (mpsc::UnboundedSender<Delivery>, tokio::task::JoinHandle<()>);

async fn worker<F, Fut>(
    bus: Arc<dyn EventBus>,
    config: Arc<ConsumerConfig>,
    handler: Arc<F>,
    mut deliveries: mpsc::Receiver<Delivery>,
) where
    F: Fn(CloudEvent, Meta) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    let permits = Arc::new(tokio::sync::Semaphore::new(LANES));
    let mut lanes: HashMap<String, Lane> = HashMap::new();
    while let Some(d) = deliveries.recv().await {
        // The key's lane, if it is still taking deliveries.
        let d = match lanes.get(&d.key) {
            Some((tx, _)) => match tx.send(d) {
                Ok(()) => continue,
                Err(mpsc::error::SendError(d)) => d,
            },
            None => d,
        };
        // A new lane, which starts once the key's previous one has finished, so a
        // key's deliveries never overlap.
        let previous = lanes.remove(&d.key).map(|(_, handle)| handle);
        lanes.retain(|_, (_, handle)| !handle.is_finished());
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let key = d.key.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(d);
        let (bus, config, handler) = (bus.clone(), config.clone(), handler.clone());
        let handle = tokio::spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            lane(bus.as_ref(), &config, handler.as_ref(), rx).await;
            drop(permit);
        });
        lanes.insert(key, (tx, handle));
    }
    for (_, (tx, handle)) in lanes {
        drop(tx);
        let _ = handle.await;
    }
}

/// One key's deliveries, in order, until none is waiting.
async fn lane<F, Fut>(
    bus: &dyn EventBus,
    config: &ConsumerConfig,
    handler: &F,
    mut rx: mpsc::UnboundedReceiver<Delivery>,
) where
    F: Fn(CloudEvent, Meta) -> Fut + Send + Sync,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    // After a nack the broker sends the partition again from its first unsettled
    // message: what was already queued behind the nacked one is stale.
    let mut stale_after: Option<u64> = None;
    loop {
        let d = match rx.try_recv() {
            Ok(d) => d,
            Err(mpsc::error::TryRecvError::Empty) => {
                // Idle: refuse more (the worker starts a new lane after this one),
                // then handle what arrived before the refusal.
                rx.close();
                match rx.try_recv() {
                    Ok(d) => d,
                    Err(_) => return,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => return,
        };
        if let Some(nacked) = stale_after {
            if d.offset > nacked {
                continue;
            }
            stale_after = None;
        }
        let offset = d.offset;
        if settle(bus, config, handler, d).await {
            stale_after = Some(offset);
        }
    }
}

/// Handles one delivery; `true` if it was nacked (it comes back).
async fn settle<F, Fut>(
    bus: &dyn EventBus,
    config: &ConsumerConfig,
    handler: &F,
    d: Delivery,
) -> bool
where
    F: Fn(CloudEvent, Meta) -> Fut + Send + Sync,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    let meta = Meta {
        topic: d.topic.clone(),
        key: d.key.clone(),
        offset: d.offset,
        attempt: d.attempt,
    };
    let event = match &d.event {
        Ok(event) => event.clone(),
        Err(e) => {
            let reason = e.to_string();
            return dead_letter(bus, config, d, reason).await;
        }
    };
    let outcome = AssertUnwindSafe(handler(event, meta))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| Err(HandlerError::Retry("the handler panicked".into())));
    let (result, nacked) = match outcome {
        Ok(()) => (d.ack().await, false),
        Err(HandlerError::Reject(reason)) => return dead_letter(bus, config, d, reason).await,
        Err(HandlerError::Retry(reason)) if d.attempt >= config.max_attempts => {
            let reason = format!("failed {} times; last: {reason}", d.attempt);
            return dead_letter(bus, config, d, reason).await;
        }
        Err(HandlerError::Retry(reason)) => {
            let delay = config.backoff(d.attempt);
            tracing::warn!(topic = %config.topic, group = %config.group, offset = d.offset, attempt = d.attempt, reason = %reason, retry_in = ?delay, "handler failed; will retry");
            (d.nack(delay).await, true)
        }
    };
    if let Err(e) = result {
        // Unsettled: the broker redelivers after the ack wait.
        tracing::warn!(topic = %config.topic, error = %e, "could not settle a delivery");
    }
    nacked
}

/// Publishes the delivery to the dead-letter topic with the reason, then acks it;
/// if the dead-letter topic cannot take it, the delivery is nacked (`true`), never
/// dropped.
async fn dead_letter(
    bus: &dyn EventBus,
    config: &ConsumerConfig,
    d: Delivery,
    reason: String,
) -> bool {
    let original: Value = match &d.event {
        Ok(event) => serde_json::to_value(event).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let letter = CloudEvent::new(
        &format!("/bazaar/consumers/{}", config.group),
        DEAD_LETTER_TYPE,
        Some(&d.key),
        json!({
            "topic": d.topic, "group": config.group, "offset": d.offset,
            "attempts": d.attempt, "reason": reason, "event": original,
            "payload": String::from_utf8_lossy(&d.payload),
        }),
    );
    tracing::error!(topic = %d.topic, group = %config.group, offset = d.offset, reason = %reason, "dead-lettered");
    let (settled, nacked) = match bus
        .publish(&dead_letter_topic(&config.topic), &d.key, &letter)
        .await
    {
        Ok(_) => (d.ack().await, false),
        Err(e) => {
            tracing::warn!(error = %e, "dead-letter topic unavailable; the message comes back");
            let delay = config.backoff(d.attempt);
            (d.nack(delay).await, true)
        }
    };
    if let Err(e) = settled {
        tracing::warn!(error = %e, "could not settle a dead-lettered delivery");
    }
    nacked
}

/// A database failing a handler is worth retrying (it may be restarting, or locked).
impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        HandlerError::Retry(format!("database: {e}"))
    }
}

/// So does an outbox write failing inside the handler's transaction.
impl From<crate::outbox::OutboxError> for HandlerError {
    fn from(e: crate::outbox::OutboxError) -> Self {
        HandlerError::Retry(format!("outbox: {e}"))
    }
}

impl From<BusError> for HandlerError {
    fn from(e: BusError) -> Self {
        HandlerError::Retry(e.to_string())
    }
}
