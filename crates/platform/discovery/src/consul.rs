//! A client of a Consul-compatible registry (the embedded one, or a real Consul
//! agent): registration, and a resolver that follows services with blocking queries
//! and keeps serving the last known instances while the registry is unreachable.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Uri};
use serde_json::{Value, json};

use crate::json_http::JsonHttp;
use crate::watch::{Sink, Source, WatchingResolver};
use crate::{BoxFuture, Instance, Registrar, Registration, RegistryError};

/// How long one blocking query waits for a change.
const WATCH_WAIT: &str = "30s";
/// Pause after a failed watch before trying again.
const WATCH_RETRY: Duration = Duration::from_secs(1);
/// Deadline of a registration call.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Registrations are repeated this often, so a restarted registry is refilled.
const REREGISTER_EVERY: Duration = Duration::from_secs(15);

/// A Consul agent API client. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ConsulClient {
    http: JsonHttp,
}

impl ConsulClient {
    /// `base` like `http://127.0.0.1:8500`.
    pub fn new(base: &str) -> Self {
        Self {
            http: JsonHttp::new(base),
        }
    }

    /// `PUT /v1/agent/service/register` with a Consul registration document.
    pub async fn register_document(&self, document: &Value) -> Result<(), RegistryError> {
        self.http
            .call(
                Method::PUT,
                "/v1/agent/service/register",
                Some(document),
                CALL_TIMEOUT,
            )
            .await
            .map(|_| ())
    }

    /// `PUT /v1/agent/service/deregister/{id}`.
    pub async fn deregister_id(&self, id: &str) -> Result<(), RegistryError> {
        self.http
            .call(
                Method::PUT,
                &format!("/v1/agent/service/deregister/{id}"),
                None,
                CALL_TIMEOUT,
            )
            .await
            .map(|_| ())
    }

    /// Passing instances of `name`, after the index passes `index` (blocking query).
    pub async fn healthy(
        &self,
        name: &str,
        index: u64,
    ) -> Result<(u64, Vec<Instance>), RegistryError> {
        let path = format!("/v1/health/service/{name}?passing&index={index}&wait={WATCH_WAIT}");
        let (headers, body) = self
            .http
            .json(Method::GET, &path, None, Duration::from_secs(40))
            .await?;
        let next = headers
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(index);
        let instances = body
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|e| {
                let s = &e["Service"];
                let address = s["Address"]
                    .as_str()
                    .filter(|a| !a.is_empty())
                    .unwrap_or("127.0.0.1");
                let port = s["Port"].as_u64()?;
                let base_url: Uri = format!("http://{address}:{port}/").parse().ok()?;
                Some(Instance {
                    id: s["ID"].as_str().unwrap_or_default().to_owned(),
                    base_url,
                })
            })
            .collect();
        Ok((next, instances))
    }
}

/// The Consul registration document of `r` (an HTTP check when it has a health URL).
pub fn registration_document(r: &Registration) -> Value {
    let mut document = json!({
        "Name": r.name, "ID": r.id, "Address": r.address, "Port": r.port,
        "Tags": r.tags, "Meta": r.meta,
    });
    if let Some(url) = &r.health_url {
        document["Check"] = json!({
            "HTTP": url,
            "Interval": go_duration(r.check_interval),
            "Timeout": go_duration(r.check_interval.clamp(Duration::from_millis(100), Duration::from_secs(5))),
            "DeregisterCriticalServiceAfter": go_duration(r.deregister_after),
        });
    }
    document
}

/// A duration both Go's `time.ParseDuration` (Consul) and our registry accept.
fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl Registrar for ConsulClient {
    fn register<'a>(
        &'a self,
        registration: &'a Registration,
    ) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async move {
            self.register_document(&registration_document(registration))
                .await
        })
    }

    fn deregister<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(self.deregister_id(id))
    }

    fn refresh_every(&self) -> Duration {
        REREGISTER_EVERY
    }
}

impl Source for ConsulClient {
    fn follow(self: Arc<Self>, service: String, sink: Sink) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let mut index = 0;
            loop {
                match self.healthy(&service, index).await {
                    Ok((next, instances)) => {
                        // An index going backwards means the registry restarted.
                        index = if next < index { 0 } else { next };
                        sink.update(instances);
                    }
                    Err(e) => {
                        sink.failed(&e);
                        tokio::time::sleep(WATCH_RETRY).await;
                    }
                }
            }
        })
    }
}

/// Resolves from a Consul-compatible registry, the static map as fallback.
pub type RegistryResolver = WatchingResolver<ConsulClient>;
