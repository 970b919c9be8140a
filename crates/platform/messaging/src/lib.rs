//! Events between services, whatever the broker.
//!
//! - [`envelope`]: the CloudEvents 1.0 envelope, structured and binary modes.
//! - [`bus`]: the [`EventBus`] seam: publish with a partition key (one key's events
//!   stay in order), consumer groups, ack / nack with delay, redelivery of what a dead
//!   consumer held, replay.
//! - [`nats`]: NATS JetStream.
#![forbid(unsafe_code)]

pub mod bus;
pub mod envelope;
pub mod nats;

pub use bus::{BoxFuture, BusError, Delivery, EventBus, StartFrom, SubscribeOptions, Subscription};
pub use envelope::{CloudEvent, EnvelopeError};
