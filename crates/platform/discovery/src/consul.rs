//! A client of a Consul-compatible registry (the embedded one, or a real Consul
//! agent): registration, and a resolver that watches services with blocking queries
//! and keeps serving the last known instances while the registry is unreachable.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::{Instance, ResolveError, Resolver, StaticResolver};

/// How long one blocking query waits for a change.
const WATCH_WAIT: &str = "30s";
/// Pause after a failed watch before trying again.
const WATCH_RETRY: Duration = Duration::from_secs(1);
/// Deadline of a registration call.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    #[error("registry unreachable: {0}")]
    Unreachable(String),
    #[error("registry answered {status}: {body}")]
    Refused { status: u16, body: String },
}

/// A Consul agent API client. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ConsulClient {
    base: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl ConsulClient {
    /// `base` like `http://127.0.0.1:8500`.
    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            http: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<(http::HeaderMap, Bytes), RegistryError> {
        let uri: Uri = format!("{}{path}", self.base)
            .parse()
            .map_err(|e: http::uri::InvalidUri| RegistryError::Unreachable(e.to_string()))?;
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| RegistryError::Unreachable(e.to_string()))?;
        let response = tokio::time::timeout(timeout, self.http.request(request))
            .await
            .map_err(|_| RegistryError::Unreachable(format!("no answer within {timeout:?}")))?
            .map_err(|e| RegistryError::Unreachable(e.to_string()))?;
        let (parts, body) = response.into_parts();
        let bytes = body
            .collect()
            .await
            .map_err(|e| RegistryError::Unreachable(e.to_string()))?
            .to_bytes();
        if !parts.status.is_success() {
            return Err(RegistryError::Refused {
                status: parts.status.as_u16(),
                body: String::from_utf8_lossy(&bytes).into_owned(),
            });
        }
        Ok((parts.headers, bytes))
    }

    /// `PUT /v1/agent/service/register` with a Consul registration document.
    pub async fn register(&self, registration: &Value) -> Result<(), RegistryError> {
        self.call(
            Method::PUT,
            "/v1/agent/service/register",
            Some(registration.clone()),
            CALL_TIMEOUT,
        )
        .await
        .map(|_| ())
    }

    /// `PUT /v1/agent/service/deregister/{id}`.
    pub async fn deregister(&self, id: &str) -> Result<(), RegistryError> {
        self.call(
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
            .call(Method::GET, &path, None, Duration::from_secs(40))
            .await?;
        let next = headers
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(index);
        let entries: Vec<Value> =
            serde_json::from_slice(&body).map_err(|e| RegistryError::Unreachable(e.to_string()))?;
        let instances = entries
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

/// Resolves from the registry, watching each name asked for; falls back to a static
/// map for names the registry does not know (yet). On a registry outage the last
/// known instances keep being served.
pub struct RegistryResolver {
    client: ConsulClient,
    fallback: StaticResolver,
    known: Arc<RwLock<HashMap<String, Arc<[Instance]>>>>,
    watched: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl RegistryResolver {
    pub fn new(client: ConsulClient, fallback: StaticResolver) -> Self {
        Self {
            client,
            fallback,
            known: Arc::default(),
            watched: std::sync::Mutex::new(Default::default()),
        }
    }

    fn watch(&self, name: &str) {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        if !watched.insert(name.to_owned()) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            watched.remove(name);
            return;
        };
        let (client, known, name) = (self.client.clone(), self.known.clone(), name.to_owned());
        runtime.spawn(async move {
            let mut index = 0;
            loop {
                match client.healthy(&name, index).await {
                    Ok((next, instances)) => {
                        // An index going backwards means the registry restarted.
                        index = if next < index { 0 } else { next };
                        let mut map = known.write().unwrap_or_else(|e| e.into_inner());
                        map.insert(name.clone(), Arc::from(instances));
                    }
                    Err(e) => {
                        tracing::warn!(upstream = %name, error = %e, "registry watch failed; serving the last known instances");
                        tokio::time::sleep(WATCH_RETRY).await;
                    }
                }
            }
        });
    }
}

impl Resolver for RegistryResolver {
    fn resolve(&self, service: &str) -> Result<Arc<[Instance]>, ResolveError> {
        self.watch(service);
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        match known.get(service) {
            Some(instances) if !instances.is_empty() => Ok(instances.clone()),
            _ => self.fallback.resolve(service),
        }
    }

    fn services(&self) -> Vec<String> {
        let mut names = self.fallback.services();
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        names.extend(
            known
                .keys()
                .filter(|k| !names.contains(k))
                .cloned()
                .collect::<Vec<_>>(),
        );
        names.sort();
        names
    }
}
