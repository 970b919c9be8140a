//! The Kubernetes-style DNS backend: a service's instances are the SRV records of
//! `_<port-name>._tcp.<service>.<domain>` (a headless Service publishes one per ready
//! pod), with the A/AAAA records of `<service>.<domain>` and a fixed port as the
//! fallback for services without named ports. Answers are re-read when their TTL
//! runs out (within bounds), so scaling shows up without a watch API.
//!
//! Registration is the platform's job here (Kubernetes endpoints), so this backend
//! has no [`Registrar`](crate::Registrar).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::{ResolveError as DnsError, TokioResolver};
use http::Uri;

use crate::watch::{Sink, Source, WatchingResolver};
use crate::{BoxFuture, Instance, StaticResolver};

/// DNS discovery settings.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// The DNS server (`ip:port`); `None` reads the system's resolv.conf.
    pub server: Option<SocketAddr>,
    /// What follows the service name, e.g. `default.svc.cluster.local`.
    pub domain: String,
    /// The SRV port name (`_http._tcp.…`).
    pub port_name: String,
    /// Port used with plain A/AAAA answers.
    pub port: u16,
    /// Bounds on how often answers are re-read, whatever their TTL.
    pub min_refresh: Duration,
    pub max_refresh: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            server: None,
            domain: "default.svc.cluster.local".to_owned(),
            port_name: "http".to_owned(),
            port: 80,
            min_refresh: Duration::from_secs(1),
            max_refresh: Duration::from_secs(30),
        }
    }
}

/// Follows services through DNS.
pub struct DnsSource {
    resolver: TokioResolver,
    config: DnsConfig,
}

impl DnsSource {
    pub fn new(config: DnsConfig) -> Result<Self, DnsError> {
        let builder = match config.server {
            Some(server) => TokioResolver::builder_with_config(
                ResolverConfig::from_parts(
                    None,
                    vec![],
                    NameServerConfigGroup::from_ips_clear(&[server.ip()], server.port(), true),
                ),
                TokioConnectionProvider::default(),
            ),
            None => TokioResolver::builder_tokio()?,
        };
        let mut options = ResolverOpts::default();
        // Names are always fully qualified here; never try search domains.
        options.ndots = 0;
        options.timeout = Duration::from_secs(2);
        options.attempts = 2;
        // The cache must not hide a change for longer than we would refresh anyway.
        options.positive_max_ttl = Some(config.max_refresh);
        options.negative_max_ttl = Some(config.min_refresh);
        Ok(Self {
            resolver: builder.with_options(options).build(),
            config,
        })
    }

    /// The instances of `service` now, and how long that answer is valid.
    pub async fn lookup(&self, service: &str) -> Result<(Vec<Instance>, Instant), DnsError> {
        let domain = self.config.domain.trim_matches('.');
        let srv_name = format!("_{}._tcp.{service}.{domain}.", self.config.port_name);
        match self.resolver.srv_lookup(srv_name).await {
            Ok(srv) => {
                let mut instances = Vec::new();
                for record in srv.iter() {
                    // Servers usually send the targets' addresses along; ask only
                    // for the ones they did not.
                    let target = record.target();
                    let ip = match srv
                        .as_lookup()
                        .records()
                        .iter()
                        .filter(|r| r.name() == target)
                        .find_map(|r| r.data().ip_addr())
                    {
                        Some(ip) => ip,
                        None => {
                            match self.resolver.lookup_ip(target.clone()).await?.iter().next() {
                                Some(ip) => ip,
                                None => continue,
                            }
                        }
                    };
                    instances.extend(instance(service, ip, record.port()));
                }
                Ok((instances, srv.as_lookup().valid_until()))
            }
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => {
                let a_name = format!("{service}.{domain}.");
                match self.resolver.lookup_ip(a_name).await {
                    Ok(ips) => Ok((
                        ips.iter()
                            .filter_map(|ip| instance(service, ip, self.config.port))
                            .collect(),
                        ips.valid_until(),
                    )),
                    Err(e) if e.is_no_records_found() || e.is_nx_domain() => {
                        Ok((Vec::new(), Instant::now() + self.config.min_refresh))
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }
}

fn instance(service: &str, ip: IpAddr, port: u16) -> Option<Instance> {
    let authority = SocketAddr::new(ip, port);
    Some(Instance {
        id: format!("{service}-{}-{port}", ip),
        base_url: format!("http://{authority}/").parse::<Uri>().ok()?,
    })
}

impl Source for DnsSource {
    fn follow(self: Arc<Self>, service: String, sink: Sink) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            loop {
                let pause = match self.lookup(&service).await {
                    Ok((instances, valid_until)) => {
                        sink.update(instances);
                        valid_until.saturating_duration_since(Instant::now())
                    }
                    Err(e) => {
                        sink.failed(&e);
                        self.config.min_refresh
                    }
                };
                tokio::time::sleep(pause.clamp(self.config.min_refresh, self.config.max_refresh))
                    .await;
            }
        })
    }
}

/// Resolves through DNS, the static map as fallback.
pub type DnsResolver = WatchingResolver<DnsSource>;

/// A DNS resolver with no fallback.
pub fn resolver(config: DnsConfig) -> Result<DnsResolver, DnsError> {
    Ok(WatchingResolver::new(
        DnsSource::new(config)?,
        StaticResolver::default(),
    ))
}
