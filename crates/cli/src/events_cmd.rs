//! `bazaar events`: watch the topics live, move a consumer group back to replay,
//! and inspect or retry the dead letters.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use messaging::consumer::{DEAD_LETTER_TYPE, dead_letter_topic};
use messaging::{CloudEvent, Delivery, EventBus, StartFrom, SubscribeOptions};
use tokio::sync::mpsc;

use crate::config::ShopConfig;

/// `earliest`, `latest`, an offset, or an RFC 3339 time.
pub fn parse_from(raw: &str) -> Result<StartFrom, String> {
    match raw {
        "earliest" => Ok(StartFrom::Earliest),
        "latest" => Ok(StartFrom::Latest),
        _ => {
            if let Ok(offset) = raw.parse::<u64>() {
                return Ok(StartFrom::Offset(offset));
            }
            time::OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc3339)
                .map(StartFrom::Time)
                .map_err(|_| {
                    format!(
                        "`{raw}`: use earliest, latest, an offset like 42, or a time like 2026-11-26T10:00:00Z"
                    )
                })
        }
    }
}

/// The configured broker; the embedded one is found through the running shop.
pub async fn bus(config: &ShopConfig) -> anyhow::Result<Arc<dyn EventBus>> {
    let mut events = config.events.clone();
    if events.backend == chassis::settings::EventsBackend::Embedded && events.url.is_none() {
        events.url = Some(crate::services_cmd::control_plane_url(&config.data_dir)?);
    }
    events
        .connect()
        .await
        .context("connecting to the events broker")?
        .context("no events broker configured")
}

/// A consumer group of this command alone, removed when it ends.
fn own_group(what: &str) -> String {
    format!("bazaar-{what}-{}", uuid::Uuid::new_v4().simple())
}

fn print(d: &Delivery, json: bool) {
    match (&d.event, json) {
        (Ok(event), true) => println!("{}", String::from_utf8_lossy(&event.to_json())),
        (Ok(event), false) => println!(
            "{} {}#{} {} {} {}",
            event.time,
            d.topic,
            d.offset,
            event.ty,
            event.subject.as_deref().unwrap_or("-"),
            event.data
        ),
        (Err(e), _) => eprintln!(
            "{}#{} not an event ({e}): {}",
            d.topic,
            d.offset,
            String::from_utf8_lossy(&d.payload)
        ),
    }
}

/// Follows `topic` (or every topic) from `from` until Ctrl-C, or `count` events.
pub async fn tail(
    bus: Arc<dyn EventBus>,
    topic: Option<String>,
    from: StartFrom,
    json: bool,
    count: Option<usize>,
) -> anyhow::Result<()> {
    let topics = match topic {
        Some(t) => vec![t],
        None => bus.topics().await?,
    };
    anyhow::ensure!(!topics.is_empty(), "no topics yet; name one with --topic");
    let group = own_group("tail");
    let (tx, mut rx) = mpsc::channel::<Delivery>(256);
    let mut readers = Vec::new();
    for t in &topics {
        let options = SubscribeOptions {
            start: from.clone(),
            ..SubscribeOptions::default()
        };
        let mut sub = bus.subscribe(t, &group, options).await?;
        let tx = tx.clone();
        readers.push(tokio::spawn(async move {
            while let Ok(d) = sub.next().await {
                if tx.send(d).await.is_err() {
                    return;
                }
            }
        }));
    }
    drop(tx);
    let mut seen = 0;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            d = rx.recv() => {
                let Some(d) = d else { break };
                print(&d, json);
                let _ = d.ack().await;
                seen += 1;
                if count.is_some_and(|c| seen >= c) {
                    break;
                }
            }
        }
    }
    for r in readers {
        r.abort();
    }
    for t in &topics {
        let _ = bus.delete_group(t, &group).await;
    }
    Ok(())
}

/// Moves `group` on `topic` back (or forward) to `from`.
pub async fn replay(
    bus: Arc<dyn EventBus>,
    topic: &str,
    group: &str,
    from: StartFrom,
) -> anyhow::Result<()> {
    bus.reset(topic, group, from.clone()).await?;
    println!(
        "consumer group {group} on {topic} restarts from {from:?}; running members pick it up when they re-subscribe"
    );
    Ok(())
}

/// Every dead letter of `topic` (or of every topic), oldest first, reading until
/// the dead-letter topics are quiet for `idle`.
async fn dead_letters(
    bus: &Arc<dyn EventBus>,
    topic: Option<&str>,
    group: &str,
    idle: Duration,
    mut each: impl AsyncFnMut(&CloudEvent) -> anyhow::Result<()>,
) -> anyhow::Result<usize> {
    let topics: Vec<String> = match topic {
        Some(t) => vec![dead_letter_topic(t)],
        None => bus
            .topics()
            .await?
            .into_iter()
            .filter(|t| t.ends_with(".dlq"))
            .collect(),
    };
    let mut n = 0;
    for t in topics {
        let mut sub = bus
            .subscribe(&t, group, SubscribeOptions::default())
            .await?;
        while let Ok(Ok(d)) = tokio::time::timeout(idle, sub.next()).await {
            if let Ok(letter) = &d.event
                && letter.ty == DEAD_LETTER_TYPE
            {
                each(letter).await?;
                n += 1;
            }
            d.ack().await?;
        }
    }
    Ok(n)
}

pub async fn dlq_list(
    bus: Arc<dyn EventBus>,
    topic: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let group = own_group("dlq-list");
    let count = dead_letters(
        &bus,
        topic.as_deref(),
        &group,
        Duration::from_millis(500),
        async |letter| {
            if json {
                println!("{}", String::from_utf8_lossy(&letter.to_json()));
            } else {
                let d = &letter.data;
                println!(
                    "{} {}#{} group={} attempts={} type={} reason: {}",
                    letter.time,
                    d["topic"].as_str().unwrap_or("?"),
                    d["offset"],
                    d["group"].as_str().unwrap_or("?"),
                    d["attempts"],
                    d["event"]["type"].as_str().unwrap_or("(not an event)"),
                    d["reason"].as_str().unwrap_or("")
                );
            }
            Ok(())
        },
    )
    .await?;
    if !json {
        eprintln!("{count} dead letter(s)");
    }
    cleanup(&bus, topic.as_deref(), &group).await;
    Ok(())
}

/// Publishes each dead letter's original event to its topic again. The retry
/// group remembers what was retried, so running it twice retries nothing twice.
pub async fn dlq_retry(bus: Arc<dyn EventBus>, topic: Option<String>) -> anyhow::Result<()> {
    let mut skipped = 0;
    let publisher = bus.clone();
    let count = dead_letters(
        &bus,
        topic.as_deref(),
        "bazaar-dlq-retry",
        Duration::from_millis(500),
        async |letter| {
            let d = &letter.data;
            let original = CloudEvent::from_value(d["event"].clone());
            match (original, d["topic"].as_str()) {
                (Ok(event), Some(to)) => {
                    let key = letter
                        .subject
                        .clone()
                        .unwrap_or_else(|| event.key().to_owned());
                    match publisher.publish(to, &key, &event).await? {
                        Some(offset) => {
                            println!("retried {} ({}) -> {to}#{offset}", event.id, event.ty)
                        }
                        None => println!("retried {} ({}) -> {to}", event.id, event.ty),
                    }
                }
                _ => {
                    skipped += 1;
                    println!(
                        "cannot retry {}: the dead letter holds no valid event",
                        letter.id
                    );
                }
            }
            Ok(())
        },
    )
    .await?;
    eprintln!("{} retried, {skipped} not retryable", count - skipped);
    Ok(())
}

async fn cleanup(bus: &Arc<dyn EventBus>, topic: Option<&str>, group: &str) {
    let topics = match topic {
        Some(t) => vec![dead_letter_topic(t)],
        None => bus.topics().await.unwrap_or_default(),
    };
    for t in topics.iter().filter(|t| t.ends_with(".dlq")) {
        let _ = bus.delete_group(t, group).await;
    }
}
