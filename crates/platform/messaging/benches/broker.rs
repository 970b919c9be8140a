//! Broker benchmark driver (run by benches/broker/run.py): durable publish
//! throughput, and publish-to-consume latency at a fixed rate, against one backend.
//!
//! cargo bench -p messaging --bench broker -- <http://embedded | nats://host:port | kafka://host:port | amqp://user:pass@host:port/vhost> throughput|latency SECONDS [RATE]
//!
//! Prints one JSON line.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use messaging::embedded::client::EmbeddedBus;
use messaging::kafka::{KafkaBus, KafkaConfig};
use messaging::nats::{NatsBus, NatsConfig};
use messaging::rabbitmq::{RabbitBus, RabbitConfig};
use messaging::{CloudEvent, EventBus, StartFrom, SubscribeOptions};
use serde_json::json;
use tokio::sync::Semaphore;

const PAYLOAD: usize = 1024;
const PUBLISHERS: usize = 64;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A 1 KB event (the whole document) carrying its send time.
fn event(n: u64) -> CloudEvent {
    let mut e = CloudEvent::new(
        "/bench",
        "bench.tick",
        Some(&format!("k{}", n % 64)),
        json!({}),
    );
    let filler = PAYLOAD.saturating_sub(e.to_json().len() + 40);
    e.data = json!({ "sent_ns": now_ns(), "pad": "x".repeat(filler) });
    e
}

async fn throughput(bus: Arc<dyn EventBus>, seconds: u64) -> serde_json::Value {
    let topic = format!("bench-tp-{}", std::process::id());
    bus.publish(&topic, "warm", &event(0)).await.unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS as u64 {
        let (bus, done, topic) = (bus.clone(), done.clone(), topic.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = p;
            while Instant::now() < deadline {
                let e = event(n);
                bus.publish(&topic, e.key(), &e).await.unwrap();
                done.fetch_add(1, Ordering::Relaxed);
                n += PUBLISHERS as u64;
            }
        }));
    }
    let started = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    let n = done.load(Ordering::Relaxed);
    json!({ "mode": "throughput", "publishers": PUBLISHERS, "messages": n,
            "per_second": n as f64 / started.elapsed().as_secs_f64() })
}

async fn latency(bus: Arc<dyn EventBus>, seconds: u64, rate: u64) -> serde_json::Value {
    let topic = format!("bench-lat-{}", std::process::id());
    bus.publish(&topic, "warm", &event(0)).await.unwrap();
    let options = SubscribeOptions {
        start: StartFrom::Latest,
        ..SubscribeOptions::default()
    };
    let mut subs = Vec::new();
    for _ in 0..2 {
        subs.push(
            bus.subscribe(&topic, "bench", options.clone())
                .await
                .unwrap(),
        );
    }
    let samples = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let warmup_until = Instant::now() + Duration::from_secs(1);
    let mut consumers = Vec::new();
    for mut sub in subs {
        let samples = samples.clone();
        consumers.push(tokio::spawn(async move {
            while let Ok(Ok(d)) = tokio::time::timeout(Duration::from_secs(3), sub.next()).await {
                let got = now_ns();
                if let Ok(e) = &d.event
                    && let Some(sent) = e.data["sent_ns"].as_u64()
                    && Instant::now() > warmup_until
                {
                    samples.lock().unwrap().push(got.saturating_sub(sent));
                }
                // Deliveries are from distinct partitions: settling them concurrently
                // keeps every key's order (as `consumer::run` does).
                tokio::spawn(d.ack());
            }
        }));
    }
    // Open loop: one publish every 1/rate s, whatever the acks take.
    let permits = Arc::new(Semaphore::new(1024));
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let end = Instant::now() + Duration::from_secs(seconds + 1);
    let mut sent = 0u64;
    let mut dropped = 0u64;
    while Instant::now() < end {
        tick.tick().await;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            dropped += 1;
            continue;
        };
        let (bus, topic) = (bus.clone(), topic.clone());
        sent += 1;
        tokio::spawn(async move {
            let e = event(sent);
            let _ = bus.publish(&topic, e.key(), &e).await;
            drop(permit);
        });
    }
    for c in consumers {
        c.await.unwrap();
    }
    let mut s = samples.lock().unwrap().clone();
    s.sort_unstable();
    let pct = |q: f64| {
        s.get(((s.len() as f64 * q) as usize).min(s.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1e6
    };
    json!({ "mode": "latency", "rate": rate, "sent": sent, "not_sent_backlog": dropped,
            "received": s.len(), "p50_ms": pct(0.5), "p99_ms": pct(0.99), "p999_ms": pct(0.999) })
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.len() < 3 {
        eprintln!("usage: broker <URL> throughput|latency SECONDS [RATE]");
        std::process::exit(2);
    }
    let prefix = format!("bench{}", std::process::id());
    let nats = if args[0].starts_with("nats://") {
        let config = NatsConfig {
            url: args[0].clone(),
            prefix: prefix.clone(),
            ..NatsConfig::default()
        };
        Some(NatsBus::connect(config).await.unwrap())
    } else {
        None
    };
    let rabbit = if args[0].starts_with("amqp://") {
        let config = RabbitConfig {
            url: args[0].clone(),
            prefix,
            ..RabbitConfig::default()
        };
        Some(RabbitBus::connect(config).await.unwrap())
    } else {
        None
    };
    let bus: Arc<dyn EventBus> = match (&nats, &rabbit, args[0].strip_prefix("kafka://")) {
        (Some(n), _, _) => Arc::new(n.clone()),
        (_, Some(r), _) => Arc::new(r.clone()),
        (None, None, Some(brokers)) => Arc::new(
            KafkaBus::connect(KafkaConfig {
                brokers: brokers.to_owned(),
                // tansu holds every fetch this long, data or not.
                fetch_wait: Duration::from_millis(5),
                ..KafkaConfig::default()
            })
            .unwrap(),
        ),
        (None, None, None) => Arc::new(EmbeddedBus::new(&args[0])),
    };
    let seconds: u64 = args[2].parse().unwrap();
    let rate = args.get(3).and_then(|r| r.parse().ok()).unwrap_or(10_000);
    let result = match args[1].as_str() {
        "throughput" => throughput(bus, seconds).await,
        _ => latency(bus, seconds, rate).await,
    };
    if let Some(n) = nats {
        let _ = n.delete_namespace().await;
    }
    if let Some(r) = rabbit {
        let _ = r.delete_namespace().await;
    }
    println!("{result}");
}
