//! Running a handler over a subscription: acknowledge what it handled, redeliver
//! with growing backoff what failed, and set aside in the dead-letter topic what
//! keeps failing or is not an event at all, so no message stalls its partition.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use sqlx::{AnyConnection, AnyPool};

use crate::bus::{BoxFuture, BusError, Delivery, EventBus, SubscribeOptions};
use crate::envelope::CloudEvent;
use crate::inbox::Inbox;

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

    /// Redelivers an event that fails with [`HandlerError::Retry`] until it is
    /// handled, never dead-lettering it (a [`HandlerError::Reject`] still is, at
    /// once): for a consumer whose events carry state that may not go missing, a
    /// saga's step or a read model's change, where a skipped event breaks an
    /// invariant (stock never sold, a charge never refunded) and a stalled
    /// partition, retried with backoff and logged at each attempt, can be seen and
    /// mended.
    pub fn until_handled(mut self) -> Self {
        self.max_attempts = u32::MAX;
        self
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
    /// The partition of `key`.
    pub partition: u32,
    pub offset: u64,
    pub attempt: u32,
}

impl Meta {
    fn of(d: &Delivery) -> Self {
        Self {
            topic: d.topic.clone(),
            key: d.key.clone(),
            partition: d.partition,
            offset: d.offset,
            attempt: d.attempt,
        }
    }
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
    let spawn = {
        let (bus, config) = (bus.clone(), config.clone());
        move |rx| {
            let (bus, config, handler) = (bus.clone(), config.clone(), handler.clone());
            tokio::spawn(worker(bus, config, handler, rx))
        }
    };
    subscribed(bus, config, shutdown, spawn).await;
}

/// Subscribes until `shutdown` (again after a broker outage) and hands each
/// partition's deliveries, in order, to a worker of its own started by `spawn`.
async fn subscribed<S>(
    bus: Arc<dyn EventBus>,
    config: Arc<ConsumerConfig>,
    shutdown: CancellationToken,
    spawn: S,
) where
    S: Fn(mpsc::Receiver<Delivery>) -> tokio::task::JoinHandle<()>,
{
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
                        tasks.push(spawn(rx));
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
    let meta = Meta::of(&d);
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
    conclude(bus, config, d, outcome).await
}

/// Settles a delivery as its handling ended; `true` if it was nacked.
async fn conclude(
    bus: &dyn EventBus,
    config: &ConsumerConfig,
    d: Delivery,
    outcome: Result<(), HandlerError>,
) -> bool {
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

/// What a [`Transactional`] handler leaves for after its transaction has committed
/// (wake the outbox relay, count, log): none of it runs if the transaction rolls back.
#[derive(Default)]
pub struct AfterCommit(Vec<Box<dyn FnOnce() + Send>>);

impl AfterCommit {
    /// Runs `f` once the transaction has committed.
    pub fn then(&mut self, f: impl FnOnce() + Send + 'static) {
        self.0.push(Box::new(f));
    }

    /// Hands the rows a handler enqueued to `outbox`'s relay once the transaction
    /// has committed, waking it (see [`crate::outbox::Outbox::committed`]).
    pub fn hand_over(
        &mut self,
        outbox: &crate::outbox::Outbox,
        rows: impl IntoIterator<Item = crate::outbox::Enqueued>,
    ) {
        let rows: Vec<_> = rows.into_iter().collect();
        if !rows.is_empty() {
            let outbox = outbox.clone();
            self.then(move || outbox.committed(rows));
        }
    }

    /// Runs what was left, once the transaction has committed.
    fn run(self) {
        for f in self.0 {
            f();
        }
    }
}

/// What [`Transactional::prepare`] hands to [`Transactional::handle`].
pub type Prepared = Option<Box<dyn std::any::Any + Send>>;

/// A handler whose effects are writes to its service's database: [`run_transactional`]
/// claims each event in the inbox and handles the deliveries waiting in a partition
/// in one transaction (one commit, one wake of the relay for the whole window).
pub trait Transactional: Send + Sync + 'static {
    /// Whether `event` is one this handler acts on: `Ok(false)` acknowledges it with
    /// no transaction at all (a type of the topic it has no business with, see
    /// [`triage`]); an error is the event's outcome. All by default.
    fn accepts(&self, event: &CloudEvent, meta: &Meta) -> Result<bool, HandlerError> {
        let _ = (event, meta);
        Ok(true)
    }

    /// Work outside the transaction, before it: a call to another system, whose
    /// latency must not hold the database. Each delivery is prepared as it arrives,
    /// side by side with the partition's earlier deliveries still preparing or
    /// committing, so a later event of the same key may be prepared before an
    /// earlier one commits: `handle`, in the transaction, has the last word, and a
    /// preparation may be thrown away (and done again when the delivery is). Nothing
    /// by default.
    fn prepare<'a>(
        &'a self,
        event: &'a CloudEvent,
        meta: &'a Meta,
    ) -> BoxFuture<'a, Result<Prepared, HandlerError>> {
        let _ = (event, meta);
        Box::pin(std::future::ready(Ok(None)))
    }

    /// Handles `event` inside `tx`, where its id is already claimed in the inbox
    /// (an event handled before never gets here). An error rolls back the whole
    /// window, whose deliveries are then handled one transaction each, so only the
    /// failing one is retried or dead-lettered.
    fn handle<'a>(
        &'a self,
        tx: &'a mut AnyConnection,
        event: &'a CloudEvent,
        meta: &'a Meta,
        prepared: Prepared,
        after: &'a mut AfterCommit,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

/// What one event changes, in the transaction that claimed it.
pub type Apply =
    for<'a> fn(&'a mut AnyConnection, &'a CloudEvent) -> BoxFuture<'a, Result<(), HandlerError>>;

/// A read side's handler: `apply` for the types it `handles`; the topic's other
/// types (`topic_types`) are acknowledged untouched and any other type is rejected
/// ([`triage`]).
#[derive(Clone, Copy)]
pub struct ReadSide {
    pub handles: &'static [&'static str],
    pub topic_types: &'static [&'static str],
    pub apply: Apply,
}

impl Transactional for ReadSide {
    fn accepts(&self, event: &CloudEvent, _meta: &Meta) -> Result<bool, HandlerError> {
        triage(event, self.handles, self.topic_types)
    }

    fn handle<'a>(
        &'a self,
        tx: &'a mut AnyConnection,
        event: &'a CloudEvent,
        _meta: &'a Meta,
        _prepared: Prepared,
        _after: &'a mut AfterCommit,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        (self.apply)(tx, event)
    }
}

/// The database a [`Transactional`] consumer writes and the inbox it claims in.
#[derive(Clone, Debug)]
pub struct Store {
    pub pool: AnyPool,
    pub inbox: Inbox,
}

/// Most deliveries handled in one transaction.
const MAX_WINDOW: usize = 64;

/// Consumes like [`run`], but each partition's waiting deliveries (up to 64) go
/// through `handler` in one transaction of `store`, together with the windows other
/// partitions submitted meanwhile: under load a commit carries many events instead
/// of one, and with one waiting it is one event per transaction as before. A
/// partition's events are committed one after another (a key's in order), each
/// prepared as it arrives; partitions prepare side by side and share commits.
pub async fn run_transactional<H: Transactional>(
    bus: Arc<dyn EventBus>,
    config: ConsumerConfig,
    store: Store,
    shutdown: CancellationToken,
    handler: Arc<H>,
) {
    let config = Arc::new(config);
    let store = Arc::new(store);
    let (commits, submitted) = mpsc::unbounded_channel();
    let committer = tokio::spawn(committer(store.clone(), handler.clone(), submitted));
    let spawn = {
        let (bus, config) = (bus.clone(), config.clone());
        move |rx| {
            let (bus, config, store, handler, commits) = (
                bus.clone(),
                config.clone(),
                store.clone(),
                handler.clone(),
                commits.clone(),
            );
            tokio::spawn(async move {
                let partition = Partition {
                    bus: bus.as_ref(),
                    config: &config,
                    store: &store,
                    handler: &handler,
                    commits,
                };
                windows(partition, rx).await;
            })
        }
    };
    subscribed(bus, config, shutdown, spawn).await;
    // Every partition's worker has ended, and with the last of them the channel.
    let _ = committer.await;
}

/// What a partition's worker works with.
struct Partition<'a, H> {
    bus: &'a dyn EventBus,
    config: &'a ConsumerConfig,
    store: &'a Store,
    handler: &'a Arc<H>,
    /// The consumer's committer.
    commits: mpsc::UnboundedSender<Submitted>,
}

/// A partition's window handed to the consumer's committer, and where it comes
/// back with its verdict.
struct Submitted {
    window: Vec<Taken>,
    /// To be committed in a transaction of its own.
    solo: bool,
    done: oneshot::Sender<(Vec<Taken>, Verdict)>,
}

/// What became of a submitted window.
enum Verdict {
    /// Committed (with the other windows of its group): acknowledge it.
    Committed,
    /// Its transaction failed; `shared` if other partitions' windows were in it
    /// (and the failure may have been theirs).
    RolledBack { shared: bool },
    /// A lone delivery, alone in its group, committed or failed on its own: how
    /// it ended, to settle it with.
    Alone(Result<(), HandlerError>),
}

/// Commits the windows of every partition of a consumer: the windows submitted
/// while a transaction was under way go together into the next one. A broker that
/// hands out one message per partition at a time (NATS, Kafka, RabbitMQ) gives
/// windows of one; under load every partition has one waiting, and they share a
/// commit instead of taking one each. Each partition submits its next window only
/// once the last has come back, so a partition's (and a key's) events still commit
/// in order; with one window waiting, it is committed at once, as before.
async fn committer<H: Transactional>(
    store: Arc<Store>,
    handler: Arc<H>,
    mut submitted: mpsc::UnboundedReceiver<Submitted>,
) {
    // A solo window that arrived while a group was being gathered.
    let mut held: Option<Submitted> = None;
    loop {
        let first = match held.take() {
            Some(first) => first,
            None => match submitted.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let mut group = vec![first];
        if !group[0].solo {
            while let Ok(more) = submitted.try_recv() {
                if more.solo {
                    held = Some(more);
                    break;
                }
                group.push(more);
            }
        }
        if let [only] = &mut group[..]
            && let [taken] = &mut only.window[..]
        {
            let outcome = alone(&store, handler.as_ref(), taken).await;
            if let Some(only) = group.pop() {
                let _ = only.done.send((only.window, Verdict::Alone(outcome)));
            }
            continue;
        }
        let size = group.iter().map(|s| s.window.len()).sum::<usize>();
        // A panic (in what the handler left for after the commit, say) must not end
        // the committer: every partition of the consumer depends on it. Whatever
        // committed before it is claimed in the inbox, so handling it again changes
        // nothing twice.
        let result = AssertUnwindSafe(in_one_transaction(
            &store,
            handler.as_ref(),
            group.iter_mut().flat_map(|s| s.window.iter_mut()),
        ))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| Err("the handler panicked".into()));
        if let Err(reason) = &result {
            tracing::debug!(windows = group.len(), size, reason = %reason, "a group of windows rolled back; each is tried again on its own");
        }
        let shared = group.len() > 1;
        for s in group {
            let verdict = match result {
                Ok(()) => Verdict::Committed,
                Err(_) => Verdict::RolledBack { shared },
            };
            let _ = s.done.send((s.window, verdict));
        }
    }
}

/// A lone delivery's transaction, with the preparation it has.
async fn alone<H: Transactional>(
    store: &Store,
    handler: &H,
    taken: &mut Taken,
) -> Result<(), HandlerError> {
    let prepared = match std::mem::replace(&mut taken.prep, Prep::Done(Ok(None))) {
        Prep::Done(Ok(Some(prepared))) => prepared,
        // Not an event the handler acts on.
        Prep::Done(Ok(None)) => return Ok(()),
        Prep::Done(Err(e)) => return Err(e),
        Prep::Running(_) => {
            return Err(HandlerError::Retry(
                "the delivery was still being prepared".into(),
            ));
        }
    };
    let Ok(event) = &taken.delivery.event else {
        return Err(HandlerError::Reject("malformed event".into()));
    };
    AssertUnwindSafe(commit_one(store, handler, event, &taken.meta, prepared))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| Err(HandlerError::Retry("the handler panicked".into())))
}

/// A delivery taken from a partition's queue, its preparation started as it arrived.
struct Taken {
    delivery: Delivery,
    meta: Meta,
    prep: Prep,
}

/// Where a delivery's [`Transactional::prepare`] is.
enum Prep {
    /// Finished: `Ok(None)` for an event the handler does not act on (acknowledged
    /// with its window, untouched); an error (a malformed event, a failed
    /// preparation) sends the window down the one-delivery-at-a-time path.
    Done(Result<Option<Prepared>, HandlerError>),
    /// Under way on a task of its own: a call to another system.
    Running(tokio::task::JoinHandle<Result<Prepared, HandlerError>>),
}

impl Prep {
    fn finished(&self) -> bool {
        match self {
            Prep::Done(_) => true,
            Prep::Running(task) => task.is_finished(),
        }
    }

    /// Waits for a running preparation and keeps its outcome.
    async fn wait(&mut self) {
        if let Prep::Running(task) = self {
            let outcome = match task.await {
                Ok(prepared) => prepared.map(Some),
                Err(_) => Err(HandlerError::Retry("prepare panicked".into())),
            };
            *self = Prep::Done(outcome);
        }
    }
}

/// Takes `d` in and starts its preparation: inline when it finishes at once (every
/// handler without a `prepare`), else on a task, so a slow call for one delivery
/// runs while earlier ones commit and later ones arrive.
fn take<H: Transactional>(handler: &Arc<H>, delivery: Delivery) -> Taken {
    let meta = Meta::of(&delivery);
    let prep = match &delivery.event {
        Err(e) => Prep::Done(Err(HandlerError::Reject(e.to_string()))),
        Ok(event) => {
            match std::panic::catch_unwind(AssertUnwindSafe(|| handler.accepts(event, &meta)))
                .unwrap_or_else(|_| Err(HandlerError::Retry("the handler panicked".into())))
            {
                Err(e) => Prep::Done(Err(e)),
                Ok(false) => Prep::Done(Ok(None)),
                Ok(true) => {
                    let (handler, event, m) = (handler.clone(), event.clone(), meta.clone());
                    let mut prepare = Box::pin(async move {
                        AssertUnwindSafe(handler.prepare(&event, &m))
                            .catch_unwind()
                            .await
                            .unwrap_or_else(|_| Err(HandlerError::Retry("prepare panicked".into())))
                    });
                    match (&mut prepare).now_or_never() {
                        Some(prepared) => Prep::Done(prepared.map(Some)),
                        None => Prep::Running(tokio::spawn(prepare)),
                    }
                }
            }
        }
    };
    Taken {
        delivery,
        meta,
        prep,
    }
}

/// One partition's deliveries, a window at a time: the longest run at the front of
/// the queue (up to 64) whose preparations have finished. Each delivery's
/// preparation starts when it arrives, so a window never waits for the slowest
/// call of the deliveries behind it, and commits stay in the partition's order.
async fn windows<H: Transactional>(p: Partition<'_, H>, mut rx: mpsc::Receiver<Delivery>) {
    let Partition {
        bus,
        config,
        store,
        handler,
        commits,
    } = p;
    // After a nack the broker sends the key's events again from the nacked one:
    // what was already queued behind it is stale (by key: the nacked offset).
    let mut nacked: HashMap<String, u64> = HashMap::new();
    let mut queue: std::collections::VecDeque<Taken> = std::collections::VecDeque::new();
    let mut open = true;
    'windows: loop {
        if queue.is_empty() {
            match rx.recv().await {
                Some(d) => queue.push_back(take(handler, d)),
                None => return,
            }
        }
        // Until the front is prepared, keep taking in what arrives.
        loop {
            while open && queue.len() < MAX_PREPARING {
                match rx.try_recv() {
                    Ok(d) => queue.push_back(take(handler, d)),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            let room = open && queue.len() < MAX_PREPARING;
            let Some(front) = queue.front_mut() else {
                break;
            };
            if front.prep.finished() {
                front.prep.wait().await;
                break;
            }
            let arrived = tokio::select! {
                () = front.prep.wait() => break,
                d = rx.recv(), if room => d,
            };
            match arrived {
                Some(d) => queue.push_back(take(handler, d)),
                None => open = false,
            }
        }
        let mut ready = 0;
        for taken in queue.iter_mut().take(MAX_WINDOW) {
            if !taken.prep.finished() {
                break;
            }
            taken.prep.wait().await;
            ready += 1;
        }
        let mut window: Vec<Taken> = queue.drain(..ready).collect();
        window.retain(|t| match nacked.get(&t.delivery.key) {
            Some(&n) if t.delivery.offset > n => false,
            Some(_) => {
                nacked.remove(&t.delivery.key);
                true
            }
            None => true,
        });
        if window.is_empty() {
            continue;
        }
        // A window whose deliveries are all prepared goes to the committer, to share
        // a transaction with other partitions' windows; one with a malformed event or
        // a failed preparation is handled one delivery at a time.
        let mut lone = window.len() == 1;
        let mut solo = false;
        while window
            .iter()
            .all(|t| t.delivery.event.is_ok() && matches!(t.prep, Prep::Done(Ok(_))))
        {
            let (done, verdict) = oneshot::channel();
            if commits.send(Submitted { window, solo, done }).is_err() {
                // No committer (the consumer is stopping): the broker hands these
                // out again.
                return;
            }
            let Ok((returned, verdict)) = verdict.await else {
                return;
            };
            window = returned;
            match verdict {
                Verdict::Committed => {
                    let acks =
                        futures::future::join_all(window.into_iter().map(|t| t.delivery.ack()));
                    for result in acks.await {
                        if let Err(e) = result {
                            tracing::warn!(topic = %config.topic, error = %e, "could not settle a delivery");
                        }
                    }
                    continue 'windows;
                }
                Verdict::Alone(outcome) => {
                    if let Some(taken) = window.into_iter().next() {
                        let (key, offset) = (taken.delivery.key.clone(), taken.delivery.offset);
                        if conclude(bus, config, taken.delivery, outcome).await {
                            nacked.insert(key, offset);
                        }
                    }
                    continue 'windows;
                }
                // It shared the failed transaction with other partitions' windows:
                // prepared again (its preparations went into that transaction) and
                // committed on its own, so another's failure costs it one retry.
                Verdict::RolledBack { shared: true } if !solo => {
                    solo = true;
                    window = window
                        .into_iter()
                        .map(|t| take(handler, t.delivery))
                        .collect();
                    for t in &mut window {
                        t.prep.wait().await;
                    }
                }
                // Its preparations went into the failed transaction: each delivery
                // is prepared again, one at a time.
                Verdict::RolledBack { .. } => {
                    lone = false;
                    break;
                }
            }
        }
        // A lone delivery is settled with the preparation it has; a delivery of a
        // window is prepared again.
        for Taken {
            delivery,
            meta,
            prep,
        } in window
        {
            if nacked
                .get(&delivery.key)
                .is_some_and(|&n| delivery.offset > n)
            {
                continue;
            }
            let prepared = match prep {
                Prep::Done(outcome) if lone => Some(outcome),
                _ => None,
            };
            let settled = settle_alone(
                bus,
                config,
                store,
                handler.as_ref(),
                delivery,
                &meta,
                prepared,
            );
            if let Some((key, offset)) = settled.await {
                nacked.insert(key, offset);
            }
        }
    }
}

/// Handles `delivery` in a transaction of its own, with its preparation's outcome
/// (`None`: prepare it now), and settles it: acknowledged, dead-lettered, or nacked
/// for a retry (its key and offset returned, for the partition's `nacked`).
async fn settle_alone<H: Transactional>(
    bus: &dyn EventBus,
    config: &ConsumerConfig,
    store: &Store,
    handler: &H,
    delivery: Delivery,
    meta: &Meta,
    prepared: Option<Result<Option<Prepared>, HandlerError>>,
) -> Option<(String, u64)> {
    let (key, offset) = (delivery.key.clone(), delivery.offset);
    let outcome = match (&delivery.event, prepared) {
        (Err(e), _) => Err(HandlerError::Reject(e.to_string())),
        (Ok(_), Some(Err(e))) => Err(e),
        // Not an event the handler acts on.
        (Ok(_), Some(Ok(None))) => Ok(()),
        (Ok(event), prepared) => AssertUnwindSafe(async {
            match prepared {
                Some(Ok(Some(prepared))) => commit_one(store, handler, event, meta, prepared).await,
                // Not prepared yet (the other outcomes are matched above).
                _ => handle_one(store, handler, event, meta).await,
            }
        })
        .catch_unwind()
        .await
        .unwrap_or_else(|_| Err(HandlerError::Retry("the handler panicked".into()))),
    };
    conclude(bus, config, delivery, outcome)
        .await
        .then_some((key, offset))
}

/// Deliveries of a partition taken in and being prepared at most.
const MAX_PREPARING: usize = 2 * MAX_WINDOW;

/// Handles every prepared delivery of `window` in one transaction and commits it;
/// on any failure nothing is committed (and the reason is returned).
async fn in_one_transaction<'w, H: Transactional>(
    store: &Store,
    handler: &H,
    window: impl Iterator<Item = &'w mut Taken>,
) -> Result<(), String> {
    let mut accepted = Vec::with_capacity(window.size_hint().0);
    for taken in window {
        let prepared = match std::mem::replace(&mut taken.prep, Prep::Done(Ok(None))) {
            Prep::Done(Ok(Some(prepared))) => prepared,
            Prep::Done(Ok(None)) => continue,
            Prep::Done(Err(e)) => return Err(e.to_string()),
            Prep::Running(_) => {
                return Err("a delivery of the window is still being prepared".into());
            }
        };
        let Ok(event) = &taken.delivery.event else {
            return Err("malformed event".into());
        };
        accepted.push((event, &taken.meta, prepared));
    }
    if accepted.is_empty() {
        return Ok(());
    }
    let mut tx = store.pool.begin().await.map_err(|e| e.to_string())?;
    let mut after = AfterCommit::default();
    for (event, meta, prepared) in accepted {
        if !store
            .inbox
            .claim(&mut tx, &event.id)
            .await
            .map_err(|e| e.to_string())?
        {
            continue;
        }
        // Dropping `tx` on a failure rolls the window back.
        match AssertUnwindSafe(handler.handle(&mut tx, event, meta, prepared, &mut after))
            .catch_unwind()
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("the handler panicked".into()),
        }
    }
    tx.commit().await.map_err(|e| e.to_string())?;
    after.run();
    Ok(())
}

/// One event in a transaction of its own: prepared, claimed in the inbox, handled,
/// committed, then what it left for after the commit. What the consumer does when a
/// window fails, and what a test or a service's one-event entry point calls.
pub async fn handle_one<H: Transactional>(
    store: &Store,
    handler: &H,
    event: &CloudEvent,
    meta: &Meta,
) -> Result<(), HandlerError> {
    if !handler.accepts(event, meta)? {
        return Ok(());
    }
    let prepared = handler.prepare(event, meta).await?;
    commit_one(store, handler, event, meta, prepared).await
}

/// A prepared event in a transaction of its own: claimed in the inbox, handled,
/// committed, then what it left for after the commit.
async fn commit_one<H: Transactional>(
    store: &Store,
    handler: &H,
    event: &CloudEvent,
    meta: &Meta,
    prepared: Prepared,
) -> Result<(), HandlerError> {
    let mut tx = store.pool.begin().await?;
    let mut after = AfterCommit::default();
    if store.inbox.claim(&mut tx, &event.id).await? {
        handler
            .handle(&mut tx, event, meta, prepared, &mut after)
            .await?;
    }
    tx.commit().await?;
    after.run();
    Ok(())
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
