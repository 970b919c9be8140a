//! The health checker: probes every due HTTP and TCP check, expires TTLs, and removes
//! instances critical for longer than their `DeregisterCriticalServiceAfter`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use super::{CheckKind, Health, Registry};

/// How often due checks are looked for: the finest interval honoured.
const TICK: Duration = Duration::from_millis(50);

/// Runs the checker until the returned handle is aborted (or the runtime stops).
pub fn spawn(registry: Arc<Registry>) -> tokio::task::JoinHandle<()> {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = Instant::now();
            for (id, check_id, kind) in registry.tick(now) {
                let registry = registry.clone();
                let client = client.clone();
                tokio::spawn(async move {
                    let (health, output) = probe(&client, &kind).await;
                    registry.record(&id, &check_id, health, output);
                });
            }
        }
    })
}

async fn probe(client: &Client<HttpConnector, Empty<Bytes>>, kind: &CheckKind) -> (Health, String) {
    match kind {
        CheckKind::Http { url, timeout, .. } => {
            let Ok(uri) = url.parse::<http::Uri>() else {
                return (Health::Critical, format!("invalid URL {url}"));
            };
            match tokio::time::timeout(*timeout, client.get(uri)).await {
                Err(_) => (
                    Health::Critical,
                    format!("GET {url}: timed out after {timeout:?}"),
                ),
                Ok(Err(e)) => (Health::Critical, format!("GET {url}: {e}")),
                Ok(Ok(r)) => {
                    let status = r.status();
                    // Consul: 2xx passing, 429 warning, anything else critical.
                    let health = if status.is_success() {
                        Health::Passing
                    } else if status == http::StatusCode::TOO_MANY_REQUESTS {
                        Health::Warning
                    } else {
                        Health::Critical
                    };
                    (health, format!("HTTP GET {url}: {status}"))
                }
            }
        }
        CheckKind::Tcp {
            address, timeout, ..
        } => {
            match tokio::time::timeout(*timeout, tokio::net::TcpStream::connect(address.as_str()))
                .await
            {
                Ok(Ok(_)) => (Health::Passing, format!("TCP connect {address}: success")),
                Ok(Err(e)) => (Health::Critical, format!("TCP connect {address}: {e}")),
                Err(_) => (
                    Health::Critical,
                    format!("TCP connect {address}: timed out"),
                ),
            }
        }
        CheckKind::Ttl { .. } => (Health::Critical, "TTL checks are not probed".into()),
    }
}
