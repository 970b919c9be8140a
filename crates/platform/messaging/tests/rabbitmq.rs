//! The conformance suite against the machine's RabbitMQ (`RABBITMQ_TEST_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`; 3.10 or later, no plugin needed).
#![allow(clippy::unwrap_used)]

mod conformance;

use std::sync::Arc;

use messaging::rabbitmq::{RabbitBus, RabbitConfig};

fn server() -> String {
    std::env::var("RABBITMQ_TEST_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A bus in a namespace of its own (queues of one test never meet another's), and the
/// namespace's deletion once the test passed (a failed test leaves its queues for
/// inspection).
async fn connect(url: String) -> (conformance::Bus, impl std::future::Future<Output = ()>) {
    let bus = RabbitBus::connect(RabbitConfig {
        url,
        prefix: format!(
            "bazaar_test_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        ),
        partitions: 4,
        ..RabbitConfig::default()
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

/// The URL with its `host:port` replaced.
fn through(url: &str, addr: std::net::SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (credentials, rest) = rest.rsplit_once('@').map_or(("", rest), |(c, r)| (c, r));
    let path = rest.find('/').map_or("", |i| &rest[i..]);
    let at = if credentials.is_empty() { "" } else { "@" };
    format!("{scheme}://{credentials}{at}{addr}{path}")
}

async fn behind_proxy() -> (
    conformance::Bus,
    conformance::Proxy,
    impl std::future::Future<Output = ()>,
) {
    let proxy = conformance::Proxy::bind().await;
    let url = server();
    let (_, rest) = url.split_once("://").unwrap();
    let host_port = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let host_port = host_port.split('/').next().unwrap();
    let target = tokio::net::lookup_host(host_port)
        .await
        .unwrap()
        .next()
        .unwrap();
    proxy.forward_to(target);
    let (bus, done) = connect(through(&url, proxy.addr)).await;
    (bus, proxy, done)
}

/// Streams number a message only as it is read, and keep no delivery count.
const RABBITMQ: conformance::Traits = conformance::Traits {
    attempts_survive_handover: false,
    offset_known_at_publish: false,
};

conformance::suite!(bus, behind_proxy, RABBITMQ);

/// What the suite does not cover: the topic list, and a group's members sharing the
/// partitions again after one left.
#[tokio::test]
async fn topics_are_listed_and_a_leavers_partitions_go_to_the_others() {
    let (bus, done) = bus().await;
    let topic = conformance::topic();
    for n in 0..40u64 {
        let key = format!("k{}", n % 8);
        let event =
            messaging::CloudEvent::new("/t", "t", Some(&key), serde_json::json!({ "n": n }));
        bus.publish(&topic, &key, &event).await.unwrap();
    }
    bus.publish_raw("other.topic", "k", bytes::Bytes::from_static(b"x"))
        .await
        .unwrap();
    let topics = bus.topics().await.unwrap();
    assert_eq!(topics, {
        let mut want = vec![topic.clone(), "other.topic".to_owned()];
        want.sort();
        want
    });
    let options = messaging::SubscribeOptions::default();
    let mut a = bus.subscribe(&topic, "g", options.clone()).await.unwrap();
    let b = bus.subscribe(&topic, "g", options).await.unwrap();
    drop(b);
    // `a` gets every partition back and so all 40 events, each once.
    let mut seen = std::collections::BTreeSet::new();
    while let Ok(Ok(d)) = tokio::time::timeout(std::time::Duration::from_secs(3), a.next()).await {
        seen.insert(d.event.as_ref().unwrap().data["n"].as_u64().unwrap());
        d.ack().await.unwrap();
    }
    assert_eq!(seen, (0..40).collect());
    drop(a);
    done.await;
}
