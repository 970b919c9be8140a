//! The service chassis: what every Bazaar service gets in one call, like eShop's
//! `AddServiceDefaults`.
//!
//! ```no_run
//! # async fn demo(config: chassis::ServiceConfig) -> std::io::Result<()> {
//! let chassis = chassis::Chassis::bind(config).await?;
//! let routes = axum::Router::new(); // the service's own routes
//! let router = chassis.router(routes, chassis::http::Readiness::default(),
//!     Some(utoipa::openapi::OpenApi::default()));
//! chassis.serve(router, chassis::shutdown::on_signal()).await
//! # }
//! ```
//!
//! Layered config ([`config`]), `/healthz` + `/readyz` + `/metrics` + `/openapi.json`
//! and the standard middleware ([`http`]), problem+json errors ([`problem`]),
//! problem-returning extractors ([`extract`]), the database ([`db`], SQLite run in
//! the calling thread by [`sqlite`]), the one HTTP client ([`client`]), JWTs
//! ([`jwt`]) and the forwarded identity ([`identity`]), graceful shutdown
//! ([`shutdown`]).
#![forbid(unsafe_code)]

pub mod client;
pub mod clock;
pub mod config;
pub mod db;
pub mod downstreams;
pub mod extract;
pub mod faults;
pub mod http;
pub mod identity;
pub mod jwt;
pub mod memo;
pub mod problem;
pub mod settings;
pub mod shutdown;
pub mod sqlite;
#[cfg(feature = "testing")]
pub mod testing;

use std::net::SocketAddr;
use std::sync::Arc;

pub use problem::{FieldError, Problem};
pub use secrecy;
pub use telemetry;
pub use tokio_util::sync::CancellationToken;

use client::HttpClient;
use discovery::Resolver;
use jwt::{JwksCache, JwtVerifier};
use settings::{HttpSettings, IdentitySettings, ResilienceSettings};
use telemetry::metrics::Metrics;

/// Where a service listens.
#[derive(Debug)]
pub enum Listen {
    /// Bind this address (port 0 picks a free port).
    Addr(SocketAddr),
    /// A socket already bound by a supervisor (`bazaar up` hands each service its
    /// socket, so ports are known before any process starts and survive restarts).
    Inherited(std::net::TcpListener),
}

/// What the chassis needs to run one service.
pub struct ServiceConfig {
    pub name: &'static str,
    pub version: &'static str,
    pub listen: Listen,
    pub http: HttpSettings,
    pub identity: IdentitySettings,
    pub resilience: ResilienceSettings,
    pub resolver: Arc<dyn Resolver>,
    /// Where this service announces itself (registry, etcd), if anywhere.
    pub registrar: Option<Arc<dyn discovery::Registrar>>,
    /// The broker events go through, if one is configured.
    pub events: Option<Arc<dyn messaging::EventBus>>,
}

/// A bound service with its standard parts. See the crate docs.
pub struct Chassis {
    pub name: &'static str,
    pub version: &'static str,
    pub metrics: Metrics,
    pub client: HttpClient,
    pub identity: Arc<JwtVerifier>,
    pub http: HttpSettings,
    /// The broker, if any (see [`ServiceConfig::events`]).
    pub events: Option<Arc<dyn messaging::EventBus>>,
    /// Injected faults (`POST /admin/faults`), applied to requests and events.
    pub faults: faults::Faults,
    registrar: Option<Arc<dyn discovery::Registrar>>,
    discovery_metrics: crate::http::DiscoveryMetrics,
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
}

impl Chassis {
    /// Binds the listener and builds the standard parts.
    pub async fn bind(config: ServiceConfig) -> std::io::Result<Self> {
        let listener = match config.listen {
            Listen::Addr(addr) => tokio::net::TcpListener::bind(addr).await?,
            Listen::Inherited(std) => {
                std.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(std)?
            }
        };
        let local_addr = listener.local_addr()?;
        let metrics = Metrics::new(config.name);
        let breaker_metrics = resilience::circuit_breaker::BreakerMetrics::default();
        breaker_metrics.register(&metrics);
        let downstreams = downstreams::Downstreams::new(config.resilience, breaker_metrics)
            .map_err(|errors| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, errors.join("; "))
            })?;
        let client = HttpClient::new(
            config.resolver.clone(),
            Arc::new(downstreams),
            config.http.client_timeout.0,
            config.http.client_connect_timeout.0,
        );
        let id = &config.identity;
        let identity = Arc::new(JwtVerifier::with_jwks(
            JwksCache::new(client.clone(), &id.issuer_service, &id.jwks_path),
            &id.issuer,
            &id.audience,
            id.leeway.0,
        ));
        let discovery_metrics = crate::http::DiscoveryMetrics::new(&metrics);
        Ok(Self {
            name: config.name,
            version: config.version,
            metrics,
            client,
            identity,
            http: config.http,
            registrar: config.registrar,
            events: config.events,
            faults: faults::Faults::default(),
            discovery_metrics,
            listener,
            local_addr,
        })
    }

    /// The bound address (the real port when configured with 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}
