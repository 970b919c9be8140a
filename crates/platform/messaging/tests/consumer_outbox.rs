//! The consumer runner (retries, dead letters, inbox) and the outbox relay, on a
//! NATS server of the test's own (so it can be stopped) and SQLite.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use messaging::consumer::{self, ConsumerConfig, HandlerError, dead_letter_topic};
use messaging::inbox::Inbox;
use messaging::nats::{NatsBus, NatsConfig};
use messaging::outbox::{Outbox, Relay};
use messaging::{CloudEvent, EventBus, SubscribeOptions};
use serde_json::json;
use sqlx::AnyPool;
use tokio_util::sync::CancellationToken;

/// A JetStream server on a free port, with its own store, that can be stopped.
struct Nats {
    child: Option<Child>,
    port: u16,
    dir: std::path::PathBuf,
}

impl Nats {
    fn start() -> Nats {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("bazaar-nats-{port}"));
        let mut nats = Nats {
            child: None,
            port,
            dir,
        };
        nats.launch();
        nats
    }

    fn launch(&mut self) {
        let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
        let bin = if bin == "nats-server" && std::path::Path::new("/usr/sbin/nats-server").exists()
        {
            "/usr/sbin/nats-server".to_owned()
        } else {
            bin
        };
        let child = Command::new(&bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin}: {e}; install nats-server or set NATS_SERVER_BIN")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn bus(&self) -> NatsBus {
        NatsBus::connect(NatsConfig {
            url: format!("nats://127.0.0.1:{}", self.port),
            partitions: 2,
            ..NatsConfig::default()
        })
        .await
        .unwrap()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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

fn event(key: &str, n: u64) -> CloudEvent {
    CloudEvent::new("/test", "order.created", Some(key), json!({ "n": n }))
}

/// Drains `topic` as group `group` until `want` events arrived (or 20 s passed).
async fn drain(bus: &NatsBus, topic: &str, group: &str, want: usize) -> Vec<CloudEvent> {
    let mut sub = bus
        .subscribe(topic, group, SubscribeOptions::default())
        .await
        .unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < want && Instant::now() < deadline {
        if let Ok(Ok(d)) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
            got.push(d.event.clone().unwrap());
            d.ack().await.unwrap();
        }
    }
    got
}

#[tokio::test]
async fn a_committed_outbox_is_relayed_in_order_and_a_rolled_back_one_never() {
    let nats = Nats::start();
    let bus = nats.bus().await;
    let pool = sqlite().await;
    let outbox = Outbox::new();
    let mut tx = pool.begin().await.unwrap();
    outbox
        .enqueue(&mut tx, "orders", "o-9", &event("o-9", 999))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    for n in 0..20 {
        let mut tx = pool.begin().await.unwrap();
        outbox
            .enqueue(&mut tx, "orders", "o-1", &event("o-1", n))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let relay = Relay::new(
        pool.clone(),
        Arc::new(bus.clone()),
        outbox.clone(),
        "orders",
    );
    assert_eq!(relay.lag().await.unwrap().pending, 20);
    let stop = CancellationToken::new();
    let relay_task = tokio::spawn(relay.run(stop.clone()));
    let got = drain(&bus, "orders", "g", 20).await;
    let ns: Vec<u64> = got.iter().map(|e| e.data["n"].as_u64().unwrap()).collect();
    assert_eq!(ns, (0..20).collect::<Vec<_>>());
    stop.cancel();
    relay_task.await.unwrap();
    let relay = Relay::new(pool, Arc::new(bus), outbox, "orders");
    assert_eq!(relay.lag().await.unwrap().pending, 0);
}

/// The broker is down for 30 s while events keep being written: the outbox holds
/// them, the relay catches up when it returns, nothing is lost or reordered.
#[tokio::test]
async fn a_30_second_broker_outage_loses_nothing() {
    let mut nats = Nats::start();
    let bus = nats.bus().await;
    let pool = sqlite().await;
    let outbox = Outbox::new();
    let mut relay = Relay::new(
        pool.clone(),
        Arc::new(bus.clone()),
        outbox.clone(),
        "orders",
    );
    relay.poll = Duration::from_millis(100);
    let stop = CancellationToken::new();
    let relay_task = tokio::spawn(relay.run(stop.clone()));
    let write = |n: u64| {
        let (pool, outbox) = (pool.clone(), outbox.clone());
        async move {
            let mut tx = pool.begin().await.unwrap();
            outbox
                .enqueue(
                    &mut tx,
                    "orders",
                    &format!("o-{}", n % 3),
                    &event(&format!("o-{}", n % 3), n),
                )
                .await
                .unwrap();
            tx.commit().await.unwrap();
            outbox.written();
        }
    };
    for n in 0..10 {
        write(n).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats.stop();
    let outage = Instant::now();
    let mut n = 10;
    while outage.elapsed() < Duration::from_secs(30) {
        write(n).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let lag = Relay::new(pool.clone(), Arc::new(bus.clone()), outbox.clone(), "x")
        .lag()
        .await
        .unwrap();
    assert!(lag.pending >= 50, "the outbox held the events: {lag:?}");
    assert!(lag.oldest_ms >= 25_000, "{lag:?}");
    nats.launch();
    let got = drain(&bus, "orders", "g", n as usize).await;
    assert_eq!(got.len(), n as usize, "every event written arrived");
    for key in ["o-0", "o-1", "o-2"] {
        let ns: Vec<u64> = got
            .iter()
            .filter(|e| e.subject.as_deref() == Some(key))
            .map(|e| e.data["n"].as_u64().unwrap())
            .collect();
        let mut sorted = ns.clone();
        sorted.sort_unstable();
        assert_eq!(ns, sorted, "{key} reordered");
    }
    stop.cancel();
    relay_task.await.unwrap();
}

#[tokio::test]
async fn failing_poison_and_malformed_messages_go_to_the_dead_letter_topic_and_block_nothing() {
    let nats = Nats::start();
    let bus = nats.bus().await;
    bus.publish("orders", "k", &event("k", 1)).await.unwrap(); // always fails
    bus.publish_raw("orders", "k", bytes::Bytes::from_static(b"garbage"))
        .await
        .unwrap();
    bus.publish("orders", "k", &event("k", 2)).await.unwrap(); // rejected
    bus.publish("orders", "k", &event("k", 3)).await.unwrap(); // panics once, then fine
    bus.publish("orders", "k", &event("k", 4)).await.unwrap(); // fine
    let handled = Arc::new(Mutex::new(Vec::new()));
    let panicked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut config = ConsumerConfig::new("orders", "g");
    config.max_attempts = 3;
    config.base_backoff = Duration::from_millis(50);
    let stop = CancellationToken::new();
    let task = {
        let (handled, panicked) = (handled.clone(), panicked.clone());
        let bus: Arc<dyn EventBus> = Arc::new(bus.clone());
        tokio::spawn(consumer::run(bus, config, stop.clone(), move |e, meta| {
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
        }))
    };
    let letters = drain(&bus, &dead_letter_topic("orders"), "inspect", 3).await;
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

#[tokio::test]
async fn the_inbox_makes_a_redelivered_event_change_nothing_twice() {
    let nats = Nats::start();
    let bus = nats.bus().await;
    let pool = sqlite().await;
    sqlx::query("CREATE TABLE sent (event_id TEXT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let e = event("k", 1);
    // The same event twice, as an at-least-once producer may send it.
    bus.publish_raw("orders", "k", e.to_json().into())
        .await
        .unwrap();
    bus.publish_raw("orders", "k", e.to_json().into())
        .await
        .unwrap();
    let inbox = Inbox::new("notifications");
    let mut sub = bus
        .subscribe("orders", "notifications", SubscribeOptions::default())
        .await
        .unwrap();
    for _ in 0..2 {
        let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap();
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
