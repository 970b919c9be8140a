//! RabbitMQ backend: streams for the log, quorum queues for the consumer groups.
//!
//! A topic is `partitions` streams, `<prefix>.<topic>.p<n>`; a key always lands on
//! the same one (the hash every backend uses). Events go through the default
//! exchange with publisher confirms (a publish returns once the broker has it), in
//! binary mode: the `ce-*` attributes as AMQP headers, plus `bazaar-key` and
//! `bazaar-ts` (publish time in ms, for replay from a time). A stream numbers a
//! message only as it is read (its `x-stream-offset` header), so a publish returns
//! no offset.
//!
//! A consumer group keeps, per partition, a quorum queue with a single active
//! consumer, `<prefix>.<topic>:<group>.p<n>.lease`, holding one small token: the
//! offset to go on from (or the time to start at). Every member consumes every lease
//! queue and the broker hands a queue's messages to one of them only, so whoever
//! holds a partition's token owns the partition: it reads the stream from the
//! token's position and hands out one message of the partition at a time. An ack
//! moves the partition's position, committed (at most every 50 ms and when the
//! member leaves) by publishing a new token, then acknowledging the old one; a nack
//! keeps the message and hands it out again after the delay (nothing behind it in
//! the partition overtakes it); a delivery neither acked nor nacked within the ack
//! wait is handed out again. A member that dies (its connection closes) gives its
//! unacknowledged tokens back, so each of its partitions moves to another member
//! with its committed position. A member that gets a second token for a partition
//! keeps the furthest position and acknowledges the other (a crash between publish
//! and ack, two members creating a group at once).
//!
//! The broker never takes a lease from a live member, so members count themselves on
//! `<prefix>.<topic>:<group>.members`, a queue every member consumes and nobody
//! publishes to: a member owning more than its share (partitions / members, rounded
//! up) lets the extra partitions go, once what it has in flight there is settled (or
//! the ack wait passed), to the members waiting on them. A new member waits in
//! `subscribe` (a few seconds at most) for what that leaves it. Shares are rounded
//! up, so some members may get nothing (4 partitions, 3 members: 2, 2, 0): a
//! partition count that the member count divides shares evenly.
//!
//! Offsets are the streams', per partition: [`StartFrom::Offset`] starts every
//! partition at its message with that offset, whenever it comes. Delivery counts do
//! not survive a change of owner (the stream keeps none); the owner counts its own
//! redeliveries. AMQP cannot list queues (the management plugin can, but is not
//! assumed), so topics are also recorded in the stream `<prefix>.__topics`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::{BoxStream, SelectAll};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::protocol::AMQPErrorKind;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ErrorKind};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::bus::{
    BoxFuture, BusError, Delivery, EventBus, StartFrom, SubscribeOptions, Subscription, check_name,
    partition,
};
use crate::envelope::CloudEvent;
use crate::handout::{self, Fetched, Part, State};

/// Settings of the RabbitMQ backend.
#[derive(Clone)]
pub struct RabbitConfig {
    /// `amqp://user:password@host:port/vhost` (`%2f` is the default vhost `/`).
    pub url: String,
    /// First part of every queue name.
    pub prefix: String,
    /// Streams per topic: the most members of one group that work at once. The
    /// broker does not record it, so every process of a shop must use the same.
    pub partitions: u32,
    /// Retention (`x-max-age`): older segments of a stream are removed; zero keeps
    /// them.
    pub max_age: Duration,
    /// Size of a stream's segment files, the unit retention removes (`None`: the
    /// broker's default).
    pub max_segment_bytes: Option<u64>,
    /// Retention by size, per stream (`None`: no limit).
    pub max_length_bytes: Option<u64>,
}

impl Default for RabbitConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            prefix: "bazaar".to_owned(),
            partitions: 8,
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_segment_bytes: None,
            max_length_bytes: None,
        }
    }
}

impl std::fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &redacted(&self.url))
            .field("prefix", &self.prefix)
            .field("partitions", &self.partitions)
            .field("max_age", &self.max_age)
            .field("max_segment_bytes", &self.max_segment_bytes)
            .field("max_length_bytes", &self.max_length_bytes)
            .finish()
    }
}

/// The URL without its password, for logs.
fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((user, host)) => {
            let user = user.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

/// How long a call to the broker may take before it counts as unavailable.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Acked positions are committed at most this often.
const COMMIT_EVERY: Duration = Duration::from_millis(50);
/// Members are counted every this many commit rounds (200 ms): a joiner gets its
/// share soon.
const CENSUS_ROUNDS: u32 = 4;
/// The longest `subscribe` waits for this member's share of the partitions.
const JOIN_WAIT: Duration = Duration::from_secs(3);
/// The longest `reset` waits for members that are leaving.
const RESET_WAIT: Duration = Duration::from_secs(5);
/// Unacknowledged stream messages per reader (a stream consumer needs a prefetch).
const STREAM_PREFETCH: u16 = 200;
/// Tokens per lease consumer: room for a duplicate next to the one held.
const LEASE_PREFETCH: u16 = 8;
/// Past this many buffered messages a partition's reader waits.
const HIGH_WATER: usize = 1_000;
/// A stream seeks by time at chunk and second granularity: start this much earlier
/// and skip by `bazaar-ts`.
const SEEK_MARGIN_SECS: i64 = 10;

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

/// A broker's answer to a bad request is a refusal; anything else (a dropped
/// connection, a closed channel) means it is unreachable.
fn bus_error(e: lapin::Error) -> BusError {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) if matches!(amqp.kind(), AMQPErrorKind::Soft(_)) => {
            BusError::Refused(e.to_string())
        }
        _ => BusError::Unavailable(e.to_string()),
    }
}

fn precondition_failed(e: &BusError) -> bool {
    matches!(e, BusError::Refused(m) if m.contains("PRECONDITION"))
}

/// One broker call, bounded by [`CALL_TIMEOUT`].
async fn call<T>(f: impl Future<Output = lapin::Result<T>>) -> Result<T, BusError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(result) => result.map_err(bus_error),
        Err(_) => Err(BusError::Unavailable("rabbitmq: call timed out".to_owned())),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind, still consistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_ms() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    }
}

fn quorum_args(single_active: bool) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    if single_active {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    args
}

/// Publishes to `queue` through the default exchange and waits for the broker's
/// confirm. `Ok(false)`: there is no such queue (the broker returned the message).
async fn publish_confirmed(
    channel: &Channel,
    queue: &str,
    payload: &[u8],
    properties: BasicProperties,
) -> Result<bool, BusError> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let confirm = call(async {
        channel
            .basic_publish("".into(), queue.into(), options, payload, properties)
            .await?
            .await
    })
    .await?;
    if confirm.is_nack() {
        return Err(BusError::Unavailable(format!(
            "rabbitmq did not take the message for {queue}"
        )));
    }
    Ok(confirm.take_message().is_none())
}

/// A partition's position, the payload of its lease token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Token {
    /// The next offset to process.
    Offset(u64),
    /// The first message published at or after this time (ms since the epoch).
    TimeMs(i64),
}

impl Token {
    fn start(start: &StartFrom) -> Self {
        match start {
            StartFrom::Earliest => Token::Offset(0),
            StartFrom::Latest => Token::TimeMs(now_ms()),
            StartFrom::Offset(n) => Token::Offset(*n),
            StartFrom::Time(t) => {
                Token::TimeMs(i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0))
            }
        }
    }

    fn parse(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }

    fn to_bytes(self) -> Vec<u8> {
        serde_json::to_vec(&self).unwrap_or_default()
    }

    /// Whether this position is further than `other`: of two tokens for one
    /// partition the owner keeps the further. An offset was committed after
    /// processing, so it beats a start time; of two start times the earlier loses
    /// nothing.
    fn beats(&self, other: &Token) -> bool {
        match (self, other) {
            (Token::Offset(a), Token::Offset(b)) => a > b,
            (Token::Offset(_), Token::TimeMs(_)) => true,
            (Token::TimeMs(_), Token::Offset(_)) => false,
            (Token::TimeMs(a), Token::TimeMs(b)) => a < b,
        }
    }
}

async fn publish_token(channel: &Channel, queue: &str, token: Token) -> Result<(), BusError> {
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    if publish_confirmed(channel, queue, &token.to_bytes(), properties).await? {
        Ok(())
    } else {
        Err(BusError::Refused(format!(
            "lease queue {queue} is gone (group deleted?)"
        )))
    }
}

/// A RabbitMQ-backed [`EventBus`]. Cheap to clone.
#[derive(Clone)]
pub struct RabbitBus {
    inner: Arc<Inner>,
}

struct Inner {
    config: RabbitConfig,
    /// The connection for publishing and administration, opened again on the next
    /// call after it dropped.
    link: tokio::sync::Mutex<Option<Link>>,
    /// Topics whose streams this process declared (and registered).
    topics: Mutex<HashSet<String>>,
    /// Held while declaring a topic.
    declaring: tokio::sync::Mutex<()>,
    /// Every queue this bus declared, for [`RabbitBus::delete_namespace`].
    declared: Mutex<BTreeSet<String>>,
}

#[derive(Clone)]
struct Link {
    connection: Arc<Connection>,
    /// In confirm mode.
    publish: Channel,
}

impl RabbitBus {
    /// Checks the URL and connects; a broker that is down now is not an error (calls
    /// fail with [`BusError::Unavailable`] until it is back).
    pub async fn connect(config: RabbitConfig) -> Result<Self, BusError> {
        config
            .url
            .parse::<lapin::uri::AMQPUri>()
            .map_err(|e| BusError::Refused(format!("rabbitmq url: {e}")))?;
        let bus = Self {
            inner: Arc::new(Inner {
                config,
                link: tokio::sync::Mutex::new(None),
                topics: Mutex::new(HashSet::new()),
                declaring: tokio::sync::Mutex::new(()),
                declared: Mutex::new(BTreeSet::new()),
            }),
        };
        if let Err(e) = bus.link().await {
            tracing::warn!(url = %redacted(&bus.inner.config.url), error = %e, "rabbitmq unreachable for now");
        }
        Ok(bus)
    }

    /// Deletes every queue and stream this bus declared (a test's namespace when it
    /// ends, or an environment being torn down); how many.
    pub async fn delete_namespace(&self) -> Result<usize, BusError> {
        let names: Vec<String> = lock(&self.inner.declared).iter().cloned().collect();
        let channel = self.admin().await?;
        for name in &names {
            call(channel.queue_delete(name.as_str().into(), QueueDeleteOptions::default())).await?;
        }
        lock(&self.inner.declared).clear();
        lock(&self.inner.topics).clear();
        Ok(names.len())
    }

    /// Deletes `topic`'s streams (its messages) and the queues of `groups` on it,
    /// whoever declared them: a shop's topics when its environment is torn down.
    pub async fn delete_topic(&self, topic: &str, groups: &[&str]) -> Result<(), BusError> {
        check_name(topic)?;
        for group in groups {
            self.delete_group(topic, group).await?;
        }
        let channel = self.admin().await?;
        for p in 0..self.partitions() {
            let name = self.stream_name(topic, p);
            call(channel.queue_delete(name.as_str().into(), QueueDeleteOptions::default())).await?;
            lock(&self.inner.declared).remove(&name);
        }
        lock(&self.inner.topics).remove(topic);
        Ok(())
    }

    fn partitions(&self) -> u32 {
        self.inner.config.partitions.max(1)
    }

    fn stream_name(&self, topic: &str, partition: u32) -> String {
        format!("{}.{topic}.p{partition}", self.inner.config.prefix)
    }

    fn lease_name(&self, topic: &str, group: &str, partition: u32) -> String {
        format!(
            "{}.{topic}:{group}.p{partition}.lease",
            self.inner.config.prefix
        )
    }

    fn members_name(&self, topic: &str, group: &str) -> String {
        format!("{}.{topic}:{group}.members", self.inner.config.prefix)
    }

    fn registry_name(&self) -> String {
        format!("{}.__topics", self.inner.config.prefix)
    }

    fn track(&self, queue: &str) {
        lock(&self.inner.declared).insert(queue.to_owned());
    }

    async fn open(&self) -> Result<Connection, BusError> {
        call(Connection::connect(
            &self.inner.config.url,
            ConnectionProperties::default(),
        ))
        .await
        .map_err(|e| BusError::Unavailable(format!("rabbitmq: {e}")))
    }

    /// The shared connection, opened again if it dropped.
    async fn link(&self) -> Result<Link, BusError> {
        let mut link = self.inner.link.lock().await;
        if let Some(l) = link.as_ref()
            && l.connection.status().connected()
            && l.publish.status().connected()
        {
            return Ok(l.clone());
        }
        *link = None;
        let connection = self.open().await?;
        let publish = call(connection.create_channel()).await?;
        call(publish.confirm_select(ConfirmSelectOptions::default())).await?;
        let fresh = Link {
            connection: Arc::new(connection),
            publish,
        };
        *link = Some(fresh.clone());
        Ok(fresh)
    }

    /// A channel of its own for declarations (a refused one closes its channel).
    async fn admin(&self) -> Result<Channel, BusError> {
        let link = self.link().await?;
        call(link.connection.create_channel()).await
    }

    fn stream_args(&self, retained: bool) -> FieldTable {
        let config = &self.inner.config;
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text("stream"));
        if retained && !config.max_age.is_zero() {
            let age = format!("{}s", config.max_age.as_secs().max(1));
            args.insert("x-max-age".into(), text(&age));
        }
        if let Some(bytes) = config.max_segment_bytes {
            let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
            args.insert(
                "x-stream-max-segment-size-bytes".into(),
                AMQPValue::LongLongInt(bytes),
            );
        }
        if let Some(bytes) = config.max_length_bytes.filter(|_| retained) {
            let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
            args.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(bytes));
        }
        args
    }

    /// Declares a stream; one that exists with other settings (retention changed
    /// since) is used as it is.
    async fn declare_stream(&self, name: &str, retained: bool) -> Result<(), BusError> {
        let channel = self.admin().await?;
        let declared =
            call(channel.queue_declare(name.into(), durable(), self.stream_args(retained))).await;
        match declared {
            Ok(_) => {}
            Err(e) if precondition_failed(&e) => {
                tracing::warn!(stream = name, error = %e, "rabbitmq: stream exists with other settings; using it as it is");
                let channel = self.admin().await?;
                call(channel.queue_declare(name.into(), passive(), FieldTable::default())).await?;
            }
            Err(e) => return Err(e),
        }
        self.track(name);
        Ok(())
    }

    /// Declares `topic`'s streams and records the topic, once per process.
    async fn ensure_topic(&self, topic: &str) -> Result<(), BusError> {
        check_name(topic)?;
        if lock(&self.inner.topics).contains(topic) {
            return Ok(());
        }
        // One declaration at a time: RabbitMQ (3.10) answers a declaration of a
        // stream still being created by another as done, and a publish to it then
        // crashes the connection.
        let _one = self.inner.declaring.lock().await;
        if lock(&self.inner.topics).contains(topic) {
            return Ok(());
        }
        for p in 0..self.partitions() {
            self.declare_stream(&self.stream_name(topic, p), true)
                .await?;
        }
        let registry = self.registry_name();
        self.declare_stream(&registry, false).await?;
        let properties = BasicProperties::default().with_delivery_mode(2);
        self.publish(&registry, topic.as_bytes(), properties)
            .await?;
        lock(&self.inner.topics).insert(topic.to_owned());
        Ok(())
    }

    /// Publishes to a stream on the shared connection (see [`publish_confirmed`]),
    /// again on a fresh connection if that one broke: it may have dropped since the
    /// last call, or the broker closed it (a stream another process is still
    /// creating).
    async fn publish(
        &self,
        stream: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<bool, BusError> {
        let mut retries = 2u64;
        loop {
            let link = self.link().await?;
            match publish_confirmed(&link.publish, stream, payload, properties.clone()).await {
                Err(BusError::Unavailable(e)) if retries > 0 => {
                    tracing::debug!(stream, error = %e, "rabbitmq: publish failed; again");
                    tokio::time::sleep(Duration::from_millis(100 * (3 - retries))).await;
                    retries -= 1;
                }
                result => return result,
            }
        }
    }

    async fn send(
        &self,
        topic: &str,
        key: &str,
        mut headers: FieldTable,
        payload: &[u8],
    ) -> Result<Option<u64>, BusError> {
        self.ensure_topic(topic).await?;
        headers.insert("bazaar-key".into(), text(key));
        headers.insert("bazaar-ts".into(), AMQPValue::LongLongInt(now_ms()));
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers);
        let stream = self.stream_name(topic, partition(key, self.partitions()));
        for _ in 0..2 {
            if self.publish(&stream, payload, properties.clone()).await? {
                return Ok(None);
            }
            // The stream was deleted since this process declared it: again.
            lock(&self.inner.topics).remove(topic);
            self.ensure_topic(topic).await?;
        }
        Err(BusError::Refused(format!("rabbitmq: no stream {stream}")))
    }

    /// Declares `group`'s lease queues and members queue on `channel`.
    async fn declare_group(
        &self,
        channel: &Channel,
        topic: &str,
        group: &str,
    ) -> Result<Vec<lapin::Queue>, BusError> {
        let members = self.members_name(topic, group);
        call(channel.queue_declare(members.as_str().into(), durable(), quorum_args(false))).await?;
        self.track(&members);
        let mut leases = Vec::new();
        for p in 0..self.partitions() {
            let name = self.lease_name(topic, group, p);
            leases.push(
                call(channel.queue_declare(name.as_str().into(), durable(), quorum_args(true)))
                    .await?,
            );
            self.track(&name);
        }
        Ok(leases)
    }

    async fn join(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<RabbitSubscription, BusError> {
        check_name(group)?;
        self.ensure_topic(topic).await?;
        let partitions = self.partitions();
        // A connection per member: when it closes (the member left or died) the
        // broker gives every token it held to the next member at once.
        let connection = Arc::new(self.open().await?);
        let control = call(connection.create_channel()).await?;
        call(control.confirm_select(ConfirmSelectOptions::default())).await?;
        let leases = call(connection.create_channel()).await?;
        call(leases.basic_qos(LEASE_PREFETCH, BasicQosOptions::default())).await?;
        for (p, queue) in (0..partitions).zip(self.declare_group(&control, topic, group).await?) {
            // A new group: nobody holds a token nor waits for one.
            if queue.message_count() == 0 && queue.consumer_count() == 0 {
                let token = Token::start(&options.start);
                publish_token(&control, &self.lease_name(topic, group, p), token).await?;
            }
        }
        let members = self.members_name(topic, group);
        let census = call(leases.basic_consume(
            members.as_str().into(),
            "census".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ))
        .await?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: tokio::sync::Notify::new(),
            closed: CancellationToken::new(),
            ack_wait: options.ack_wait,
            topic: topic.to_owned(),
        });
        let mut member = Member {
            shared: shared.clone(),
            connection,
            control,
            leases,
            _census: census,
            events: SelectAll::new(),
            generation: vec![None; usize::try_from(partitions).unwrap_or(0)],
            next_generation: 0,
            owned: BTreeMap::new(),
            lease_names: (0..partitions)
                .map(|p| self.lease_name(topic, group, p))
                .collect(),
            stream_names: (0..partitions)
                .map(|p| self.stream_name(topic, p))
                .collect(),
            members,
        };
        for p in 0..partitions {
            member.consume_lease(p).await?;
        }
        // The others keep up to partitions / members (rounded up) each: what is left
        // is this member's at least.
        let others = member.count_members().await?.saturating_sub(1);
        let share =
            partitions.saturating_sub(others.saturating_mul(partitions.div_ceil(others + 1)));
        tokio::spawn(member.run());
        let subscription = RabbitSubscription { shared };
        wait_for_share(&subscription.shared, share).await?;
        Ok(subscription)
    }
}

// ---------------------------------------------------------------------------
// Consuming

/// Waits (at most [`JOIN_WAIT`]) until this member owns `share` partitions: members
/// owning more than their share let it go within a census round, plus what they
/// have in flight.
async fn wait_for_share(shared: &Shared, share: u32) -> Result<(), BusError> {
    let share = usize::try_from(share).unwrap_or(usize::MAX);
    let until = Instant::now() + JOIN_WAIT;
    while Instant::now() < until {
        {
            let state = lock(&shared.state);
            if let Some(e) = &state.failed {
                return Err(BusError::Unavailable(e.clone()));
            }
            if state.parts.len() >= share {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn header_int(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        _ => None,
    }
}

fn header_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The message and its publish time (ms), if it has one.
fn fetched(d: &lapin::message::Delivery) -> Result<(Fetched, Option<i64>), BusError> {
    let table = d.properties.headers().as_ref();
    let get = |name: &str| table.and_then(|t| t.inner().get(name));
    let offset = get("x-stream-offset")
        .and_then(header_int)
        .and_then(|o| u64::try_from(o).ok())
        .ok_or_else(|| {
            BusError::Refused("rabbitmq: stream message without x-stream-offset".to_owned())
        })?;
    let headers = table
        .map(|t| {
            t.inner()
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_owned(), header_text(v)?)))
                .collect()
        })
        .unwrap_or_default();
    let fetched = Fetched {
        offset,
        key: get("bazaar-key").and_then(header_text).unwrap_or_default(),
        payload: Bytes::copy_from_slice(&d.data),
        headers,
    };
    Ok((fetched, get("bazaar-ts").and_then(header_int)))
}

struct Shared {
    state: Mutex<State<()>>,
    /// A message may be ready to hand out.
    wake: tokio::sync::Notify,
    /// The subscription was dropped, or the member failed.
    closed: CancellationToken,
    ack_wait: Duration,
    topic: String,
}

impl handout::Member for Shared {
    type Extra = ();

    fn with_state<R>(&self, f: impl FnOnce(&mut State<()>) -> R) -> R {
        f(&mut lock(&self.state))
    }

    fn wake(&self) -> &tokio::sync::Notify {
        &self.wake
    }

    fn ack_wait(&self) -> Duration {
        self.ack_wait
    }

    fn topic(&self) -> &str {
        &self.topic
    }
}

impl Shared {
    /// Stops the member: `next` returns the error from now on (the consumer
    /// subscribes again), and the member commits what was acked and leaves.
    fn fail(&self, why: String) {
        lock(&self.state).failed.get_or_insert(why);
        self.closed.cancel();
        self.wake.notify_one();
    }
}

/// Reads partition `p`'s stream from `start` into its buffer, while `epoch` owns it.
async fn read_partition(
    connection: Arc<Connection>,
    stream: String,
    start: Token,
    shared: Arc<Shared>,
    p: u32,
    epoch: u64,
) -> Result<(), BusError> {
    let channel = call(connection.create_channel()).await?;
    call(channel.basic_qos(STREAM_PREFETCH, BasicQosOptions::default())).await?;
    let mut args = FieldTable::default();
    let mut not_before = None;
    match start {
        Token::Offset(o) => {
            let o = i64::try_from(o).unwrap_or(i64::MAX);
            args.insert("x-stream-offset".into(), AMQPValue::LongLongInt(o));
        }
        Token::TimeMs(t) => {
            let seconds = (t / 1000 - SEEK_MARGIN_SECS).max(0);
            let seconds = u64::try_from(seconds).unwrap_or(0);
            args.insert("x-stream-offset".into(), AMQPValue::Timestamp(seconds));
            not_before = Some(t);
        }
    }
    let mut consumer = call(channel.basic_consume(
        stream.as_str().into(),
        "".into(),
        BasicConsumeOptions::default(),
        args,
    ))
    .await?;
    while let Some(d) = consumer.next().await {
        let d = d.map_err(bus_error)?;
        let (fetched, published) = fetched(&d)?;
        // From a time: skip what came before it (a message without a time counts
        // as after: better twice than never).
        let skip = not_before.is_some_and(|t| published.is_some_and(|ms| ms < t));
        if !skip {
            not_before = None;
            loop {
                let room = match lock(&shared.state).parts.get(&p) {
                    Some(part) if part.epoch == epoch => part.queue.len() < HIGH_WATER,
                    // Handed over or restarted elsewhere: this reader is done.
                    _ => return Ok(()),
                };
                if room {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let mut state = lock(&shared.state);
            if let Some(part) = state.parts.get_mut(&p).filter(|part| part.epoch == epoch) {
                part.push(fetched);
            }
            drop(state);
            shared.wake.notify_one();
        }
        // On a stream, an ack only gives the consumer credit for more.
        call(d.acker.ack(BasicAckOptions::default())).await?;
    }
    Err(BusError::Unavailable(format!(
        "rabbitmq: the broker ended the consumer of {stream}"
    )))
}

/// What the lease consumers tell the member.
enum LeaseEvent {
    Token(u32, u64, Box<lapin::Result<lapin::message::Delivery>>),
    /// That consumer (partition, generation) ended.
    Ended(u32, u64),
}

/// A partition this member owns.
struct Lease {
    /// The position last published for it.
    committed: Token,
    /// Token deliveries held unacknowledged: the broker gives them back if this
    /// member dies.
    tokens: Vec<lapin::Acker>,
    reader: CancellationToken,
    /// Being let go since then (another member should have it).
    releasing: Option<Instant>,
}

/// A group member's task: takes and gives up leases, starts the partitions'
/// readers, commits.
struct Member {
    shared: Arc<Shared>,
    connection: Arc<Connection>,
    /// Confirm mode: tokens, and the member count.
    control: Channel,
    /// The lease consumers (and the census consumer).
    leases: Channel,
    _census: lapin::Consumer,
    events: SelectAll<BoxStream<'static, LeaseEvent>>,
    /// The current lease consumer of each partition; `None` while letting it go.
    generation: Vec<Option<u64>>,
    next_generation: u64,
    owned: BTreeMap<u32, Lease>,
    lease_names: Vec<String>,
    stream_names: Vec<String>,
    members: String,
}

enum Step {
    Closed,
    Lease(Option<LeaseEvent>),
    Tick,
}

fn index(p: u32) -> usize {
    usize::try_from(p).unwrap_or(usize::MAX)
}

async fn ack_token(acker: &lapin::Acker) -> Result<(), BusError> {
    call(acker.ack(BasicAckOptions::default()))
        .await
        .map(|_| ())
}

impl Member {
    fn lease_name(&self, p: u32) -> &str {
        self.lease_names.get(index(p)).map_or("", String::as_str)
    }

    fn consumer_tag(p: u32, generation: u64) -> String {
        format!("lease-p{p}-{generation}")
    }

    /// Joins the line for partition `p`'s token.
    async fn consume_lease(&mut self, p: u32) -> Result<(), BusError> {
        let generation = self.next_generation;
        self.next_generation += 1;
        let consumer = call(self.leases.basic_consume(
            self.lease_name(p).into(),
            Self::consumer_tag(p, generation).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ))
        .await?;
        let events = consumer
            .map(move |d| LeaseEvent::Token(p, generation, Box::new(d)))
            .chain(futures::stream::once(async move {
                LeaseEvent::Ended(p, generation)
            }))
            .boxed();
        self.events.push(events);
        if let Some(slot) = self.generation.get_mut(index(p)) {
            *slot = Some(generation);
        }
        Ok(())
    }

    async fn count_members(&mut self) -> Result<u32, BusError> {
        let queue = call(self.control.queue_declare(
            self.members.as_str().into(),
            passive(),
            FieldTable::default(),
        ))
        .await?;
        Ok(queue.consumer_count().max(1))
    }

    async fn run(mut self) {
        let result = self.serve().await;
        if let Err(e) = &result {
            tracing::warn!(topic = %self.shared.topic, error = %e, "rabbitmq: group member stopped");
            self.shared.fail(e.to_string());
        } else if let Err(e) = self.commit().await {
            tracing::warn!(topic = %self.shared.topic, error = %e, "rabbitmq: last commit failed; its messages will be delivered again");
        }
        for lease in self.owned.values() {
            lease.reader.cancel();
        }
        // Closing gives the tokens back (the last commit is in the lease queues).
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.connection.close(200, "bye".into()),
        )
        .await;
    }

    async fn serve(&mut self) -> Result<(), BusError> {
        let mut tick = tokio::time::interval(COMMIT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let closed = self.shared.closed.clone();
        let mut rounds = 0u32;
        loop {
            let step = tokio::select! {
                () = closed.cancelled() => Step::Closed,
                event = self.events.next(), if !self.events.is_empty() => Step::Lease(event),
                _ = tick.tick() => Step::Tick,
            };
            match step {
                Step::Closed => return Ok(()),
                Step::Lease(Some(LeaseEvent::Token(p, generation, d))) => {
                    self.on_token(p, generation, (*d).map_err(bus_error)?)
                        .await?;
                }
                Step::Lease(Some(LeaseEvent::Ended(p, generation))) => {
                    if self.generation.get(index(p)).copied().flatten() == Some(generation) {
                        return Err(BusError::Unavailable(format!(
                            "rabbitmq: the broker ended the consumer of {} (group deleted?)",
                            self.lease_name(p)
                        )));
                    }
                }
                Step::Lease(None) => {}
                Step::Tick => {
                    self.commit().await?;
                    rounds = rounds.wrapping_add(1);
                    if rounds.is_multiple_of(CENSUS_ROUNDS) {
                        self.census().await?;
                    }
                    self.release_due().await?;
                }
            }
        }
    }

    async fn on_token(
        &mut self,
        p: u32,
        generation: u64,
        d: lapin::message::Delivery,
    ) -> Result<(), BusError> {
        if self.generation.get(index(p)).copied().flatten() != Some(generation) {
            // Prefetched by a consumer this member gave up since: back to the queue
            // for the member that owns the partition now.
            let requeue = BasicNackOptions {
                requeue: true,
                multiple: false,
            };
            call(d.acker.nack(requeue)).await?;
            return Ok(());
        }
        let Some(token) = Token::parse(&d.data) else {
            tracing::warn!(
                queue = self.lease_name(p),
                "rabbitmq: dropping a lease token that is not one"
            );
            return ack_token(&d.acker).await;
        };
        let Some(lease) = self.owned.get_mut(&p) else {
            let reader = self.start_partition(p, token, false);
            self.owned.insert(
                p,
                Lease {
                    committed: token,
                    tokens: vec![d.acker],
                    reader,
                    releasing: None,
                },
            );
            return Ok(());
        };
        if token.beats(&lease.committed) {
            // Someone got further (a member that died between publishing a token and
            // acknowledging the one before): go on from there.
            let stale = std::mem::replace(&mut lease.tokens, vec![d.acker]);
            lease.committed = token;
            lease.reader.cancel();
            let releasing = lease.releasing.is_some();
            let reader = self.start_partition(p, token, releasing);
            if let Some(lease) = self.owned.get_mut(&p) {
                lease.reader = reader;
            }
            for acker in &stale {
                ack_token(acker).await?;
            }
        } else if token == lease.committed && lease.tokens.is_empty() {
            // This member's own last commit, coming back to it.
            lease.tokens.push(d.acker);
        } else {
            ack_token(&d.acker).await?;
        }
        Ok(())
    }

    /// Starts (or restarts) handing out partition `p` from `start`.
    fn start_partition(&self, p: u32, start: Token, releasing: bool) -> CancellationToken {
        let epoch = {
            let mut state = lock(&self.shared.state);
            state.epoch += 1;
            let epoch = state.epoch;
            let mut part = Part::new(epoch);
            part.releasing = releasing;
            state.parts.insert(p, part);
            epoch
        };
        let stop = CancellationToken::new();
        let (connection, shared) = (self.connection.clone(), self.shared.clone());
        let stream = self.stream_names.get(index(p)).cloned().unwrap_or_default();
        let cancelled = stop.clone();
        tokio::spawn(async move {
            let read = read_partition(connection, stream, start, shared.clone(), p, epoch);
            tokio::select! {
                () = cancelled.cancelled() => {}
                result = read => if let Err(e) = result {
                    shared.fail(e.to_string());
                },
            }
        });
        self.shared.wake.notify_one();
        stop
    }

    /// Publishes the positions acked since the last commit.
    async fn commit(&mut self) -> Result<(), BusError> {
        let due: Vec<(u32, u64)> = {
            let state = lock(&self.shared.state);
            self.owned
                .iter()
                .filter_map(|(p, lease)| {
                    let to = state.parts.get(p)?.acked_to?;
                    (Token::Offset(to) != lease.committed).then_some((*p, to))
                })
                .collect()
        };
        for (p, to) in due {
            publish_token(&self.control, self.lease_name(p), Token::Offset(to)).await?;
            if let Some(lease) = self.owned.get_mut(&p) {
                lease.committed = Token::Offset(to);
                // The new token is in the queue: the old ones may go.
                for acker in std::mem::take(&mut lease.tokens) {
                    ack_token(&acker).await?;
                }
            }
        }
        Ok(())
    }

    /// Lets go of the partitions beyond this member's share.
    async fn census(&mut self) -> Result<(), BusError> {
        let members = self.count_members().await?;
        let partitions = u32::try_from(self.lease_names.len()).unwrap_or(u32::MAX);
        let share = usize::try_from(partitions.div_ceil(members)).unwrap_or(usize::MAX);
        let kept: Vec<u32> = self
            .owned
            .iter()
            .filter(|(_, lease)| lease.releasing.is_none())
            .map(|(p, _)| *p)
            .collect();
        let extra = kept.len().saturating_sub(share);
        if extra == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut state = lock(&self.shared.state);
        for p in kept.iter().rev().take(extra) {
            if let Some(lease) = self.owned.get_mut(p) {
                lease.releasing = Some(now);
            }
            if let Some(part) = state.parts.get_mut(p) {
                part.releasing = true;
            }
        }
        Ok(())
    }

    /// Hands over the partitions being let go whose handler is done (or that waited
    /// the ack wait).
    async fn release_due(&mut self) -> Result<(), BusError> {
        let now = Instant::now();
        let due: Vec<u32> = {
            let state = lock(&self.shared.state);
            self.owned
                .iter()
                .filter(|(p, lease)| {
                    lease.releasing.is_some_and(|since| {
                        !state.busy(**p) || now >= since + self.shared.ack_wait
                    })
                })
                .map(|(p, _)| *p)
                .collect()
        };
        for p in due {
            self.release(p).await?;
        }
        Ok(())
    }

    async fn release(&mut self, p: u32) -> Result<(), BusError> {
        let Some(lease) = self.owned.remove(&p) else {
            return Ok(());
        };
        lease.reader.cancel();
        let acked_to = lock(&self.shared.state)
            .parts
            .remove(&p)
            .and_then(|part| part.acked_to);
        let position = acked_to.map_or(lease.committed, Token::Offset);
        // Out of the line first, so the token published next goes to the member
        // waiting behind.
        if let Some(generation) = self.generation.get_mut(index(p)).and_then(Option::take) {
            call(self.leases.basic_cancel(
                Self::consumer_tag(p, generation).into(),
                BasicCancelOptions::default(),
            ))
            .await?;
        }
        publish_token(&self.control, self.lease_name(p), position).await?;
        for acker in &lease.tokens {
            ack_token(acker).await?;
        }
        self.consume_lease(p).await?;
        self.shared.wake.notify_one();
        tracing::debug!(topic = %self.shared.topic, partition = p, "rabbitmq: partition handed over");
        Ok(())
    }
}

struct RabbitSubscription {
    shared: Arc<Shared>,
}

impl Drop for RabbitSubscription {
    fn drop(&mut self) {
        self.shared.closed.cancel();
    }
}

impl Subscription for RabbitSubscription {
    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, BusError>> {
        Box::pin(handout::next(&self.shared))
    }
}

impl EventBus for RabbitBus {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        key: &'a str,
        event: &'a CloudEvent,
    ) -> BoxFuture<'a, Result<Option<u64>, BusError>> {
        Box::pin(async move {
            let (attributes, payload) = event.to_binary();
            let mut headers = FieldTable::default();
            for (name, value) in &attributes {
                headers.insert(name.as_str().into(), text(value));
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
        Box::pin(async move { self.send(topic, key, FieldTable::default(), &payload).await })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, BusError>> {
        Box::pin(async move {
            let subscription = self.join(topic, group, options).await?;
            Ok(Box::new(subscription) as Box<dyn Subscription>)
        })
    }

    fn topics(&self) -> BoxFuture<'_, Result<Vec<String>, BusError>> {
        Box::pin(async move {
            let registry = self.registry_name();
            self.declare_stream(&registry, false).await?;
            // Read the registry up to a marker published now: then it is all read.
            let marker = uuid::Uuid::new_v4().to_string();
            let mut headers = FieldTable::default();
            headers.insert("bazaar-marker".into(), text(&marker));
            let properties = BasicProperties::default().with_headers(headers);
            self.publish(&registry, b"", properties).await?;
            let link = self.link().await?;
            let channel = call(link.connection.create_channel()).await?;
            call(channel.basic_qos(STREAM_PREFETCH, BasicQosOptions::default())).await?;
            let mut args = FieldTable::default();
            args.insert("x-stream-offset".into(), text("first"));
            let mut consumer = call(channel.basic_consume(
                registry.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                args,
            ))
            .await?;
            let until = tokio::time::Instant::now() + CALL_TIMEOUT;
            let mut names = BTreeSet::new();
            loop {
                let d = match tokio::time::timeout_at(until, consumer.next()).await {
                    Ok(Some(d)) => d.map_err(bus_error)?,
                    Ok(None) => return Err(unavailable("rabbitmq: topic registry read ended")),
                    Err(_) => return Err(unavailable("rabbitmq: topic registry read timed out")),
                };
                let seen = d
                    .properties
                    .headers()
                    .as_ref()
                    .and_then(|h| h.inner().get("bazaar-marker"))
                    .and_then(header_text);
                match seen {
                    Some(m) if m == marker => break,
                    Some(_) => {}
                    None => {
                        if let Ok(name) = std::str::from_utf8(&d.data) {
                            names.insert(name.to_owned());
                        }
                    }
                }
                call(d.acker.ack(BasicAckOptions::default())).await?;
            }
            let _ = channel.close(200, "done".into()).await;
            Ok(names.into_iter().collect())
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
            let channel = self.admin().await?;
            let mut names: Vec<String> = (0..self.partitions())
                .map(|p| self.lease_name(topic, group, p))
                .collect();
            names.push(self.members_name(topic, group));
            for name in &names {
                call(channel.queue_delete(name.as_str().into(), QueueDeleteOptions::default()))
                    .await?;
                lock(&self.inner.declared).remove(name);
            }
            Ok(())
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
            self.ensure_topic(topic).await?;
            let channel = self.admin().await?;
            // Members that are leaving commit, then close: wait for them a little.
            // Their lease consumers count until the broker has their tokens back.
            let until = Instant::now() + RESET_WAIT;
            loop {
                let queues = self.declare_group(&channel, topic, group).await?;
                let members = call(channel.queue_declare(
                    self.members_name(topic, group).as_str().into(),
                    passive(),
                    FieldTable::default(),
                ))
                .await?;
                let busy =
                    members.consumer_count() > 0 || queues.iter().any(|q| q.consumer_count() > 0);
                if !busy {
                    break;
                }
                if Instant::now() >= until {
                    return Err(BusError::Refused(format!(
                        "group {group} has members; stop them before moving its position"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let link = self.link().await?;
            let token = Token::start(&start);
            for p in 0..self.partitions() {
                let name = self.lease_name(topic, group, p);
                call(channel.queue_purge(name.as_str().into(), QueuePurgeOptions::default()))
                    .await?;
                publish_token(&link.publish, &name, token).await?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_read_back_and_the_furthest_position_wins() {
        for token in [Token::Offset(42), Token::TimeMs(1_700_000_000_000)] {
            assert_eq!(Token::parse(&token.to_bytes()), Some(token));
        }
        assert_eq!(Token::Offset(7).to_bytes(), br#"{"offset":7}"#);
        assert_eq!(Token::parse(br#"{"time_ms":5}"#), Some(Token::TimeMs(5)));
        assert_eq!(Token::parse(b"garbage"), None);
        assert!(Token::Offset(5).beats(&Token::Offset(4)));
        assert!(!Token::Offset(4).beats(&Token::Offset(4)));
        assert!(Token::Offset(0).beats(&Token::TimeMs(10)));
        assert!(!Token::TimeMs(10).beats(&Token::Offset(0)));
        assert!(Token::TimeMs(9).beats(&Token::TimeMs(10)));
        assert_eq!(Token::start(&StartFrom::Earliest), Token::Offset(0));
        assert_eq!(Token::start(&StartFrom::Offset(3)), Token::Offset(3));
        let at = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap_or_else(|_| panic!());
        assert_eq!(
            Token::start(&StartFrom::Time(at)),
            Token::TimeMs(1_700_000_000_000)
        );
    }

    #[test]
    fn urls_print_without_their_password() {
        assert_eq!(
            redacted("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redacted("amqp://host"), "amqp://host");
    }
}
