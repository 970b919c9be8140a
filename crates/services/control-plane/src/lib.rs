//! `control-plane`: in local mode, the one place that sees the whole shop. It serves
//! `GET /v1/services` (every service discovery knows, each instance probed on
//! `/readyz` in parallel) and hosts the embedded registry with its Consul-compatible
//! API (`/v1/agent/...`, `/v1/health/...`, `/v1/catalog/...`) and health checker. The
//! broker log and telemetry buffer join it in their own issues.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use chassis::client::HttpClient;
use chassis::config::{ByteSize, HumanDuration};
use chassis::config_section;
use chassis::extract::Json;
use chassis::http::{Readiness, Service};
use chassis::{Chassis, ServiceConfig};
use futures::future::join_all;
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;

pub const NAME: &str = "control-plane";
/// How long one instance's readiness probe may take before it counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

config_section! {
    /// `[control_plane]`
    pub struct Settings {
        /// Listening port: Consul's, so Consul clients find the embedded registry
        /// where they look by default; 0 picks a free one.
        pub port: u16 = 8500,
        /// Partitions of each topic of the embedded broker: the most members of one
        /// consumer group working at once.
        pub log_partitions: u32 = 8,
        /// A topic's log starts a new segment file past this size.
        pub log_segment_bytes: ByteSize = ByteSize::mib(64),
        /// Oldest segments are removed past this size per topic...
        pub log_retention_bytes: ByteSize = ByteSize::mib(1024),
        /// ...or once their newest record is this old.
        pub log_retention_age: HumanDuration = HumanDuration::secs(7 * 24 * 3600),
        /// How long an acknowledged event may wait to be synced to disk: it
        /// survives any process's crash at once, a power loss once synced. `0s`
        /// syncs every append before acknowledging it (slower: a disk flush per
        /// write).
        pub log_sync_interval: HumanDuration = HumanDuration::millis(200),
    }
}

pub struct Config {
    pub service: ServiceConfig,
    pub settings: Settings,
    /// Where the embedded broker keeps its topics.
    pub log_dir: std::path::PathBuf,
}

/// One instance's state.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceStatus {
    pub id: String,
    pub url: String,
    /// `ready`, `not_ready` (it answered 503) or `unreachable`.
    pub health: String,
    pub probe_ms: f64,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ServiceStatus {
    pub name: String,
    pub instances: Vec<InstanceStatus>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Services {
    pub services: Vec<ServiceStatus>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Bazaar control plane", description = "The shop's status."),
    paths(services),
    components(schemas(Services, ServiceStatus, InstanceStatus))
)]
struct ApiDoc;

/// Every service discovery knows and the readiness of each instance.
#[utoipa::path(get, path = "/v1/services", responses((status = 200, body = Services)))]
async fn services(State(client): State<Arc<HttpClient>>) -> Json<Services> {
    let names: Vec<String> = client
        .resolver()
        .services()
        .into_iter()
        .filter(|n| n != NAME)
        .collect();
    let statuses = join_all(names.into_iter().map(|name| {
        let client = client.clone();
        async move {
            let instances = client
                .resolver()
                .resolve(&name)
                .map(|i| i.to_vec())
                .unwrap_or_default();
            let probes = join_all(instances.into_iter().map(|instance| {
                let client = client.clone();
                async move { probe(&client, instance).await }
            }))
            .await;
            ServiceStatus {
                name,
                instances: probes,
            }
        }
    }))
    .await;
    Json(Services { services: statuses })
}

async fn probe(client: &HttpClient, instance: chassis::client::Instance) -> InstanceStatus {
    let started = Instant::now();
    let url = instance
        .base_url
        .to_string()
        .trim_end_matches('/')
        .to_owned();
    let health = match client.probe(&instance, "/readyz", PROBE_TIMEOUT).await {
        Ok(status) if status.is_success() => "ready",
        Ok(_) => "not_ready",
        Err(_) => "unreachable",
    };
    InstanceStatus {
        id: instance.id,
        url,
        health: health.to_owned(),
        probe_ms: started.elapsed().as_secs_f64() * 1000.0,
    }
}

/// Builds the service; the chassis's [`Service`] runs it.
pub struct Application;

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Service> {
        let chassis = Chassis::bind(config.service)
            .await
            .context("binding the listener")?;
        let s = &config.settings;
        let mut log = messaging::embedded::store::LogConfig::new(&config.log_dir);
        log.partitions = s.log_partitions.max(1);
        log.segment_bytes = s.log_segment_bytes.0;
        log.retention_bytes = s.log_retention_bytes.0;
        log.retention_age = s.log_retention_age.0;
        log.sync_interval = s.log_sync_interval.0;
        let broker = messaging::embedded::Broker::open(log)
            .with_context(|| format!("opening the event log in {}", config.log_dir.display()))?;
        let registry = Arc::new(discovery::registry::Registry::new());
        discovery::registry::checks::spawn(registry.clone());
        let routes = Router::new()
            .route("/v1/services", get(services))
            .with_state(Arc::new(chassis.client.clone()))
            .merge(discovery::registry::router(registry))
            .merge(messaging::embedded::server::router(broker.clone()));
        let router = chassis.router(routes, Readiness::default(), Some(ApiDoc::openapi()));
        // Group positions moved in the last instant are written before exit.
        Ok(
            Service::new(chassis, router, None).with_background(move |stop| async move {
                stop.cancelled().await;
                if let Err(e) = broker.flush() {
                    tracing::error!(error = %e, "could not save consumer group positions");
                }
            }),
        )
    }
}
