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
#![forbid(unsafe_code)]

pub mod consul;
pub mod registry;

use std::collections::HashMap;
use std::sync::Arc;

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
}

/// A fixed map from name to instances.
#[derive(Clone, Debug, Default)]
pub struct StaticResolver {
    services: HashMap<String, Arc<[Instance]>>,
}

impl StaticResolver {
    /// Builds from `(name, urls)` pairs, where `urls` is one URL or several separated
    /// by commas (`http://127.0.0.1:8081,http://127.0.0.1:8082`).
    pub fn parse<'a>(
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, ResolveError> {
        let mut services = HashMap::new();
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
