//! The conformance suite against a real Kafka-protocol broker: `tansu`, started by
//! each test on a free port (see `messaging::testing`).
#![allow(clippy::unwrap_used)]

mod conformance;

use std::net::SocketAddr;
use std::sync::Arc;

use messaging::kafka::{KafkaBus, KafkaConfig};
use messaging::testing::{Tansu, free_port};

fn connect(brokers: String) -> conformance::Bus {
    let bus = KafkaBus::connect(KafkaConfig {
        brokers,
        partitions: 4,
        ..KafkaConfig::default()
    })
    .unwrap();
    Arc::new(bus)
}

async fn bus() -> (conformance::Bus, impl std::future::Future<Output = ()>) {
    let tansu = Tansu::start();
    (connect(tansu.brokers()), async move { drop(tansu) })
}

async fn behind_proxy() -> (
    conformance::Bus,
    conformance::Proxy,
    impl std::future::Future<Output = ()>,
) {
    let proxy = conformance::Proxy::bind().await;
    let port = free_port();
    // The broker tells clients to come back through the proxy.
    let tansu = Tansu::start_advertising(port, proxy.addr.port());
    proxy.forward_to(SocketAddr::from(([127, 0, 0, 1], port)));
    let bus = connect(proxy.addr.to_string());
    (bus, proxy, async move { drop(tansu) })
}

/// Kafka keeps no delivery count across owners.
const KAFKA: conformance::Traits = conformance::Traits {
    attempts_survive_handover: false,
    offset_known_at_publish: true,
};

conformance::suite!(bus, behind_proxy, KAFKA);
