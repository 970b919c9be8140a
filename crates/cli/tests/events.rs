//! The embedded broker in the control plane, as a process: what it acknowledged
//! survives kill -9.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use messaging::embedded::client::EmbeddedBus;
use messaging::{CloudEvent, EventBus, SubscribeOptions};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_bazaar");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn control_plane(data_dir: &std::path::Path, port: u16) -> Child {
    let child = Command::new(BIN)
        .args(["run", "control-plane"])
        .env("BAZAAR_DATA_DIR", data_dir)
        .env("BAZAAR_CONTROL_PLANE__PORT", port.to_string())
        .env("BAZAAR_LOG__LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the control plane did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[tokio::test]
async fn every_acknowledged_event_survives_kill_9_of_the_broker() {
    let data_dir =
        std::env::temp_dir().join(format!("bazaar-crash-{}", uuid::Uuid::new_v4().simple()));
    let port = free_port();
    let mut broker = control_plane(&data_dir, port);
    let url = format!("http://127.0.0.1:{port}");
    let bus = EmbeddedBus::new(&url);
    let acked: Arc<Mutex<HashMap<u64, String>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..4 {
        let (bus, acked) = (bus.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            for n in 0.. {
                let key = format!("order-{w}-{}", n % 5);
                let event = CloudEvent::new(
                    "/test",
                    "order.created",
                    Some(&key),
                    json!({ "w": w, "n": n }),
                );
                match bus.publish("orders", &key, &event).await {
                    Ok(offset) => {
                        let offset = offset.expect("the embedded log numbers what it stores");
                        acked.lock().unwrap().insert(offset, event.id.clone());
                    }
                    Err(_) => return, // the broker died under us
                }
            }
        }));
    }
    // A consumer acknowledging as it goes.
    let mut sub = bus
        .subscribe("orders", "audit", SubscribeOptions::default())
        .await
        .unwrap();
    let mut consumed = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        if let Ok(Ok(d)) = tokio::time::timeout(Duration::from_millis(100), sub.next()).await {
            d.ack().await.unwrap();
            consumed += 1;
        }
    }
    broker.kill().unwrap(); // SIGKILL, mid-write
    broker.wait().unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "only {} events were acknowledged",
        acked.len()
    );
    assert!(consumed > 0);

    let mut broker = control_plane(&data_dir, port);
    let http = reqwest::Client::new();
    let mut stored: HashMap<u64, String> = HashMap::new();
    let mut from = 0;
    loop {
        let page: Value = http
            .get(format!(
                "{url}/v1/log/topics/orders/records?from={from}&limit=1000"
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let records = page["records"].as_array().unwrap();
        if records.is_empty() {
            break;
        }
        for r in records {
            use base64::Engine;
            let payload = base64::engine::general_purpose::STANDARD
                .decode(r["payload"].as_str().unwrap())
                .unwrap();
            let event = CloudEvent::from_json(&payload).unwrap();
            stored.insert(r["offset"].as_u64().unwrap(), event.id);
        }
        from = records.last().unwrap()["offset"].as_u64().unwrap() + 1;
    }
    let lost: Vec<_> = acked
        .iter()
        .filter(|(offset, id)| stored.get(offset) != Some(id))
        .collect();
    println!(
        "acknowledged {}, stored {} (unacknowledged writes in flight may add a few), lost {}",
        acked.len(),
        stored.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged events lost: {lost:?}");
    // The group resumes near where it was: at most the last flush interval again.
    let mut sub = bus
        .subscribe("orders", "audit", SubscribeOptions::default())
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert!(d.offset > 0, "the group started over");
    broker.kill().unwrap();
    broker.wait().unwrap();
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// The embedded broker down for 30 s while a service keeps writing events: its
/// outbox holds them, the relay catches up when the broker is back, in order.
#[tokio::test]
async fn a_30_second_embedded_broker_outage_loses_nothing() {
    use messaging::outbox::{Outbox, Relay};
    let data_dir =
        std::env::temp_dir().join(format!("bazaar-outage-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&data_dir).unwrap();
    let port = free_port();
    let mut broker = control_plane(&data_dir, port);
    let bus = EmbeddedBus::new(&format!("http://127.0.0.1:{port}"));

    chassis::db::install_drivers();
    let db = format!(
        "sqlite://{}?mode=rwc",
        data_dir.join("producer.db").display()
    );
    let pool = sqlx::AnyPool::connect(&db).await.unwrap();
    Outbox::install(&pool).await.unwrap();
    let outbox = Outbox::new();
    let mut relay = Relay::new(
        pool.clone(),
        Arc::new(bus.clone()),
        outbox.clone(),
        "producer",
    );
    relay.poll = Duration::from_millis(100);
    let stop = chassis::CancellationToken::new();
    let relay_task = tokio::spawn(relay.run(stop.clone()));
    let write = |n: u64| {
        let (pool, outbox) = (pool.clone(), outbox.clone());
        async move {
            let key = format!("order-{}", n % 3);
            let event = CloudEvent::new("/test", "order.created", Some(&key), json!({ "n": n }));
            let mut tx = pool.begin().await.unwrap();
            let row = outbox
                .enqueue(&mut tx, "orders", &key, &event)
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
    broker.kill().unwrap();
    broker.wait().unwrap();
    let outage = Instant::now();
    let mut n = 10;
    while outage.elapsed() < Duration::from_secs(30) {
        write(n).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut broker = control_plane(&data_dir, port);
    let mut sub = bus
        .subscribe("orders", "check", SubscribeOptions::default())
        .await
        .unwrap();
    let mut got: Vec<(String, u64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < n as usize && Instant::now() < deadline {
        if let Ok(Ok(d)) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
            let e = d.event.as_ref().unwrap();
            got.push((e.subject.clone().unwrap(), e.data["n"].as_u64().unwrap()));
            d.ack().await.unwrap();
        }
    }
    assert_eq!(
        got.len(),
        n as usize,
        "every event written during the outage arrived"
    );
    for key in ["order-0", "order-1", "order-2"] {
        let ns: Vec<u64> = got
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, n)| *n)
            .collect();
        let mut sorted = ns.clone();
        sorted.sort_unstable();
        assert_eq!(ns, sorted, "{key} reordered");
    }
    stop.cancel();
    relay_task.await.unwrap();
    broker.kill().unwrap();
    broker.wait().unwrap();
    let _ = std::fs::remove_dir_all(&data_dir);
}
