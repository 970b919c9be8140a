//! NATS JetStream backend.
//!
//! A topic is a stream (`BAZAAR_<topic>`, file storage) over subjects
//! `<prefix>.<topic>.<partition>`; a key always lands on the same partition. A
//! consumer group is one durable pull consumer per partition (`<group>-p<n>`) with
//! one unacknowledged message at a time: every member pulls from every partition's
//! consumer, so members share the work while each partition (and so each key) is
//! handled strictly in order. Events travel in binary mode (attributes as `ce-*`
//! headers) with `Nats-Msg-Id` set to the event id, so a republished event (an outbox
//! relay retrying after a crash) is dropped by JetStream's duplicate window.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, AckKind, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::{BoxStream, SelectAll};

use crate::bus::{
    Acker, BoxFuture, BusError, Delivery, EventBus, Position, StartFrom, SubscribeOptions,
    Subscription, check_name, partition,
};
use crate::envelope::{CloudEvent, EnvelopeError};

/// Settings of the JetStream backend.
#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// Server URL, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// First token of every subject (and prefix of stream names).
    pub prefix: String,
    /// Partitions per topic: the most members of one group that work at once.
    pub partitions: u32,
    /// How long JetStream remembers event ids to drop duplicates.
    pub duplicate_window: Duration,
    /// Retention: messages older than this are removed (zero keeps them).
    pub max_age: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            prefix: "bazaar".to_owned(),
            partitions: 8,
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// A JetStream-backed [`EventBus`]. Cheap to clone.
#[derive(Clone)]
pub struct NatsBus {
    js: jetstream::Context,
    config: Arc<NatsConfig>,
    /// Topics whose stream this bus has seen exist: a publish checks the set, not
    /// the server. Asking JetStream (`STREAM.INFO`) before every publish was a
    /// second request per event, as costly for the server as the publish itself.
    known: Arc<Mutex<HashSet<String>>>,
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

impl NatsBus {
    /// Connects (retrying in the background if the server goes away later).
    pub async fn connect(config: NatsConfig) -> Result<Self, BusError> {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .connect(&config.url)
            .await
            .map_err(unavailable)?;
        Ok(Self {
            js: jetstream::new(client),
            config: Arc::new(config),
            known: Arc::default(),
        })
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // The set holds no invariant a panicking holder could have broken.
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Deletes every stream of this bus's prefix, with their consumers: a test's
    /// namespace when it ends, or an environment being torn down.
    pub async fn delete_namespace(&self) -> Result<usize, BusError> {
        let prefix = format!("{}_", self.config.prefix).to_uppercase();
        let names: Vec<String> = self
            .js
            .stream_names()
            .filter_map(|n| async move { n.ok() })
            .filter(|n| futures::future::ready(n.starts_with(&prefix)))
            .collect()
            .await;
        // Forgotten first: a publish racing the deletion asks the server again.
        self.known().clear();
        for name in &names {
            self.js.delete_stream(name).await.map_err(unavailable)?;
        }
        Ok(names.len())
    }

    fn stream_name(&self, topic: &str) -> String {
        format!("{}_{}", self.config.prefix, topic.replace('.', "_")).to_uppercase()
    }

    fn subject(&self, topic: &str, partition: u32) -> String {
        format!("{}.{topic}.{partition}", self.config.prefix)
    }

    async fn stream(&self, topic: &str) -> Result<stream::Stream, BusError> {
        check_name(topic)?;
        let stream = self
            .js
            .get_or_create_stream(stream::Config {
                name: self.stream_name(topic),
                subjects: vec![format!("{}.{topic}.*", self.config.prefix)],
                storage: stream::StorageType::File,
                duplicate_window: self.config.duplicate_window,
                max_age: self.config.max_age,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        self.known().insert(topic.to_owned());
        Ok(stream)
    }

    /// Publishes to `topic`'s partition for `key`; `headers` makes the message's
    /// headers, again for a second attempt, which only a stream deleted since it
    /// was seen (by an operator or another process) needs.
    async fn send(
        &self,
        topic: &str,
        key: &str,
        headers: impl Fn() -> async_nats::HeaderMap,
        payload: Bytes,
    ) -> Result<Option<u64>, BusError> {
        let known = self.known().contains(topic);
        if !known {
            self.stream(topic).await?;
        }
        let subject = self.subject(topic, partition(key, self.config.partitions));
        let sent = match self.publish(&subject, headers(), payload.clone()).await {
            Err(e) if known && e.kind() == PublishErrorKind::StreamNotFound => {
                self.known().remove(topic);
                self.stream(topic).await?;
                self.publish(&subject, headers(), payload).await
            }
            sent => sent,
        };
        Ok(Some(sent.map_err(unavailable)?.sequence))
    }

    /// Publishes and waits for JetStream's acknowledgement.
    async fn publish(
        &self,
        subject: &str,
        headers: async_nats::HeaderMap,
        payload: Bytes,
    ) -> Result<jetstream::publish::PublishAck, jetstream::context::PublishError> {
        self.js
            .publish_with_headers(subject.to_owned(), headers, payload)
            .await?
            .await
    }

    fn consumer_config(
        &self,
        topic: &str,
        group: &str,
        partition: u32,
        options: &SubscribeOptions,
    ) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(format!("{group}-p{partition}")),
            filter_subject: self.subject(topic, partition),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: options.ack_wait,
            // One in flight per partition: the order of a key's events holds even
            // with several members and redeliveries.
            max_ack_pending: 1,
            deliver_policy: match &options.start {
                StartFrom::Earliest => consumer::DeliverPolicy::All,
                StartFrom::Latest => consumer::DeliverPolicy::New,
                StartFrom::Offset(offset) => consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: (*offset).max(1),
                },
                StartFrom::Time(at) => consumer::DeliverPolicy::ByStartTime { start_time: *at },
            },
            ..Default::default()
        }
    }
}

struct NatsAcker(jetstream::message::Acker);

impl Acker for NatsAcker {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BusError>> {
        Box::pin(async move { self.0.ack().await.map_err(unavailable) })
    }

    fn nack(self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<(), BusError>> {
        Box::pin(async move {
            self.0
                .ack_with(AckKind::Nak(Some(delay)))
                .await
                .map_err(unavailable)
        })
    }
}

type Messages = BoxStream<'static, Result<jetstream::Message, BusError>>;

struct NatsSubscription {
    topic: String,
    messages: SelectAll<Messages>,
}

impl Subscription for NatsSubscription {
    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, BusError>> {
        Box::pin(async move {
            let message = match self.messages.next().await {
                Some(m) => m?,
                None => return Err(BusError::Closed),
            };
            let (offset, attempt) = {
                let info = message
                    .info()
                    .map_err(|e| BusError::Refused(e.to_string()))?;
                (
                    info.stream_sequence,
                    u32::try_from(info.delivered).unwrap_or(u32::MAX),
                )
            };
            let (message, acker) = message.split();
            let header = |name: &str| {
                message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str())
            };
            let key = header("bazaar-key").unwrap_or_default().to_owned();
            let event = if header("ce-specversion").is_some() {
                CloudEvent::from_binary(header, &message.payload)
            } else {
                // Structured mode, or bytes from a producer outside Bazaar.
                CloudEvent::from_json(&message.payload)
            };
            let partition = message
                .subject
                .rsplit('.')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or_default();
            Ok(Delivery::new(
                Position {
                    topic: self.topic.clone(),
                    key,
                    partition,
                    offset,
                    attempt: attempt.max(1),
                },
                event,
                message.payload.clone(),
                Box::new(NatsAcker(acker)),
            ))
        })
    }
}

impl EventBus for NatsBus {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        key: &'a str,
        event: &'a CloudEvent,
    ) -> BoxFuture<'a, Result<Option<u64>, BusError>> {
        Box::pin(async move {
            let (attributes, payload) = event.to_binary();
            let headers = || {
                let mut headers = async_nats::HeaderMap::new();
                for (name, value) in &attributes {
                    headers.insert(name.as_str(), value.as_str());
                }
                headers.insert("bazaar-key", key);
                headers.insert("Nats-Msg-Id", event.id.as_str());
                headers
            };
            self.send(topic, key, headers, Bytes::from(payload)).await
        })
    }

    fn publish_raw<'a>(
        &'a self,
        topic: &'a str,
        key: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Option<u64>, BusError>> {
        Box::pin(async move {
            let headers = || {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("bazaar-key", key);
                headers
            };
            self.send(topic, key, headers, payload).await
        })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, BusError>> {
        Box::pin(async move {
            check_name(group)?;
            let stream = self.stream(topic).await?;
            let mut all = SelectAll::new();
            for p in 0..self.config.partitions {
                let config = self.consumer_config(topic, group, p, &options);
                let name = config.durable_name.clone().unwrap_or_default();
                let consumer: consumer::PullConsumer = stream
                    .get_or_create_consumer(&name, config)
                    .await
                    .map_err(unavailable)?;
                let messages = consumer
                    .stream()
                    .heartbeat(Duration::from_secs(5))
                    .expires(Duration::from_secs(30))
                    .messages()
                    .await
                    .map_err(unavailable)?;
                let messages: Messages = messages.map(|m| m.map_err(unavailable)).boxed();
                all.push(messages);
            }
            Ok(Box::new(NatsSubscription {
                topic: topic.to_owned(),
                messages: all,
            }) as Box<dyn Subscription>)
        })
    }

    fn topics(&self) -> BoxFuture<'_, Result<Vec<String>, BusError>> {
        Box::pin(async move {
            let head = format!("{}.", self.config.prefix);
            let mut names: Vec<String> = self
                .js
                .streams()
                .filter_map(|info| async move { info.ok() })
                .filter_map(|info| {
                    let head = head.clone();
                    async move {
                        let subject = info.config.subjects.first()?;
                        let topic = subject.strip_prefix(&head)?.strip_suffix(".*")?;
                        Some(topic.to_owned())
                    }
                })
                .collect()
                .await;
            names.sort();
            Ok(names)
        })
    }

    fn delete_group<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            check_name(group)?;
            let stream = self.stream(topic).await?;
            for p in 0..self.config.partitions {
                let _ = stream.delete_consumer(&format!("{group}-p{p}")).await;
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
            let stream = self.stream(topic).await?;
            let options = SubscribeOptions {
                start,
                ..SubscribeOptions::default()
            };
            for p in 0..self.config.partitions {
                let config = self.consumer_config(topic, group, p, &options);
                let name = config.durable_name.clone().unwrap_or_default();
                // A consumer's start cannot be changed: recreate it.
                let _ = stream.delete_consumer(&name).await;
                stream.create_consumer(config).await.map_err(unavailable)?;
            }
            Ok(())
        })
    }
}

impl From<EnvelopeError> for BusError {
    fn from(e: EnvelopeError) -> Self {
        BusError::Refused(e.to_string())
    }
}
