//! Kafka backend, for any broker speaking the Kafka protocol (Apache Kafka, Redpanda,
//! tansu), through librdkafka.
//!
//! A topic is the Kafka topic `<prefix>.<topic>`. Bazaar picks the partition itself
//! with the hash every backend uses, so a key lands on the same partition whatever
//! the broker. A consumer group is the Kafka group `<prefix>.<topic>:<group>`, and
//! Kafka's group protocol gives each member whole partitions: members share the work
//! and a partition (so a key) has one reader at a time.
//!
//! Each subscription runs librdkafka's consumer on a thread of its own (its rebalance
//! callbacks must block) and hands out one message per partition at a time. An ack
//! moves the partition's commit point; a nack keeps the message and hands it out again
//! after the delay (nothing behind it in the partition can overtake it); a delivery
//! neither acked nor nacked within the ack wait is handed out again. When partitions
//! move to another member, the old owner waits (up to the ack wait) for what it has in
//! flight, commits, and only then lets them go, so a handover neither skips nor
//! repeats a settled message.
//!
//! Offsets are Kafka's, per partition: [`StartFrom::Offset`] starts every partition
//! at that offset (or its end). Kafka keeps no delivery count, so a message that
//! changes owner starts again at attempt 1; the owner counts its own redeliveries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::bus::{
    BoxFuture, BusError, Delivery, EventBus, StartFrom, SubscribeOptions, Subscription, check_name,
    partition,
};
use crate::envelope::CloudEvent;
use crate::handout::{self, Fetched, Member, Part, State};

/// Settings of the Kafka backend.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    /// First part of every topic and group name.
    pub prefix: String,
    /// Partitions of the topics Bazaar creates: the most members of one group that
    /// work at once. An existing topic keeps the count it has.
    pub partitions: u32,
    /// Replicas of the topics Bazaar creates.
    pub replication: i32,
    /// Retention of the topics Bazaar creates.
    pub retention: Duration,
    /// A member that stops heartbeating (its process died) loses its partitions
    /// after this long.
    pub session_timeout: Duration,
    /// The longest a fetch waits on the broker for new messages. Kafka answers as
    /// soon as there are some; tansu 0.6 always waits this long, so it bounds the
    /// latency there.
    pub fetch_wait: Duration,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".to_owned(),
            prefix: "bazaar".to_owned(),
            partitions: 8,
            replication: 1,
            retention: Duration::from_secs(7 * 24 * 3600),
            session_timeout: Duration::from_secs(10),
            fetch_wait: Duration::from_millis(100),
        }
    }
}

/// A Kafka-backed [`EventBus`]. Cheap to clone.
#[derive(Clone)]
pub struct KafkaBus {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    producer: FutureProducer<Logs>,
    admin: AdminClient<Logs>,
    /// Topics known to exist, with their partition count.
    topics: Mutex<HashMap<String, u32>>,
}

/// How long a call to the broker may take before it counts as unavailable.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind, still consistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Routes librdkafka's log lines into `tracing` (the rest of Bazaar's logs).
#[derive(Clone, Default)]
struct Logs;

fn log_to_tracing(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(facility, "librdkafka: {message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(facility, "librdkafka: {message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(facility, "librdkafka: {message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(facility, "librdkafka: {message}"),
    }
}

impl ClientContext for Logs {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_to_tracing(level, facility, message);
    }
}

impl ConsumerContext for Logs {}

impl KafkaBus {
    /// Builds the clients; they connect lazily and reconnect by themselves, so a
    /// broker that is down now is not an error (publishes fail until it is back).
    pub fn connect(config: KafkaConfig) -> Result<Self, BusError> {
        let producer: FutureProducer<Logs> = base_config(&config.brokers)
            // Durable: every in-sync replica has it before the publish returns.
            .set("acks", "all")
            // Not idempotent: a Kafka-protocol broker that cannot bump a producer's
            // epoch (tansu) leaves an idempotent producer stuck after a publish
            // timed out in an outage. At least once instead: a retried publish may
            // duplicate (consumers' inboxes drop it); it cannot reorder a key, as
            // the outbox relay publishes a key's next event only after the last
            // one was acknowledged.
            .set("enable.idempotence", "false")
            .set("linger.ms", "1")
            // A publish fails after this; the outbox relay tries it again later.
            .set("message.timeout.ms", "10000")
            .create_with_context(Logs)
            .map_err(|e| BusError::Refused(format!("kafka producer: {e}")))?;
        let admin = base_config(&config.brokers)
            .create_with_context(Logs)
            .map_err(|e| BusError::Refused(format!("kafka admin client: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                producer,
                admin,
                topics: Mutex::new(HashMap::new()),
            }),
        })
    }

    fn topic_name(&self, topic: &str) -> String {
        format!("{}.{topic}", self.inner.config.prefix)
    }

    fn group_id(&self, topic: &str, group: &str) -> String {
        // `:` cannot occur in a name: topic `a.b` group `c` and topic `a` group
        // `b.c` stay apart.
        format!("{}.{topic}:{group}", self.inner.config.prefix)
    }

    /// Creates `topic` unless it exists: its Kafka name and partition count.
    async fn ensure_topic(&self, topic: &str) -> Result<(String, u32), BusError> {
        check_name(topic)?;
        let name = self.topic_name(topic);
        if let Some(count) = lock(&self.inner.topics).get(&name) {
            return Ok((name, *count));
        }
        let config = &self.inner.config;
        let retention = config.retention.as_millis().to_string();
        let new = NewTopic::new(
            &name,
            i32::try_from(config.partitions.max(1)).unwrap_or(i32::MAX),
            TopicReplication::Fixed(config.replication),
        )
        .set("retention.ms", &retention);
        let options = AdminOptions::new().operation_timeout(Some(CALL_TIMEOUT));
        let results = self
            .inner
            .admin
            .create_topics([&new], &options)
            .await
            .map_err(unavailable)?;
        let count = match results.into_iter().next() {
            Some(Ok(_)) => config.partitions.max(1),
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => self.partitions(&name).await?,
            Some(Err((_, code))) => return Err(BusError::Refused(format!("topic {name}: {code}"))),
            None => return Err(BusError::Refused(format!("topic {name}: no answer"))),
        };
        lock(&self.inner.topics).insert(name.clone(), count);
        Ok((name, count))
    }

    /// The partition count of an existing topic.
    async fn partitions(&self, name: &str) -> Result<u32, BusError> {
        let inner = self.inner.clone();
        let name = name.to_owned();
        blocking(move || {
            let metadata = inner
                .producer
                .client()
                .fetch_metadata(Some(&name), CALL_TIMEOUT)
                .map_err(unavailable)?;
            let count = metadata
                .topics()
                .iter()
                .find(|t| t.name() == name)
                .map_or(0, |t| t.partitions().len());
            match u32::try_from(count) {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(BusError::Unavailable(format!(
                    "topic {name} has no partitions yet"
                ))),
            }
        })
        .await
    }

    async fn send(
        &self,
        topic: &str,
        key: &str,
        headers: OwnedHeaders,
        payload: &[u8],
    ) -> Result<Option<u64>, BusError> {
        let (name, partitions) = self.ensure_topic(topic).await?;
        let record = FutureRecord::to(&name)
            .partition(i32::try_from(partition(key, partitions)).unwrap_or(0))
            .key(key)
            .payload(payload)
            .headers(headers);
        let delivered = self
            .inner
            .producer
            .send(record, CALL_TIMEOUT)
            .await
            .map_err(|(e, _)| unavailable(e))?;
        Ok(u64::try_from(delivered.offset).ok())
    }

    /// A consumer of `group_id` that is not a group member: it reads and writes the
    /// group's committed offsets, which Kafka allows while the group has no members.
    fn admin_consumer(&self, group_id: &str) -> Result<BaseConsumer<Logs>, BusError> {
        base_config(&self.inner.config.brokers)
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .create_with_context(Logs)
            .map_err(|e| BusError::Refused(format!("kafka consumer: {e}")))
    }

    /// Commits `start` as the position of every partition of `name` for `group_id`.
    /// `only_if_new` leaves a group that already has positions alone.
    async fn position_group(
        &self,
        name: &str,
        partitions: u32,
        group_id: &str,
        start: StartFrom,
        only_if_new: bool,
    ) -> Result<(), BusError> {
        let consumer = self.admin_consumer(group_id)?;
        let name = name.to_owned();
        let group = group_id.to_owned();
        blocking(move || {
            if !only_if_new {
                wait_until_empty(&consumer, &group)?;
            }
            let all = (0..i32::try_from(partitions).unwrap_or(i32::MAX)).collect::<Vec<_>>();
            let mut list = TopicPartitionList::new();
            for p in &all {
                list.add_partition(&name, *p);
            }
            if only_if_new {
                let committed = consumer
                    .committed_offsets(list.clone(), CALL_TIMEOUT)
                    .map_err(unavailable)?;
                let known = committed
                    .elements()
                    .iter()
                    .any(|e| matches!(e.offset(), Offset::Offset(_)));
                if known {
                    return Ok(());
                }
            }
            let mut at = TopicPartitionList::new();
            let times = match &start {
                StartFrom::Time(t) => {
                    let ms = i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
                    let mut query = TopicPartitionList::new();
                    for p in &all {
                        query
                            .add_partition_offset(&name, *p, Offset::Offset(ms))
                            .map_err(unavailable)?;
                    }
                    Some(
                        consumer
                            .offsets_for_times(query, CALL_TIMEOUT)
                            .map_err(unavailable)?,
                    )
                }
                _ => None,
            };
            for p in &all {
                let (low, high) = consumer
                    .fetch_watermarks(&name, *p, CALL_TIMEOUT)
                    .map_err(unavailable)?;
                let offset = match &start {
                    StartFrom::Earliest => low,
                    StartFrom::Latest => high,
                    StartFrom::Offset(n) => i64::try_from(*n).unwrap_or(i64::MAX).clamp(low, high),
                    StartFrom::Time(_) => match times
                        .as_ref()
                        .and_then(|t| t.find_partition(&name, *p))
                        .map(|e| e.offset())
                    {
                        Some(Offset::Offset(o)) => o.clamp(low, high),
                        // No message at or after that time.
                        _ => high,
                    },
                };
                at.add_partition_offset(&name, *p, Offset::Offset(offset))
                    .map_err(unavailable)?;
            }
            consumer.commit(&at, CommitMode::Sync).map_err(|e| match e {
                KafkaError::ConsumerCommit(
                    RDKafkaErrorCode::UnknownMemberId
                    | RDKafkaErrorCode::IllegalGeneration
                    | RDKafkaErrorCode::RebalanceInProgress,
                ) => BusError::Refused(format!(
                    "group {group} has members; stop them before moving its position"
                )),
                e => unavailable(e),
            })
        })
        .await
    }
}

/// Waits for `group`'s members to be gone (a subscription just dropped is still
/// committing and leaving): moving a group's position under live members would be
/// undone by their next commit.
fn wait_until_empty(consumer: &BaseConsumer<Logs>, group: &str) -> Result<(), BusError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let list = consumer
            .fetch_group_list(Some(group), CALL_TIMEOUT)
            .map_err(unavailable)?;
        let members = list
            .groups()
            .iter()
            .map(|g| g.members().len())
            .sum::<usize>();
        if members == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(BusError::Refused(format!(
                "group {group} has {members} member(s); stop them before moving its position"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn base_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        // Come back quickly after an outage instead of backing off to 10 s.
        .set("reconnect.backoff.max.ms", "1000")
        .set_log_level(RDKafkaLogLevel::Warning);
    config
}

/// Runs a blocking librdkafka call off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BusError> + Send + 'static,
) -> Result<T, BusError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BusError::Unavailable(format!("kafka call failed: {e}")))?
}

// ---------------------------------------------------------------------------
// Consuming

fn fetched(m: &BorrowedMessage<'_>) -> Fetched {
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .filter_map(|header| {
                    let value = std::str::from_utf8(header.value?).ok()?;
                    Some((header.key.to_owned(), value.to_owned()))
                })
                .collect()
        })
        .unwrap_or_default();
    Fetched {
        offset: u64::try_from(m.offset()).unwrap_or_default(),
        key: m
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default(),
        payload: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
        headers,
    }
}

/// Kafka numbers partitions with `i32`, Bazaar with `u32`.
fn ours(partition: i32) -> u32 {
    u32::try_from(partition).unwrap_or_default()
}

fn theirs(partition: u32) -> i32 {
    i32::try_from(partition).unwrap_or(i32::MAX)
}

fn kafka_offset(offset: u64) -> Offset {
    Offset::Offset(i64::try_from(offset).unwrap_or(i64::MAX))
}

/// What Kafka's side of a partition adds to the hand-out state.
#[derive(Default)]
struct Fetching {
    /// The commit the broker confirmed.
    committed_to: Option<u64>,
    paused: bool,
}

/// Past this many buffered messages a partition stops fetching, and resumes under
/// the low mark.
const HIGH_WATER: usize = 2_000;
const LOW_WATER: usize = 500;
/// Commits of settled offsets are sent at most this often.
const COMMIT_EVERY: Duration = Duration::from_millis(50);

struct Shared {
    state: Mutex<State<Fetching>>,
    wake: tokio::sync::Notify,
    /// Something in flight was settled (a revocation waits on it).
    settled: Condvar,
    closed: AtomicBool,
    ack_wait: Duration,
    topic: String,
    kafka_topic: String,
}

impl Member for Shared {
    type Extra = Fetching;

    fn with_state<R>(&self, f: impl FnOnce(&mut State<Fetching>) -> R) -> R {
        f(&mut lock(&self.state))
    }

    fn wake(&self) -> &tokio::sync::Notify {
        &self.wake
    }

    fn settled(&self) {
        self.settled.notify_all();
    }

    fn ack_wait(&self) -> Duration {
        self.ack_wait
    }

    fn topic(&self) -> &str {
        &self.topic
    }
}

/// The consumer's callbacks, run on its thread inside `poll`.
struct Callbacks {
    shared: Arc<Shared>,
}

impl ClientContext for Callbacks {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_to_tracing(level, facility, message);
    }
}

impl ConsumerContext for Callbacks {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else {
            return;
        };
        let shared = &self.shared;
        let revoked: Vec<u32> = list
            .elements()
            .iter()
            .map(|e| ours(e.partition()))
            .collect();
        let deadline = Instant::now() + shared.ack_wait;
        let mut state = lock(&shared.state);
        // Let the handlers finish what they hold, so the next owner does not get
        // it a second time (unless the subscription is gone: nobody will settle).
        loop {
            let busy = revoked.iter().any(|p| state.busy(*p));
            let now = Instant::now();
            if !busy || shared.closed.load(Ordering::Acquire) || now >= deadline {
                break;
            }
            state = match shared.settled.wait_timeout(state, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        let mut commit = TopicPartitionList::new();
        for p in revoked {
            if let Some(part) = state.parts.remove(&p)
                && let Some(to) = part
                    .acked_to
                    .filter(|to| Some(*to) != part.extra.committed_to)
            {
                let _ =
                    commit.add_partition_offset(&shared.kafka_topic, theirs(p), kafka_offset(to));
            }
        }
        drop(state);
        if commit.count() > 0
            && let Err(e) = consumer.commit(&commit, CommitMode::Sync)
        {
            tracing::warn!(topic = %shared.topic, error = %e, "kafka: commit before handing partitions over failed; their last messages will be delivered again");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let shared = &self.shared;
        match rebalance {
            Rebalance::Assign(list) => {
                let mut state = lock(&shared.state);
                state.epoch += 1;
                let epoch = state.epoch;
                for e in list.elements() {
                    state
                        .parts
                        .entry(ours(e.partition()))
                        .or_insert_with(|| Part::new(epoch));
                }
                state.joined = true;
                drop(state);
                shared.wake.notify_one();
            }
            Rebalance::Error(e) => {
                tracing::warn!(topic = %shared.topic, error = %e, "kafka: rebalance failed")
            }
            Rebalance::Revoke(_) => {}
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        if let Err(e) = result {
            // Not lost: the next round commits the same offsets again.
            tracing::debug!(topic = %self.shared.topic, error = %e, "kafka: commit failed");
            return;
        }
        confirm(&self.shared, offsets);
    }
}

/// Records the commits the broker confirmed.
fn confirm(shared: &Shared, offsets: &TopicPartitionList) {
    let mut state = lock(&shared.state);
    for e in offsets.elements() {
        if let (Some(part), Offset::Offset(o)) =
            (state.parts.get_mut(&ours(e.partition())), e.offset())
            && let Ok(o) = u64::try_from(o)
        {
            part.extra.committed_to = Some(part.extra.committed_to.map_or(o, |c| c.max(o)));
        }
    }
}

/// The consumer's thread: fetch into the partitions' buffers, pause the full ones,
/// commit what was acked, until the subscription is dropped.
fn run_member(consumer: BaseConsumer<Callbacks>, shared: Arc<Shared>) {
    let mut last_commit = Instant::now();
    while !shared.closed.load(Ordering::Acquire) {
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                let message = fetched(&m);
                if let Some(part) = lock(&shared.state).parts.get_mut(&ours(m.partition())) {
                    part.push(message);
                }
                shared.wake.notify_one();
            }
            Some(Err(e)) => {
                tracing::debug!(topic = %shared.topic, error = %e, "kafka: fetch failed");
            }
            None => {}
        }
        flow_control(&consumer, &shared);
        if last_commit.elapsed() >= COMMIT_EVERY {
            commit(&consumer, &shared, CommitMode::Async);
            last_commit = Instant::now();
        }
    }
    commit(&consumer, &shared, CommitMode::Sync);
    // Dropping the consumer leaves the group; its revocation callback sees `closed`
    // and does not wait for deliveries nobody will settle.
    drop(consumer);
}

fn flow_control(consumer: &BaseConsumer<Callbacks>, shared: &Shared) {
    let (mut pause, mut resume) = (TopicPartitionList::new(), TopicPartitionList::new());
    {
        let mut state = lock(&shared.state);
        for (p, part) in state.parts.iter_mut() {
            if !part.extra.paused && part.queue.len() >= HIGH_WATER {
                part.extra.paused = true;
                pause.add_partition(&shared.kafka_topic, theirs(*p));
            } else if part.extra.paused && part.queue.len() <= LOW_WATER {
                part.extra.paused = false;
                resume.add_partition(&shared.kafka_topic, theirs(*p));
            }
        }
    }
    if pause.count() > 0 {
        let _ = consumer.pause(&pause);
    }
    if resume.count() > 0 {
        let _ = consumer.resume(&resume);
    }
}

fn commit(consumer: &BaseConsumer<Callbacks>, shared: &Shared, mode: CommitMode) {
    let mut list = TopicPartitionList::new();
    {
        let state = lock(&shared.state);
        for (p, part) in &state.parts {
            if let Some(to) = part
                .acked_to
                .filter(|to| Some(*to) != part.extra.committed_to)
            {
                let _ =
                    list.add_partition_offset(&shared.kafka_topic, theirs(*p), kafka_offset(to));
            }
        }
    }
    if list.count() == 0 {
        return;
    }
    match consumer.commit(&list, mode) {
        // An async commit is confirmed by the commit callback.
        Ok(()) if matches!(mode, CommitMode::Sync) => confirm(shared, &list),
        Ok(()) => {}
        Err(e) => tracing::debug!(topic = %shared.topic, error = %e, "kafka: commit failed"),
    }
}

struct KafkaSubscription {
    shared: Arc<Shared>,
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.settled.notify_all();
    }
}

impl Subscription for KafkaSubscription {
    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, BusError>> {
        Box::pin(handout::next(&self.shared))
    }
}

impl EventBus for KafkaBus {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        key: &'a str,
        event: &'a CloudEvent,
    ) -> BoxFuture<'a, Result<Option<u64>, BusError>> {
        Box::pin(async move {
            let (attributes, payload) = event.to_binary();
            let mut headers = OwnedHeaders::new_with_capacity(attributes.len());
            for (name, value) in &attributes {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value.as_bytes()),
                });
            }
            self.send(topic, key, headers, &payload).await
        })
    }

    fn publish_raw<'a>(
        &'a self,
        topic: &'a str,
        key: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Option<u64>, BusError>> {
        Box::pin(async move { self.send(topic, key, OwnedHeaders::new(), &payload).await })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, BusError>> {
        Box::pin(async move {
            check_name(group)?;
            let (name, partitions) = self.ensure_topic(topic).await?;
            let group_id = self.group_id(topic, group);
            // A new group starts where asked; an existing one where it left off.
            self.position_group(&name, partitions, &group_id, options.start.clone(), true)
                .await?;
            let shared = Arc::new(Shared {
                state: Mutex::new(State::default()),
                wake: tokio::sync::Notify::new(),
                settled: Condvar::new(),
                closed: AtomicBool::new(false),
                ack_wait: options.ack_wait,
                topic: topic.to_owned(),
                kafka_topic: name.clone(),
            });
            let session = self.inner.config.session_timeout.as_millis().max(1_000);
            let consumer: BaseConsumer<Callbacks> = base_config(&self.inner.config.brokers)
                .set("group.id", &group_id)
                .set("enable.auto.commit", "false")
                .set("auto.offset.reset", "earliest")
                .set("session.timeout.ms", session.to_string())
                // Frequent heartbeats: members learn of a joiner or a leaver fast.
                .set("heartbeat.interval.ms", (session / 20).max(100).to_string())
                .set(
                    "fetch.wait.max.ms",
                    self.inner.config.fetch_wait.as_millis().max(1).to_string(),
                )
                .create_with_context(Callbacks {
                    shared: shared.clone(),
                })
                .map_err(|e| BusError::Refused(format!("kafka consumer: {e}")))?;
            consumer.subscribe(&[&name]).map_err(unavailable)?;
            let thread_shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("kafka-{topic}"))
                .spawn(move || run_member(consumer, thread_shared))
                .map_err(|e| BusError::Unavailable(format!("cannot start consumer thread: {e}")))?;
            let subscription = KafkaSubscription { shared };
            // Returns once the group gave this member its share (possibly none).
            let joined = Instant::now() + Duration::from_secs(30);
            while !lock(&subscription.shared.state).joined {
                if Instant::now() >= joined {
                    return Err(BusError::Unavailable(format!(
                        "kafka: did not join group {group_id} within 30 s"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(Box::new(subscription) as Box<dyn Subscription>)
        })
    }

    fn topics(&self) -> BoxFuture<'_, Result<Vec<String>, BusError>> {
        Box::pin(async move {
            let inner = self.inner.clone();
            blocking(move || {
                let metadata = inner
                    .producer
                    .client()
                    .fetch_metadata(None, CALL_TIMEOUT)
                    .map_err(unavailable)?;
                let head = format!("{}.", inner.config.prefix);
                let mut names: Vec<String> = metadata
                    .topics()
                    .iter()
                    .filter_map(|t| t.name().strip_prefix(&head).map(str::to_owned))
                    .collect();
                names.sort();
                Ok(names)
            })
            .await
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
            let group_id = self.group_id(topic, group);
            let options = AdminOptions::new().operation_timeout(Some(CALL_TIMEOUT));
            let results = self
                .inner
                .admin
                .delete_groups(&[&group_id], &options)
                .await
                .map_err(unavailable)?;
            match results.into_iter().next() {
                Some(Ok(_)) | None => Ok(()),
                Some(Err((_, RDKafkaErrorCode::GroupIdNotFound))) => Ok(()),
                Some(Err((_, code))) => Err(BusError::Refused(format!("group {group_id}: {code}"))),
            }
        })
    }

    fn reset<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        start: StartFrom,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            check_name(group)?;
            let (name, partitions) = self.ensure_topic(topic).await?;
            let group_id = self.group_id(topic, group);
            self.position_group(&name, partitions, &group_id, start, false)
                .await
        })
    }
}
