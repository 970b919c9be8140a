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
