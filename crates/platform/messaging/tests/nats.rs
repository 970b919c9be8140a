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
