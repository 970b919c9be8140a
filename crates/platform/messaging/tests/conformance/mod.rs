//! The behaviour every EventBus backend must show, run against each real broker.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use messaging::{CloudEvent, Delivery, EventBus, StartFrom, SubscribeOptions, Subscription};
use serde_json::json;

pub type Bus = Arc<dyn EventBus>;

/// The whole suite, one test per behaviour, for a backend whose `$fixture` is an
/// `async fn() -> (Bus, impl Future<Output = ()>)`: a fresh bus, and what to do
/// once the test passed (clean a shared server up).
macro_rules! suite {
    ($fixture:path) => {
        conformance::suite!(@each $fixture,
            an_event_arrives_whole_with_its_key_offset_and_attempt,
            members_of_a_group_share_work_and_keep_each_keys_order,
            every_group_gets_every_event,
            what_a_dead_consumer_held_is_redelivered_to_another,
            a_nack_brings_the_message_back_after_the_delay_before_later_ones,
            a_group_replays_from_an_offset_or_a_time,
            malformed_bytes_arrive_marked_and_block_nothing
        );
    };
    (@each $fixture:path, $($name:ident),*) => {$(
        #[tokio::test]
        async fn $name() {
            let (bus, done) = $fixture().await;
            conformance::$name(bus).await;
            done.await;
        }
    )*};
}
pub(crate) use suite;

/// A topic no other test uses.
pub fn topic() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

fn event(key: &str, n: u64) -> CloudEvent {
    CloudEvent::new(
        "/conformance",
        "thing.happened",
        Some(key),
        json!({ "n": n }),
    )
}

fn n_of(d: &Delivery) -> u64 {
    d.event.as_ref().unwrap().data["n"].as_u64().unwrap()
}

async fn next(sub: &mut Box<dyn Subscription>, within: Duration) -> Option<Delivery> {
    tokio::time::timeout(within, sub.next())
        .await
        .ok()
        .map(|d| d.unwrap())
}

fn options(ack_wait: Duration) -> SubscribeOptions {
    SubscribeOptions {
        start: StartFrom::Earliest,
        ack_wait,
    }
}

pub async fn an_event_arrives_whole_with_its_key_offset_and_attempt(bus: Bus) {
    let topic = topic();
    let sent = event("order-1", 1);
    let offset = bus.publish(&topic, "order-1", &sent).await.unwrap();
    let mut sub = bus
        .subscribe(&topic, "g", SubscribeOptions::default())
        .await
        .unwrap();
    let got = next(&mut sub, Duration::from_secs(5))
        .await
        .expect("delivered");
    assert_eq!(got.event.as_ref().unwrap(), &sent);
    assert_eq!(got.key, "order-1");
    assert_eq!(got.offset, offset);
    assert_eq!(got.attempt, 1);
    got.ack().await.unwrap();
    assert!(
        next(&mut sub, Duration::from_millis(300)).await.is_none(),
        "acked means gone"
    );
}

/// Two members of one group drain 200 events over 10 keys, acking at random
/// moments: each key's events arrive in publish order, each exactly once.
pub async fn members_of_a_group_share_work_and_keep_each_keys_order(bus: Bus) {
    let topic = topic();
    for n in 0..200u64 {
        bus.publish(
            &topic,
            &format!("k{}", n % 10),
            &event(&format!("k{}", n % 10), n),
        )
        .await
        .unwrap();
    }
    let seen = Arc::new(std::sync::Mutex::new(Vec::<(String, u64, usize)>::new()));
    let mut members = Vec::new();
    for member in 0..2 {
        let mut sub = bus
            .subscribe(&topic, "workers", SubscribeOptions::default())
            .await
            .unwrap();
        let seen = seen.clone();
        members.push(tokio::spawn(async move {
            while let Some(d) = next(&mut sub, Duration::from_secs(2)).await {
                seen.lock().unwrap().push((d.key.clone(), n_of(&d), member));
                if n_of(&d).is_multiple_of(7) {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                d.ack().await.unwrap();
            }
        }));
    }
    for m in members {
        m.await.unwrap();
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 200, "each event exactly once");
    let mut per_key: HashMap<&str, Vec<u64>> = HashMap::new();
    for (key, n, _) in seen.iter() {
        per_key.entry(key).or_default().push(*n);
    }
    for (key, ns) in per_key {
        let mut sorted = ns.clone();
        sorted.sort_unstable();
        assert_eq!(ns, sorted, "{key} out of order");
    }
    let by_member = |m| seen.iter().filter(|s| s.2 == m).count();
    assert!(
        by_member(0) > 0 && by_member(1) > 0,
        "one member did all the work"
    );
}

pub async fn every_group_gets_every_event(bus: Bus) {
    let topic = topic();
    for n in 0..20 {
        bus.publish(&topic, "k", &event("k", n)).await.unwrap();
    }
    for group in ["billing", "emails"] {
        let mut sub = bus
            .subscribe(&topic, group, SubscribeOptions::default())
            .await
            .unwrap();
        let mut got = Vec::new();
        while let Some(d) = next(&mut sub, Duration::from_secs(1)).await {
            got.push(n_of(&d));
            d.ack().await.unwrap();
        }
        assert_eq!(got, (0..20).collect::<Vec<_>>(), "{group}");
    }
}

/// A member dies holding a message: after the ack wait another member gets it,
/// marked as a second attempt.
pub async fn what_a_dead_consumer_held_is_redelivered_to_another(bus: Bus) {
    let topic = topic();
    bus.publish(&topic, "k", &event("k", 1)).await.unwrap();
    let mut doomed = bus
        .subscribe(&topic, "g", options(Duration::from_secs(1)))
        .await
        .unwrap();
    let held = next(&mut doomed, Duration::from_secs(5))
        .await
        .expect("delivered");
    assert_eq!(held.attempt, 1);
    drop(held);
    drop(doomed);
    let started = Instant::now();
    let mut survivor = bus
        .subscribe(&topic, "g", options(Duration::from_secs(1)))
        .await
        .unwrap();
    let again = next(&mut survivor, Duration::from_secs(10))
        .await
        .expect("redelivered");
    assert_eq!(n_of(&again), 1);
    assert_eq!(again.attempt, 2);
    assert!(started.elapsed() < Duration::from_secs(5));
    again.ack().await.unwrap();
}

pub async fn a_nack_brings_the_message_back_after_the_delay_before_later_ones(bus: Bus) {
    let topic = topic();
    bus.publish(&topic, "k", &event("k", 1)).await.unwrap();
    bus.publish(&topic, "k", &event("k", 2)).await.unwrap();
    let mut sub = bus
        .subscribe(&topic, "g", SubscribeOptions::default())
        .await
        .unwrap();
    let first = next(&mut sub, Duration::from_secs(5)).await.unwrap();
    assert_eq!(n_of(&first), 1);
    let nacked_at = Instant::now();
    first.nack(Duration::from_millis(300)).await.unwrap();
    let again = next(&mut sub, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        (n_of(&again), again.attempt),
        (1, 2),
        "the same key waits for it"
    );
    assert!(nacked_at.elapsed() >= Duration::from_millis(250));
    again.ack().await.unwrap();
    let second = next(&mut sub, Duration::from_secs(5)).await.unwrap();
    assert_eq!(n_of(&second), 2);
    second.ack().await.unwrap();
}

pub async fn a_group_replays_from_an_offset_or_a_time(bus: Bus) {
    let topic = topic();
    let mut offsets = Vec::new();
    for n in 0..10 {
        offsets.push(bus.publish(&topic, "k", &event("k", n)).await.unwrap());
    }
    let mut sub = bus
        .subscribe(&topic, "g", SubscribeOptions::default())
        .await
        .unwrap();
    while let Some(d) = next(&mut sub, Duration::from_millis(500)).await {
        d.ack().await.unwrap();
    }
    drop(sub);
    bus.reset(&topic, "g", StartFrom::Offset(offsets[6]))
        .await
        .unwrap();
    let mut sub = bus
        .subscribe(&topic, "g", SubscribeOptions::default())
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(d) = next(&mut sub, Duration::from_millis(500)).await {
        got.push(n_of(&d));
        d.ack().await.unwrap();
    }
    assert_eq!(got, [6, 7, 8, 9]);
    drop(sub);

    tokio::time::sleep(Duration::from_millis(50)).await;
    let cut = time::OffsetDateTime::now_utc();
    tokio::time::sleep(Duration::from_millis(50)).await;
    bus.publish(&topic, "k", &event("k", 10)).await.unwrap();
    bus.reset(&topic, "g", StartFrom::Time(cut)).await.unwrap();
    let mut sub = bus
        .subscribe(&topic, "g", SubscribeOptions::default())
        .await
        .unwrap();
    let d = next(&mut sub, Duration::from_secs(2)).await.unwrap();
    assert_eq!(n_of(&d), 10);
}

/// Bytes that are not an event still arrive, marked, so the consumer can set them
/// aside; the message after them is not blocked.
pub async fn malformed_bytes_arrive_marked_and_block_nothing(bus: Bus) {
    let topic = topic();
    bus.publish_raw(&topic, "k", bytes::Bytes::from_static(b"{not json"))
        .await
        .unwrap();
    bus.publish(&topic, "k", &event("k", 1)).await.unwrap();
    let mut sub = bus
        .subscribe(&topic, "g", SubscribeOptions::default())
        .await
        .unwrap();
    let bad = next(&mut sub, Duration::from_secs(5)).await.unwrap();
    let error = bad.event.as_ref().unwrap_err();
    assert_eq!(error.attribute, "(document)");
    assert_eq!(&bad.payload[..], b"{not json");
    bad.ack().await.unwrap();
    let good = next(&mut sub, Duration::from_secs(5)).await.unwrap();
    assert_eq!(n_of(&good), 1);
}
