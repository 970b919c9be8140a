//! The one seam through which Bazaar processes find each other: [`Resolver::resolve`]
//! turns a service name into its instances.
//!
//! Resolution is synchronous on purpose: a resolver answers from a local snapshot that
//! a backend keeps fresh in the background (registry watch, DNS refresh), so a lookup
//! on the request path never waits on the network. [`StaticResolver`] is the backend
//! fed by `bazaar up` (and by config for a fixed topology).
//!
//! ```
//! use discovery::{Resolver, StaticResolver};
//! let r = StaticResolver::parse([("products", "http://127.0.0.1:8081")]).unwrap();
//! assert_eq!(r.resolve("products").unwrap()[0].base_url.to_string(), "http://127.0.0.1:8081/");
//! ```
//!
//! Backends (each a [`Resolver`], and where instances announce themselves, a
//! [`Registrar`]): [`StaticResolver`]; [`consul`] (the embedded [`registry`] or a real
//! Consul agent); [`etcd`] (v3, leases and prefix watches); [`dns`] (Kubernetes-style
//! SRV and A records). A watching backend keeps serving the last known instances when
//! its source is unreachable and reports them as [stale](Resolver::stale).
#![forbid(unsafe_code)]

pub mod consul;
pub mod dns;
pub mod etcd;
mod json_http;
pub mod registry;
#[cfg(feature = "testing")]
pub mod testing;
mod watch;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use watch::{Sink, Source, WatchingResolver};

/// A boxed future, so backends stay usable as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

use http::Uri;

/// One reachable instance of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// Unique per instance (name + authority for static entries).
    pub id: String,
    /// Scheme and authority, e.g. `http://127.0.0.1:8081`.
    pub base_url: Uri,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResolveError {
    #[error("no service named `{0}` is known to discovery")]
    Unknown(String),
    #[error("service `{0}` has no healthy instance")]
    NoInstances(String),
    #[error("invalid URL `{url}` for service `{service}`: {reason}")]
    InvalidUrl {
        service: String,
        url: String,
        reason: String,
    },
}

/// Resolves service names to instances.
pub trait Resolver: Send + Sync + 'static {
    /// The instances of `service`, never empty on success.
    fn resolve(&self, service: &str) -> Result<Arc<[Instance]>, ResolveError>;

    /// Every service name this resolver knows (for status pages and readiness).
    fn services(&self) -> Vec<String>;

    /// Whether the instances served for `service` are a last known set kept through
    /// an outage of the backend, not a current answer.
    fn stale(&self, _service: &str) -> bool {
        false
    }
}

/// One instance announcing itself, whatever the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub name: String,
    /// Unique per instance: name + host + port.
    pub id: String,
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    /// What the registry polls, for backends that run health checks.
    pub health_url: Option<String>,
    pub check_interval: Duration,
    /// How long a critical (or silent) instance stays listed.
    pub deregister_after: Duration,
}

impl Registration {
    /// An HTTP service at `address:port` whose health is `GET /healthz`.
    pub fn http(name: &str, address: &str, port: u16) -> Self {
        Self {
            name: name.to_owned(),
            id: format!("{name}-{address}-{port}"),
            address: address.to_owned(),
            port,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            health_url: Some(format!("http://{address}:{port}/healthz")),
            check_interval: Duration::from_secs(1),
            deregister_after: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    #[error("registry unreachable: {0}")]
    Unreachable(String),
    #[error("registry answered {status}: {body}")]
    Refused { status: u16, body: String },
}

/// Announces instances to a backend.
///
/// `register` means "make sure this instance is listed and fresh": the chassis calls
/// it on start and then every [`refresh_every`](Registrar::refresh_every), so a
/// backend that lost its state (a restarted registry, an expired lease) is refilled.
pub trait Registrar: Send + Sync + 'static {
    fn register<'a>(
        &'a self,
        registration: &'a Registration,
    ) -> BoxFuture<'a, Result<(), RegistryError>>;
    fn deregister<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RegistryError>>;
    fn refresh_every(&self) -> Duration;
}

/// A fixed map from name to instances.
#[derive(Clone, Debug, Default)]
pub struct StaticResolver {
    /// Looked up on every proxied request: a fast hash (names come from config).
    services: HashMap<String, Arc<[Instance]>, foldhash::fast::RandomState>,
}

impl StaticResolver {
    /// Builds from `(name, urls)` pairs, where `urls` is one URL or several separated
    /// by commas (`http://127.0.0.1:8081,http://127.0.0.1:8082`).
    pub fn parse<'a>(
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, ResolveError> {
        let mut services = HashMap::default();
        for (name, urls) in entries {
            let mut instances = Vec::new();
            for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
                instances.push(parse_instance(name, url)?);
            }
            services.insert(name.to_owned(), Arc::from(instances));
        }
        Ok(Self { services })
    }
}

fn parse_instance(service: &str, url: &str) -> Result<Instance, ResolveError> {
    let invalid = |reason: &str| ResolveError::InvalidUrl {
        service: service.to_owned(),
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: Uri = url.parse().map_err(|_| invalid("not a URL"))?;
    let scheme = uri.scheme_str().ok_or_else(|| invalid("missing scheme"))?;
    if scheme != "http" && scheme != "https" {
        return Err(invalid("scheme must be http or https"));
    }
    let authority = uri.authority().ok_or_else(|| invalid("missing host"))?;
    let base_url = Uri::builder()
        .scheme(scheme)
        .authority(authority.as_str())
        .path_and_query("/")
        .build()
        .map_err(|e| invalid(&e.to_string()))?;
    Ok(Instance {
        id: format!("{service}-{authority}"),
        base_url,
    })
}

impl Resolver for StaticResolver {
    fn resolve(&self, service: &str) -> Result<Arc<[Instance]>, ResolveError> {
        let instances = self
            .services
            .get(service)
            .ok_or_else(|| ResolveError::Unknown(service.to_owned()))?;
        if instances.is_empty() {
            return Err(ResolveError::NoInstances(service.to_owned()));
        }
        Ok(instances.clone())
    }

    fn services(&self) -> Vec<String> {
        let mut names: Vec<String> = self.services.keys().cloned().collect();
        names.sort();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_several_instances_and_rejects_bad_urls() {
        let r = StaticResolver::parse([("orders", "http://a:1, http://b:2")]).unwrap();
        let got = r.resolve("orders").unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].id, "orders-b:2");
        assert_eq!(
            r.resolve("nope").unwrap_err(),
            ResolveError::Unknown("nope".into())
        );
        assert!(StaticResolver::parse([("x", "ftp://a:1")]).is_err());
        assert!(StaticResolver::parse([("x", "not a url")]).is_err());
        let empty = StaticResolver::parse([("x", "")]).unwrap();
        assert_eq!(
            empty.resolve("x").unwrap_err(),
            ResolveError::NoInstances("x".into())
        );
    }
}
