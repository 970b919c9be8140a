//! The conformance suite against the machine's NATS server with JetStream
//! (`NATS_TEST_URL`, default `nats://127.0.0.1:4222`).
#![allow(clippy::unwrap_used)]

mod conformance;

use std::sync::Arc;

use messaging::nats::{NatsBus, NatsConfig};

fn server() -> String {
    std::env::var("NATS_TEST_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A bus in a namespace of its own (streams of one test never meet another's), and
/// the namespace's deletion once the test passed (a failed test leaves its streams
/// for inspection).
async fn connect(url: String) -> (conformance::Bus, impl std::future::Future<Output = ()>) {
    let bus = NatsBus::connect(NatsConfig {
        url,
        prefix: format!(
            "bazaar_test_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        ),
        partitions: 4,
        ..NatsConfig::default()
    })
    .await
    .unwrap();
    let shared: conformance::Bus = Arc::new(bus.clone());
    (shared, async move {
        assert!(bus.delete_namespace().await.unwrap() > 0);
    })
}

async fn bus() -> (conformance::Bus, impl std::future::Future<Output = ()>) {
    connect(server()).await
}

async fn behind_proxy() -> (
    conformance::Bus,
    conformance::Proxy,
    impl std::future::Future<Output = ()>,
) {
    let proxy = conformance::Proxy::bind().await;
    let target = server();
    let host_port = target.trim_start_matches("nats://");
    proxy.forward_to(
        tokio::net::lookup_host(host_port)
            .await
            .unwrap()
            .next()
            .unwrap(),
    );
    let (bus, done) = connect(format!("nats://{}", proxy.addr)).await;
    (bus, proxy, done)
}

conformance::suite!(bus, behind_proxy, conformance::ALL);

/// A bus remembers which streams it has seen rather than asking the server before
/// every publish; a stream deleted behind its back (by an operator, or another
/// process tearing the namespace down) is made again by the next publish, which
/// then lands in it.
#[tokio::test]
async fn a_stream_deleted_behind_the_bus_is_made_again_by_the_next_publish() {
    use messaging::{CloudEvent, EventBus, StartFrom, SubscribeOptions};
    let config = NatsConfig {
        url: server(),
        prefix: format!(
            "bazaar_test_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        ),
        partitions: 2,
        ..NatsConfig::default()
    };
    let bus = NatsBus::connect(config.clone()).await.unwrap();
    let other = NatsBus::connect(config).await.unwrap();
    let topic = conformance::topic();
    let event = |n: u64| {
        CloudEvent::new(
            "/nats",
            "thing.happened",
            Some("k"),
            serde_json::json!({ "n": n }),
        )
    };
    bus.publish(&topic, "k", &event(1)).await.unwrap();
    assert_eq!(
        other.delete_namespace().await.unwrap(),
        1,
        "the stream existed"
    );
    let second = event(2);
    bus.publish(&topic, "k", &second).await.unwrap();
    let mut sub = bus
        .subscribe(
            &topic,
            "g",
            SubscribeOptions {
                start: StartFrom::Earliest,
                ..SubscribeOptions::default()
            },
        )
        .await
        .unwrap();
    let got = tokio::time::timeout(std::time::Duration::from_secs(5), sub.next())
        .await
        .expect("delivered")
        .unwrap();
    assert_eq!(
        got.event.as_ref().unwrap(),
        &second,
        "only the event sent after the deletion"
    );
    got.ack().await.unwrap();
    assert_eq!(bus.delete_namespace().await.unwrap(), 1);
}
