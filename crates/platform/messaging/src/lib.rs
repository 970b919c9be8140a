//! Events between services, whatever the broker.
//!
//! - [`envelope`]: the CloudEvents 1.0 envelope, structured and binary modes.
//! - [`bus`]: the [`EventBus`] seam: publish with a partition key (one key's events
//!   stay in order), consumer groups, ack / nack with delay, redelivery of what a dead
//!   consumer held, replay.
//! - [`consumer`]: a handler over a subscription, with backoff and a dead-letter topic.
//! - [`outbox`] and [`inbox`]: events written in the producer's transaction and
//!   relayed in order; handled event ids recorded in the consumer's transaction.
//! - [`sql`]: what their SQL must know of the database under a transaction, `IN` lists.
//! - [`embedded`]: the durable log the control plane hosts (the default broker).
//! - [`nats`]: NATS JetStream.
//! - [`kafka`]: any Kafka-protocol broker, through librdkafka.
//! - [`rabbitmq`]: RabbitMQ, streams for the log and quorum queues for the groups.
#![forbid(unsafe_code)]

pub mod bus;
pub mod consumer;
pub mod embedded;
pub mod envelope;
mod handout;
pub mod inbox;
pub mod kafka;
pub mod nats;
pub mod outbox;
pub mod rabbitmq;
pub mod sql;
#[cfg(feature = "testing")]
pub mod testing;

pub use bus::{BoxFuture, BusError, Delivery, EventBus, StartFrom, SubscribeOptions, Subscription};
pub use envelope::{CloudEvent, EnvelopeError};
