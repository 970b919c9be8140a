//! The seam every broker backend implements: publish with a partition key, subscribe
//! as a consumer group, acknowledge or ask for redelivery.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use time::OffsetDateTime;

use crate::envelope::{CloudEvent, EnvelopeError};

/// A boxed future, so backends stay usable as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    #[error("broker unreachable: {0}")]
    Unavailable(String),
    #[error("broker refused: {0}")]
    Refused(String),
    #[error("invalid name `{name}`: {problem}")]
    InvalidName { name: String, problem: String },
    #[error("subscription closed")]
    Closed,
}

/// Where a consumer group starts when it does not exist yet (an existing group
/// resumes from its committed position).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartFrom {
    Earliest,
    Latest,
    /// The first message at or after this offset.
    Offset(u64),
    /// The first message published at or after this time.
    Time(OffsetDateTime),
}

#[derive(Clone, Debug)]
pub struct SubscribeOptions {
    pub start: StartFrom,
    /// A message neither acknowledged nor nacked this long (its consumer died) is
    /// delivered again, to any member of the group.
    pub ack_wait: Duration,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        Self {
            start: StartFrom::Earliest,
            ack_wait: Duration::from_secs(30),
        }
    }
}

/// Settles one delivery with the broker.
pub trait Acker: Send {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BusError>>;
    /// Asks for redelivery after `delay`; later messages of the same key wait.
    fn nack(self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<(), BusError>>;
}

/// Where a delivery comes from.
#[derive(Clone, Debug)]
pub struct Position {
    pub topic: String,
    pub key: String,
    /// The partition of `key`: deliveries of one partition must be handled in order,
    /// those of different partitions may run concurrently.
    pub partition: u32,
    pub offset: u64,
    pub attempt: u32,
}

/// One message handed to a consumer.
pub struct Delivery {
    pub topic: String,
    pub key: String,
    pub partition: u32,
    /// Position in the topic, as the broker numbers it.
    pub offset: u64,
    /// 1 on the first delivery, then one more each time it comes back.
    pub attempt: u32,
    /// The event, or why the bytes are not one (they still arrive, so a consumer can
    /// send them to the dead-letter topic instead of stalling on them).
    pub event: Result<CloudEvent, EnvelopeError>,
    /// The bytes as received.
    pub payload: Bytes,
    acker: Box<dyn Acker>,
}

impl Delivery {
    pub fn new(
        at: Position,
        event: Result<CloudEvent, EnvelopeError>,
        payload: Bytes,
        acker: Box<dyn Acker>,
    ) -> Self {
        Self {
            topic: at.topic,
            key: at.key,
            partition: at.partition,
            offset: at.offset,
            attempt: at.attempt,
            event,
            payload,
            acker,
        }
    }

    /// Done with it: it will not be delivered to this group again.
    pub async fn ack(self) -> Result<(), BusError> {
        self.acker.ack().await
    }

    /// Not done: deliver it again after `delay`.
    pub async fn nack(self, delay: Duration) -> Result<(), BusError> {
        self.acker.nack(delay).await
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("topic", &self.topic)
            .field("key", &self.key)
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .field("attempt", &self.attempt)
            .field("event", &self.event)
            .finish_non_exhaustive()
    }
}

/// A group member's stream of deliveries. Dropping it leaves the group; what it
/// held unsettled is redelivered after the ack wait.
pub trait Subscription: Send {
    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, BusError>>;
}

/// A broker. Topics are created on first use.
pub trait EventBus: Send + Sync + 'static {
    /// Publishes durably (returns once the broker has it): the offset it got,
    /// where the broker tells (RabbitMQ streams number a message only as it is
    /// read). Events with the same `key` are delivered in publish order.
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        key: &'a str,
        event: &'a CloudEvent,
    ) -> BoxFuture<'a, Result<Option<u64>, BusError>>;

    /// Publishes bytes as a producer outside Bazaar would: they may not be a valid
    /// event (consumers dead-letter those).
    fn publish_raw<'a>(
        &'a self,
        topic: &'a str,
        key: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Option<u64>, BusError>>;

    /// Joins consumer group `group` on `topic`: members of one group share the
    /// messages, each group gets every message.
    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, BusError>>;

    /// Topic names, sorted.
    fn topics(&self) -> BoxFuture<'_, Result<Vec<String>, BusError>>;

    /// Forgets `group` on `topic` (its position and leases).
    fn delete_group<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
    ) -> BoxFuture<'a, Result<(), BusError>>;

    /// Moves `group` on `topic` to `start` (replay); members must rejoin.
    fn reset<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        start: StartFrom,
    ) -> BoxFuture<'a, Result<(), BusError>>;
}

/// Topic and group names: `[A-Za-z0-9_-]`, dots allowed between words, at most 64.
pub fn check_name(name: &str) -> Result<(), BusError> {
    let bad = |problem: &str| BusError::InvalidName {
        name: name.to_owned(),
        problem: problem.to_owned(),
    };
    if name.is_empty() || name.len() > 64 {
        return Err(bad("must be 1 to 64 characters"));
    }
    if name.starts_with('.') || name.ends_with('.') || name.contains("..") {
        return Err(bad("dots only between words"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(bad("only letters, digits, `_`, `-` and `.`"));
    }
    Ok(())
}

/// The partition of `key` among `partitions`: FNV-1a, stable across processes and
/// versions (std's hasher promises neither).
pub fn partition(key: &str, partitions: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_partitions() {
        for good in ["orders", "order.created", "a-b_c.d1"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".a", "a.", "a..b", "a b", "a*", "a>", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        // Stable values: changing them would reorder every existing topic.
        assert_eq!(partition("order-1", 8), partition("order-1", 8));
        assert_eq!(partition("", 8), 0x811c_9dc5 % 8);
        let spread: std::collections::HashSet<u32> =
            (0..100).map(|i| partition(&format!("k{i}"), 8)).collect();
        assert_eq!(spread.len(), 8);
    }
}
