//! The etcd v3 backend: each instance is a key under `<prefix><service>/<id>` bound to
//! a lease the instance keeps alive, so a crashed instance disappears when its lease
//! runs out; resolvers read the prefix once and then follow it with a watch.
//!
//! It speaks etcd's JSON gateway (`POST /v3/kv/range`, `/v3/watch`, `/v3/lease/*`),
//! the v3 API etcd documents for clients without gRPC: no protoc and no tonic/prost
//! build for one backend, and the same calls `curl` can make when debugging.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::{Buf, BytesMut};
use http::{Method, Uri};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::json_http::JsonHttp;
use crate::watch::{Sink, Source, WatchingResolver};
use crate::{BoxFuture, Instance, Registrar, Registration, RegistryError};

/// Where Bazaar keeps instances unless configured otherwise.
pub const DEFAULT_PREFIX: &str = "/bazaar/services/";
/// Lease of a registration: how long a crashed instance stays listed.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
const WATCH_RETRY: Duration = Duration::from_secs(1);

/// An etcd v3 client for one key prefix. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EtcdClient {
    http: JsonHttp,
    prefix: String,
}

/// One change seen by a watch.
#[derive(Debug)]
enum Event {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

impl EtcdClient {
    /// `endpoint` like `http://127.0.0.1:2379`; `prefix` ends with `/`.
    pub fn new(endpoint: &str, prefix: &str) -> Self {
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Self {
            http: JsonHttp::new(endpoint),
            prefix,
        }
    }

    fn key(&self, service: &str, id: &str) -> String {
        format!("{}{service}/{id}", self.prefix)
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value, RegistryError> {
        Ok(self
            .http
            .json(Method::POST, path, Some(&body), CALL_TIMEOUT)
            .await?
            .1)
    }

    /// Grants a lease of `ttl`; returns its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, RegistryError> {
        let answer = self
            .post("/v3/lease/grant", json!({ "TTL": ttl.as_secs().max(1) }))
            .await?;
        int(&answer["ID"]).ok_or_else(|| bad_answer("lease grant", &answer))
    }

    /// Refreshes a lease; `false` when it no longer exists (expired or revoked).
    pub async fn keep_alive(&self, lease: i64) -> Result<bool, RegistryError> {
        let answer = self
            .post("/v3/lease/keepalive", json!({ "ID": lease.to_string() }))
            .await?;
        Ok(int(&answer["result"]["TTL"]).unwrap_or(0) > 0)
    }

    /// Revokes a lease and with it every key bound to it.
    pub async fn revoke(&self, lease: i64) -> Result<(), RegistryError> {
        self.post("/v3/lease/revoke", json!({ "ID": lease.to_string() }))
            .await
            .map(|_| ())
    }

    /// Puts `key = value`, bound to `lease` when given.
    pub async fn put(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<i64>,
    ) -> Result<(), RegistryError> {
        let mut body = json!({ "key": B64.encode(key), "value": B64.encode(value) });
        if let Some(lease) = lease {
            body["lease"] = json!(lease.to_string());
        }
        self.post("/v3/kv/put", body).await.map(|_| ())
    }

    /// Deletes one key.
    pub async fn delete(&self, key: &str) -> Result<(), RegistryError> {
        self.post("/v3/kv/deleterange", json!({ "key": B64.encode(key) }))
            .await
            .map(|_| ())
    }

    /// Every registered instance, by service name (one read).
    pub async fn all(&self) -> Result<Vec<(String, Instance)>, RegistryError> {
        let (_, kvs) = self.range(&self.prefix).await?;
        Ok(kvs
            .iter()
            .filter_map(|(key, value)| {
                let service = key
                    .strip_prefix(&self.prefix)?
                    .split('/')
                    .next()?
                    .to_owned();
                Some((service, parse_instance(value)?))
            })
            .collect())
    }

    /// The instances of `service` registered now (one read, no watch).
    pub async fn instances(&self, service: &str) -> Result<Vec<Instance>, RegistryError> {
        let (_, kvs) = self.range(&format!("{}{service}/", self.prefix)).await?;
        Ok(kvs.iter().filter_map(|(_, v)| parse_instance(v)).collect())
    }

    /// Every key under `prefix` with its value, and the store revision read at.
    async fn range(&self, prefix: &str) -> Result<(i64, Vec<(String, Vec<u8>)>), RegistryError> {
        let answer = self
            .post(
                "/v3/kv/range",
                json!({ "key": B64.encode(prefix), "range_end": B64.encode(prefix_end(prefix)) }),
            )
            .await?;
        let revision =
            int(&answer["header"]["revision"]).ok_or_else(|| bad_answer("range", &answer))?;
        let kvs = answer["kvs"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|kv| Some((decode_str(&kv["key"])?, decode(&kv["value"])?)))
            .collect();
        Ok((revision, kvs))
    }

    /// Follows `prefix` from `revision`, calling `apply` with each batch of events.
    /// Returns when the watch ends: `Ok` when etcd cancelled it (compaction), so the
    /// caller reads the prefix again.
    async fn watch(
        &self,
        prefix: &str,
        revision: i64,
        mut apply: impl FnMut(Vec<Event>),
    ) -> Result<(), RegistryError> {
        let body = json!({ "create_request": {
            "key": B64.encode(prefix),
            "range_end": B64.encode(prefix_end(prefix)),
            "start_revision": revision.to_string(),
        }});
        let response = self
            .http
            .send(Method::POST, "/v3/watch", Some(&body), CALL_TIMEOUT)
            .await?;
        let mut body = response.into_body();
        let mut buffer = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| RegistryError::Unreachable(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buffer.extend_from_slice(&data);
            while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let line = buffer.split_to(end + 1);
                let message: Value = match serde_json::from_slice(&line[..end]) {
                    Ok(v) => v,
                    Err(e) => {
                        return Err(RegistryError::Unreachable(format!(
                            "bad watch message: {e}"
                        )));
                    }
                };
                let result = &message["result"];
                if !message["error"].is_null() || result["canceled"].as_bool() == Some(true) {
                    return Ok(());
                }
                let events = result["events"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|e| {
                        let key = decode_str(&e["kv"]["key"])?;
                        Some(if e["type"].as_str() == Some("DELETE") {
                            Event::Delete { key }
                        } else {
                            Event::Put {
                                key,
                                value: decode(&e["kv"]["value"]).unwrap_or_default(),
                            }
                        })
                    })
                    .collect::<Vec<_>>();
                if !events.is_empty() {
                    apply(events);
                }
            }
            if buffer.remaining() > 16 << 20 {
                return Err(RegistryError::Unreachable(
                    "watch message over 16 MiB".into(),
                ));
            }
        }
        Err(RegistryError::Unreachable("watch stream ended".into()))
    }
}

fn int(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str()?.parse().ok())
}

fn decode(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::Null => Some(Vec::new()),
        v => B64.decode(v.as_str()?).ok(),
    }
}

fn decode_str(v: &Value) -> Option<String> {
    String::from_utf8(decode(v)?).ok()
}

fn bad_answer(call: &str, answer: &Value) -> RegistryError {
    RegistryError::Unreachable(format!("unexpected {call} answer: {answer}"))
}

/// The end of the key range that holds exactly the keys starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The value stored for an instance (Consul's field names, so tools read both alike).
fn instance_value(r: &Registration) -> Vec<u8> {
    json!({
        "ID": r.id, "Name": r.name, "Address": r.address, "Port": r.port,
        "Tags": r.tags, "Meta": r.meta,
    })
    .to_string()
    .into_bytes()
}

fn parse_instance(value: &[u8]) -> Option<Instance> {
    let v: Value = serde_json::from_slice(value).ok()?;
    let address = v["Address"].as_str().filter(|a| !a.is_empty())?;
    let port = v["Port"].as_u64()?;
    let base_url: Uri = format!("http://{address}:{port}/").parse().ok()?;
    Some(Instance {
        id: v["ID"].as_str()?.to_owned(),
        base_url,
    })
}

impl Source for EtcdClient {
    fn follow(self: Arc<Self>, service: String, sink: Sink) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let prefix = format!("{}{service}/", self.prefix);
            loop {
                let (revision, kvs) = match self.range(&prefix).await {
                    Ok(read) => read,
                    Err(e) => {
                        sink.failed(&e);
                        tokio::time::sleep(WATCH_RETRY).await;
                        continue;
                    }
                };
                let mut current: BTreeMap<String, Instance> = kvs
                    .into_iter()
                    .filter_map(|(k, v)| Some((k, parse_instance(&v)?)))
                    .collect();
                sink.update(current.values().cloned().collect());
                let watched = self
                    .watch(&prefix, revision + 1, |events| {
                        for event in events {
                            match event {
                                Event::Put { key, value } => match parse_instance(&value) {
                                    Some(instance) => current.insert(key, instance),
                                    None => current.remove(&key),
                                },
                                Event::Delete { key } => current.remove(&key),
                            };
                        }
                        sink.update(current.values().cloned().collect());
                    })
                    .await;
                if let Err(e) = watched {
                    sink.failed(&e);
                    tokio::time::sleep(WATCH_RETRY).await;
                }
            }
        })
    }
}

/// Keeps instances registered under leases, refreshed well within their TTL.
pub struct EtcdRegistrar {
    client: EtcdClient,
    ttl: Duration,
    leases: Mutex<HashMap<String, i64>>,
}

impl EtcdRegistrar {
    pub fn new(client: EtcdClient, ttl: Duration) -> Self {
        Self {
            client,
            ttl: ttl.max(Duration::from_secs(2)),
            leases: Mutex::default(),
        }
    }

    fn lease_of(&self, id: &str) -> Option<i64> {
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .copied()
    }
}

impl Registrar for EtcdRegistrar {
    fn register<'a>(&'a self, r: &'a Registration) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async move {
            if let Some(lease) = self.lease_of(&r.id)
                && self.client.keep_alive(lease).await?
            {
                return Ok(());
            }
            // First registration, or the lease ran out (etcd restarted, or this
            // process was stalled past its TTL): a new lease and the key again.
            let lease = self.client.grant(self.ttl).await?;
            self.client
                .put(
                    &self.client.key(&r.name, &r.id),
                    &instance_value(r),
                    Some(lease),
                )
                .await?;
            self.leases
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(r.id.clone(), lease);
            Ok(())
        })
    }

    fn deregister<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async move {
            let lease = self
                .leases
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
            match lease {
                Some(lease) => self.client.revoke(lease).await,
                None => Ok(()),
            }
        })
    }

    fn refresh_every(&self) -> Duration {
        self.ttl / 3
    }
}

/// Resolves from etcd, the static map as fallback.
pub type EtcdResolver = WatchingResolver<EtcdClient>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_covers_exactly_the_prefix() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }

    #[test]
    fn instance_values_round_trip() {
        let r = Registration::http("orders", "127.0.0.1", 8083);
        let i = parse_instance(&instance_value(&r)).unwrap();
        assert_eq!(i.id, "orders-127.0.0.1-8083");
        assert_eq!(i.base_url.to_string(), "http://127.0.0.1:8083/");
        assert!(parse_instance(b"{\"ID\":\"x\"}").is_none());
    }
}
