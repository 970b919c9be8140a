//! The conformance suite against the machine's NATS server with JetStream
//! (`NATS_TEST_URL`, default `nats://127.0.0.1:4222`).
#![allow(clippy::unwrap_used)]

mod conformance;

use std::sync::Arc;

use messaging::nats::{NatsBus, NatsConfig};

/// A bus in a namespace of its own (streams of one test never meet another's),
/// deleted once the test passed (a failed test leaves its streams for inspection).
async fn bus() -> (conformance::Bus, impl std::future::Future<Output = ()>) {
    let url = std::env::var("NATS_TEST_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
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

conformance::suite!(bus);
