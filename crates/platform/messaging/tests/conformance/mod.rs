//! The behaviour every EventBus backend must show, run against each real broker.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use messaging::consumer::{self, ConsumerConfig, HandlerError, dead_letter_topic};
use messaging::inbox::Inbox;
use messaging::outbox::{Enqueued, Outbox, Relay};
use messaging::{CloudEvent, Delivery, EventBus, StartFrom, SubscribeOptions, Subscription};
use serde_json::json;
use sqlx::AnyPool;
use tokio_util::sync::CancellationToken;

pub type Bus = Arc<dyn EventBus>;

mod proxy;
pub use proxy::Proxy;

/// What a broker can do, where brokers differ.
pub struct Traits {
    /// The delivery count survives a message changing owner (Kafka keeps none).
    pub attempts_survive_handover: bool,
    /// A publish learns the offset its message got (RabbitMQ streams number
    /// messages only as they are read).
    pub offset_known_at_publish: bool,
}

pub const ALL: Traits = Traits {
    attempts_survive_handover: true,
    offset_known_at_publish: true,
};

/// The whole suite, one test per behaviour, for a backend with:
/// - `$fixture`: `async fn() -> (Bus, impl Future<Output = ()>)`, a fresh bus and
///   what to do once the test passed (clean a shared server up);
/// - `$outage`: `async fn() -> (Bus, Proxy, impl Future<Output = ()>)`, a bus that
///   reaches its broker only through the proxy, so the test can cut it off;
/// - `$traits`: what the broker can and cannot do ([`Traits`]).
macro_rules! suite {
    ($fixture:path, $outage:path, $traits:expr) => {
        conformance::suite!(@each $fixture, $traits,
            an_event_arrives_whole_with_its_key_offset_and_attempt,
            members_of_a_group_share_work_and_keep_each_keys_order,
            every_group_gets_every_event,
            what_a_dead_consumer_held_is_redelivered_to_another,
            a_nack_brings_the_message_back_after_the_delay_before_later_ones,
            a_group_replays_from_an_offset_or_a_time,
            malformed_bytes_arrive_marked_and_block_nothing,
            failing_poison_and_malformed_messages_go_to_the_dead_letter_topic,
            a_committed_outbox_is_relayed_in_order_and_a_rolled_back_one_never,
            a_row_another_instance_commits_late_keeps_its_place_in_its_key,
            the_inbox_makes_a_redelivered_event_change_nothing_twice,
            waiting_events_of_several_partitions_share_a_commit_each_key_in_order
        );

        #[tokio::test]
        async fn a_30_second_broker_outage_loses_nothing() {
            let (bus, proxy, done) = $outage().await;
            conformance::a_30_second_broker_outage_loses_nothing(bus, proxy).await;
            done.await;
        }
    };
    (@each $fixture:path, $traits:expr, $($name:ident),*) => {$(
        #[tokio::test]
        async fn $name() {
            let (bus, done) = $fixture().await;
            conformance::$name(bus, &$traits).await;
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

pub async fn an_event_arrives_whole_with_its_key_offset_and_attempt(bus: Bus, traits: &Traits) {
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
    assert_eq!(offset.is_some(), traits.offset_known_at_publish);
    if let Some(offset) = offset {
        assert_eq!(got.offset, offset, "delivered where publishing said");
    }
    assert_eq!(got.attempt, 1);
    got.ack().await.unwrap();
    assert!(
        next(&mut sub, Duration::from_millis(300)).await.is_none(),
        "acked means gone"
    );
}

/// Two members of one group drain 200 events over 10 keys, acking at random
/// moments: each key's events arrive in publish order, each exactly once.
pub async fn members_of_a_group_share_work_and_keep_each_keys_order(bus: Bus, _: &Traits) {
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
    // Both join before either starts, as a deployment's replicas would be.
    let mut subs = Vec::new();
    for _ in 0..2 {
        subs.push(
            bus.subscribe(&topic, "workers", SubscribeOptions::default())
                .await
                .unwrap(),
        );
    }
    let mut members = Vec::new();
    for (member, mut sub) in subs.into_iter().enumerate() {
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

pub async fn every_group_gets_every_event(bus: Bus, _: &Traits) {
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
pub async fn what_a_dead_consumer_held_is_redelivered_to_another(bus: Bus, traits: &Traits) {
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
    if traits.attempts_survive_handover {
        assert_eq!(again.attempt, 2);
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    again.ack().await.unwrap();
}

pub async fn a_nack_brings_the_message_back_after_the_delay_before_later_ones(
    bus: Bus,
    _: &Traits,
) {
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

pub async fn a_group_replays_from_an_offset_or_a_time(bus: Bus, _: &Traits) {
    let topic = topic();
    for n in 0..10 {
        bus.publish(&topic, "k", &event("k", n)).await.unwrap();
    }
    let mut sub = bus
        .subscribe(&topic, "g", SubscribeOptions::default())
        .await
        .unwrap();
    // Offsets as a consumer sees them (and `bazaar events tail` shows them).
    let mut offsets = Vec::new();
    while let Some(d) = next(&mut sub, Duration::from_millis(500)).await {
        offsets.push(d.offset);
        d.ack().await.unwrap();
    }
    assert_eq!(offsets.len(), 10);
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
pub async fn malformed_bytes_arrive_marked_and_block_nothing(bus: Bus, _: &Traits) {
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

async fn sqlite() -> AnyPool {
    sqlx::any::install_default_drivers();
    let path = std::env::temp_dir().join(format!("bazaar-outbox-{}.db", uuid::Uuid::new_v4()));
    let pool = AnyPool::connect(&format!("sqlite://{}?mode=rwc", path.display()))
        .await
        .unwrap();
    Outbox::install(&pool).await.unwrap();
    Inbox::install(&pool).await.unwrap();
    pool
}

/// Drains `topic` as group `group` until `want` distinct events arrived (or 30 s
/// passed); a redelivered duplicate is acked and skipped, as an inbox would.
async fn drain(bus: &Bus, topic: &str, group: &str, want: usize) -> Vec<CloudEvent> {
    let mut sub = bus
        .subscribe(topic, group, SubscribeOptions::default())
        .await
        .unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < want && Instant::now() < deadline {
        if let Some(d) = next(&mut sub, Duration::from_millis(500)).await {
            let event = d.event.clone().unwrap();
            if !got.iter().any(|e: &CloudEvent| e.id == event.id) {
                got.push(event);
            }
            d.ack().await.unwrap();
        }
    }
    got
}

fn assert_in_order_per_key(got: &[CloudEvent]) {
    let mut per_key: HashMap<&str, Vec<u64>> = HashMap::new();
    for e in got {
        per_key
            .entry(e.subject.as_deref().unwrap_or_default())
            .or_default()
            .push(e.data["n"].as_u64().unwrap());
    }
    for (key, ns) in per_key {
        let mut sorted = ns.clone();
        sorted.sort_unstable();
        assert_eq!(ns, sorted, "{key} reordered");
    }
}

/// The consumer runner: a handler that keeps failing, a reject, bytes that are no
/// event and a panic each end in the dead-letter topic (or a retry) with the reason,
/// and the events after them are handled.
pub async fn failing_poison_and_malformed_messages_go_to_the_dead_letter_topic(
    bus: Bus,
    _: &Traits,
) {
    let topic = topic();
    bus.publish(&topic, "k", &event("k", 1)).await.unwrap(); // always fails
    bus.publish_raw(&topic, "k", bytes::Bytes::from_static(b"garbage"))
        .await
        .unwrap();
    bus.publish(&topic, "k", &event("k", 2)).await.unwrap(); // rejected
    bus.publish(&topic, "k", &event("k", 3)).await.unwrap(); // panics once, then fine
    bus.publish(&topic, "k", &event("k", 4)).await.unwrap(); // fine
    let handled = Arc::new(std::sync::Mutex::new(Vec::new()));
    let panicked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut config = ConsumerConfig::new(&topic, "g");
    config.max_attempts = 3;
    config.base_backoff = Duration::from_millis(50);
    let stop = CancellationToken::new();
    let task = {
        let (handled, panicked) = (handled.clone(), panicked.clone());
        tokio::spawn(consumer::run(
            bus.clone(),
            config,
            stop.clone(),
            move |e, meta| {
                let (handled, panicked) = (handled.clone(), panicked.clone());
                async move {
                    match e.data["n"].as_u64() {
                        Some(1) => Err(HandlerError::Retry("payments is down".into())),
                        Some(2) => Err(HandlerError::Reject("unknown currency".into())),
                        Some(3) if !panicked.swap(true, std::sync::atomic::Ordering::SeqCst) => {
                            panic!("a bug")
                        }
                        Some(n) => {
                            handled.lock().unwrap().push((n, meta.attempt));
                            Ok(())
                        }
                        None => Err(HandlerError::Reject("no n".into())),
                    }
                }
            },
        ))
    };
    let letters = drain(&bus, &dead_letter_topic(&topic), "inspect", 3).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while handled.lock().unwrap().len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    task.await.unwrap();
    assert_eq!(*handled.lock().unwrap(), [(3, 2), (4, 1)]);
    let reasons: Vec<String> = letters
        .iter()
        .map(|l| l.data["reason"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(letters.len(), 3, "{reasons:?}");
    assert!(
        reasons[0].contains("failed 3 times") && reasons[0].contains("payments is down"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("invalid CloudEvent"), "{reasons:?}");
    assert_eq!(letters[1].data["payload"], "garbage");
    assert_eq!(reasons[2], "unknown currency");
    assert_eq!(
        letters[0].data["event"]["data"]["n"], 1,
        "the original travels along"
    );
}

pub async fn a_committed_outbox_is_relayed_in_order_and_a_rolled_back_one_never(
    bus: Bus,
    _: &Traits,
) {
    let topic = topic();
    let pool = sqlite().await;
    let outbox = Outbox::new();
    let mut tx = pool.begin().await.unwrap();
    let rolled_back = outbox
        .enqueue(&mut tx, &topic, "o-9", &event("o-9", 999))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    drop(rolled_back);
    // Written before the relay starts and never handed over: it reads them.
    for n in 0..20 {
        drop(commit_one_event(&pool, &outbox, &topic, n).await);
    }
    let mut relay = Relay::new(pool.clone(), bus.clone(), outbox.clone(), "relay");
    // No read on a timer within the test: only what the relay is told makes it read.
    relay.poll = Duration::from_secs(120);
    assert_eq!(relay.lag().await.unwrap().pending, 20);
    let stop = CancellationToken::new();
    let relay_task = tokio::spawn(relay.run(stop.clone()));
    let ns = |got: Vec<CloudEvent>| -> Vec<u64> {
        got.iter().map(|e| e.data["n"].as_u64().unwrap()).collect()
    };
    assert_eq!(
        ns(drain(&bus, &topic, "g", 20).await),
        (0..20).collect::<Vec<_>>()
    );
    // Commits trickling in while the relay runs, each waking it, every other one
    // handed over (the rest it reads back): each published once.
    for n in 20..40 {
        let row = commit_one_event(&pool, &outbox, &topic, n).await;
        if n % 2 == 0 {
            outbox.committed([row]);
        } else {
            outbox.written();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        ns(drain(&bus, &topic, "g", 20).await),
        (20..40).collect::<Vec<_>>()
    );
    // A row another instance of the service wrote (never handed to this relay),
    // then this one's rows of the same key, handed over at once: the other's goes
    // out first, as it was written first.
    drop(commit_one_event(&pool, &outbox, &topic, 40).await);
    for n in 41..46 {
        let row = commit_one_event(&pool, &outbox, &topic, n).await;
        outbox.committed([row]);
    }
    assert_eq!(
        ns(drain(&bus, &topic, "g", 6).await),
        (40..46).collect::<Vec<_>>()
    );
    stop.cancel();
    relay_task.await.unwrap();
    let relay = Relay::new(pool, bus.clone(), outbox, "relay");
    assert_eq!(relay.lag().await.unwrap().pending, 0);
    // Every message on the topic, copies included.
    let mut all = bus
        .subscribe(&topic, "all", SubscribeOptions::default())
        .await
        .unwrap();
    let mut ids = Vec::new();
    while let Some(d) = next(&mut all, Duration::from_secs(2)).await {
        ids.push(d.event.as_ref().unwrap().id.clone());
        d.ack().await.unwrap();
    }
    assert_eq!(ids.len(), 46, "each event published once");
}

/// On PostgreSQL, where transactions commit in any order: another instance's
/// transaction takes a `seq`, this instance's later row of another key goes out
/// past it, then the other commits (it hands nothing to this relay) and this
/// instance writes that key's next event. The other's row goes out first, though
/// the relay trusts its hand-over and its timer is off.
pub async fn a_row_another_instance_commits_late_keeps_its_place_in_its_key(bus: Bus, _: &Traits) {
    let topic = topic();
    let (pool, url) = postgres().await;
    let outbox = Outbox::new();
    let mut relay = Relay::new(pool.clone(), bus.clone(), outbox.clone(), "relay");
    relay.poll = Duration::from_secs(120);
    let stop = CancellationToken::new();
    let relay_task = tokio::spawn(relay.run(stop.clone()));
    let commit = |key: &'static str, n: u64| {
        let (pool, outbox, topic) = (pool.clone(), outbox.clone(), topic.clone());
        async move {
            let mut tx = pool.begin().await.unwrap();
            let row = outbox
                .enqueue(&mut tx, &topic, key, &event(key, n))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            outbox.committed([row]);
        }
    };
    let ns = |got: Vec<CloudEvent>| -> Vec<u64> {
        got.iter().map(|e| e.data["n"].as_u64().unwrap()).collect()
    };
    commit("o-1", 0).await;
    assert_eq!(ns(drain(&bus, &topic, "g", 1).await), [0]);
    let mut other = pool.begin().await.unwrap();
    let not_handed = outbox
        .enqueue(&mut other, &topic, "o-2", &event("o-2", 1))
        .await
        .unwrap();
    drop(not_handed);
    commit("o-3", 2).await;
    assert_eq!(ns(drain(&bus, &topic, "g", 1).await), [2]);
    other.commit().await.unwrap();
    commit("o-2", 3).await;
    assert_eq!(ns(drain(&bus, &topic, "g", 2).await), [1, 3]);
    stop.cancel();
    relay_task.await.unwrap();
    pool.close().await;
    let _ = <sqlx::Any as sqlx::migrate::MigrateDatabase>::drop_database(&url).await;
}

async fn postgres() -> (AnyPool, String) {
    sqlx::any::install_default_drivers();
    let base = std::env::var("POSTGRES_TEST_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let url = format!("{base}/bazaar_outbox_{}", uuid::Uuid::new_v4().simple());
    <sqlx::Any as sqlx::migrate::MigrateDatabase>::create_database(&url)
        .await
        .unwrap();
    let pool = AnyPool::connect(&url).await.unwrap();
    Outbox::install(&pool).await.unwrap();
    (pool, url)
}

/// Event `n` of key `o-1` written to `outbox` in a transaction of its own.
async fn commit_one_event(pool: &AnyPool, outbox: &Outbox, topic: &str, n: u64) -> Enqueued {
    let mut tx = pool.begin().await.unwrap();
    let row = outbox
        .enqueue(&mut tx, topic, "o-1", &event("o-1", n))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    row
}

pub async fn the_inbox_makes_a_redelivered_event_change_nothing_twice(bus: Bus, _: &Traits) {
    let topic = topic();
    let pool = sqlite().await;
    sqlx::query("CREATE TABLE sent (event_id TEXT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let e = event("k", 1);
    // The same event twice, as an at-least-once producer may send it.
    for _ in 0..2 {
        bus.publish_raw(&topic, "k", e.to_json().into())
            .await
            .unwrap();
    }
    let inbox = Inbox::new("notifications");
    let mut sub = bus
        .subscribe(&topic, "notifications", SubscribeOptions::default())
        .await
        .unwrap();
    for _ in 0..2 {
        let d = next(&mut sub, Duration::from_secs(5)).await.unwrap();
        let event = d.event.as_ref().unwrap();
        let mut tx = pool.begin().await.unwrap();
        if inbox.claim(&mut tx, &event.id).await.unwrap() {
            sqlx::query("INSERT INTO sent (event_id) VALUES ($1)")
                .bind(&event.id)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        d.ack().await.unwrap();
    }
    let sent: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sent")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(sent, 1);
}

/// The broker is unreachable for 30 s while events keep being written: the outbox
/// holds them, the relay catches up when it is back, nothing is lost or reordered.
pub async fn a_30_second_broker_outage_loses_nothing(bus: Bus, proxy: Proxy) {
    let topic = topic();
    let pool = sqlite().await;
    let outbox = Outbox::new();
    let mut relay = Relay::new(pool.clone(), bus.clone(), outbox.clone(), "relay");
    relay.poll = Duration::from_millis(100);
    let stop = CancellationToken::new();
    let relay_task = tokio::spawn(relay.run(stop.clone()));
    let write = |n: u64| {
        let (pool, outbox, topic) = (pool.clone(), outbox.clone(), topic.clone());
        async move {
            let key = format!("o-{}", n % 3);
            let mut tx = pool.begin().await.unwrap();
            let row = outbox
                .enqueue(&mut tx, &topic, &key, &event(&key, n))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            outbox.committed([row]);
        }
    };
    for n in 0..10 {
        write(n).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.cut();
    let outage = Instant::now();
    let mut n = 10;
    while outage.elapsed() < Duration::from_secs(30) {
        write(n).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let lag = Relay::new(pool.clone(), bus.clone(), outbox.clone(), "x")
        .lag()
        .await
        .unwrap();
    assert!(lag.pending >= 50, "the outbox held the events: {lag:?}");
    assert!(lag.oldest_ms >= 25_000, "{lag:?}");
    proxy.restore();
    let got = drain(&bus, &topic, "g", n as usize).await;
    let mut ns: Vec<u64> = got.iter().map(|e| e.data["n"].as_u64().unwrap()).collect();
    assert_in_order_per_key(&got);
    ns.sort_unstable();
    assert_eq!(
        ns,
        (0..n).collect::<Vec<_>>(),
        "every event written arrived"
    );
    stop.cancel();
    relay_task.await.unwrap();
}

/// An event handled in a transaction: its partition, key and number.
type Handled = (u32, String, u64);

/// Notes which events each transaction carried: `handle` adds its event to the open
/// transaction's list and the transaction's first after-commit callback closes the
/// list (a consumer's commits run one after another). The first event's transaction
/// stays open half a second, so the other partitions' deliveries arrive meanwhile.
#[derive(Default)]
struct CommitLog {
    open: Arc<std::sync::Mutex<Vec<Handled>>>,
    closed: Arc<std::sync::Mutex<Vec<Vec<Handled>>>>,
    first: std::sync::atomic::AtomicBool,
}

impl consumer::Transactional for CommitLog {
    fn handle<'a>(
        &'a self,
        _tx: &'a mut sqlx::AnyConnection,
        event: &'a CloudEvent,
        meta: &'a consumer::Meta,
        _prepared: consumer::Prepared,
        after: &'a mut consumer::AfterCommit,
    ) -> messaging::BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            if !self.first.swap(true, std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let n = event.data["n"].as_u64().unwrap();
            self.open
                .lock()
                .unwrap()
                .push((meta.partition, meta.key.clone(), n));
            let (open, closed) = (self.open.clone(), self.closed.clone());
            after.then(move || {
                let group = std::mem::take(&mut *open.lock().unwrap());
                if !group.is_empty() {
                    closed.lock().unwrap().push(group);
                }
            });
            Ok(())
        })
    }
}

/// Deliveries of several partitions waiting at once (a queue under load) are
/// committed together in one transaction, also where the broker hands out one
/// message per partition at a time; each is handled exactly once and each key's
/// events still commit in order.
pub async fn waiting_events_of_several_partitions_share_a_commit_each_key_in_order(
    bus: Bus,
    _: &Traits,
) {
    let topic = topic();
    let keys = ["a", "b", "c", "d", "e", "f"];
    for n in 0..30 {
        let key = keys[n as usize % keys.len()];
        bus.publish(&topic, key, &event(key, n)).await.unwrap();
    }
    let pool = sqlite().await;
    let log = Arc::new(CommitLog::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer::run_transactional(
        bus.clone(),
        ConsumerConfig::new(&topic, "g"),
        consumer::Store {
            pool,
            inbox: Inbox::new("g"),
        },
        stop.clone(),
        log.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    let handled = || {
        log.closed
            .lock()
            .unwrap()
            .iter()
            .map(Vec::len)
            .sum::<usize>()
    };
    while handled() < 30 {
        assert!(Instant::now() < deadline, "handled only {}", handled());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    task.await.unwrap();
    let commits = log.closed.lock().unwrap().clone();
    let all: Vec<&Handled> = commits.iter().flatten().collect();
    for key in keys {
        let ns: Vec<u64> = all.iter().filter(|h| h.1 == key).map(|h| h.2).collect();
        let expected: Vec<u64> = (0..30).filter(|n| keys[*n as usize % 6] == key).collect();
        assert_eq!(ns, expected, "{key}: each event once, in order");
    }
    let spans = |c: &Vec<Handled>| {
        let mut partitions: Vec<u32> = c.iter().map(|h| h.0).collect();
        partitions.sort_unstable();
        partitions.dedup();
        partitions.len()
    };
    assert!(
        commits.iter().any(|c| spans(c) > 1),
        "no commit carried events of two partitions: {commits:?}"
    );
}
