//! The conformance suite against the embedded broker, served over real HTTP on a
//! free port from a fresh data directory.
#![allow(clippy::unwrap_used)]

mod conformance;

use std::sync::Arc;

use messaging::embedded::client::EmbeddedBus;
use messaging::embedded::store::LogConfig;
use messaging::embedded::{Broker, server};

/// A broker of its own: its address and the bus's.
async fn serve() -> std::net::SocketAddr {
    let dir = std::env::temp_dir().join(format!("bazaar-log-{}", uuid::Uuid::new_v4().simple()));
    let mut config = LogConfig::new(dir);
    config.partitions = 4;
    let broker = Broker::open(config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, server::router(broker)).await });
    addr
}

async fn bus() -> (conformance::Bus, impl std::future::Future<Output = ()>) {
    let addr = serve().await;
    let bus: conformance::Bus = Arc::new(EmbeddedBus::new(&format!("http://{addr}")));
    (bus, async {})
}

async fn behind_proxy() -> (
    conformance::Bus,
    conformance::Proxy,
    impl std::future::Future<Output = ()>,
) {
    let proxy = conformance::Proxy::bind().await;
    proxy.forward_to(serve().await);
    let bus: conformance::Bus = Arc::new(EmbeddedBus::new(&format!("http://{}", proxy.addr)));
    (bus, proxy, async {})
}

conformance::suite!(bus, behind_proxy, conformance::ALL);

/// The consumer runner handles different keys of one partition side by side (a slow
/// key does not hold up the others) while each key's events stay in order.
#[tokio::test]
async fn keys_of_one_partition_run_side_by_side_each_in_order() {
    use messaging::consumer::{self, ConsumerConfig};
    use messaging::{CloudEvent, EventBus};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    let dir = std::env::temp_dir().join(format!("bazaar-log-{}", uuid::Uuid::new_v4().simple()));
    let mut config = LogConfig::new(dir);
    config.partitions = 1;
    let broker = Broker::open(config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, server::router(broker)).await });
    let bus: Arc<dyn EventBus> = Arc::new(EmbeddedBus::new(&url));
    let event = |key: &str, n: u64| {
        CloudEvent::new(
            "/t",
            "thing.happened",
            Some(key),
            serde_json::json!({"n": n}),
        )
    };
    bus.publish("work", "slow", &event("slow", 0))
        .await
        .unwrap();
    for n in 0..20 {
        let key = format!("k{}", n % 4);
        bus.publish("work", &key, &event(&key, n)).await.unwrap();
    }
    let seen = Arc::new(Mutex::new(Vec::<(String, u64, Instant)>::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let task = {
        let seen = seen.clone();
        tokio::spawn(consumer::run(
            bus,
            ConsumerConfig::new("work", "g"),
            stop.clone(),
            move |e, meta| {
                let seen = seen.clone();
                async move {
                    if meta.key == "slow" {
                        tokio::time::sleep(Duration::from_millis(800)).await;
                    }
                    let n = e.data["n"].as_u64().unwrap();
                    seen.lock().unwrap().push((meta.key, n, Instant::now()));
                    Ok(())
                }
            },
        ))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().len() < 21 {
        assert!(Instant::now() < deadline, "{:?}", seen.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    task.await.unwrap();
    let seen = seen.lock().unwrap();
    let slow_done = seen.iter().find(|s| s.0 == "slow").unwrap().2;
    let others_done = seen
        .iter()
        .filter(|s| s.0 != "slow")
        .map(|s| s.2)
        .max()
        .unwrap();
    assert!(
        others_done < slow_done && others_done - started < Duration::from_millis(700),
        "the slow key held the others up"
    );
    for key in ["k0", "k1", "k2", "k3"] {
        let ns: Vec<u64> = seen.iter().filter(|s| s.0 == key).map(|s| s.1).collect();
        let mut sorted = ns.clone();
        sorted.sort_unstable();
        assert_eq!(ns, sorted, "{key} out of order");
        assert_eq!(ns.len(), 5);
    }
}
