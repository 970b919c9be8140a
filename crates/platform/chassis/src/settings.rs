//! The configuration sections the chassis itself reads. Every default is named here
//! with the reason for its value.

use std::collections::BTreeMap;

use telemetry::logging::LogFormat;

use crate::config::{ByteSize, HumanDuration};
use crate::config_section;

config_section! {
    /// `[http]`: listeners, limits and timeouts shared by every service.
    pub struct HttpSettings {
        /// Loopback by default: a laptop shop should not be reachable from the network
        /// unless asked.
        pub host: String = "127.0.0.1".to_owned(),
        /// Longest a request may take end to end before a 503; generous because the
        /// slowest legitimate call (a login, argon2id) takes well under a second.
        pub request_timeout: HumanDuration = HumanDuration::secs(30),
        /// 1 MiB: far above any shop request, small enough that a flood of bodies
        /// cannot exhaust memory.
        pub body_limit: ByteSize = ByteSize::mib(1),
        /// Time in-flight requests get to finish after SIGTERM before connections drop;
        /// under the 30 s most orchestrators wait before SIGKILL.
        pub shutdown_grace: HumanDuration = HumanDuration::secs(10),
        /// Deadline of an outgoing call (headers), so one slow dependency cannot hold a
        /// request for the whole request timeout.
        pub client_timeout: HumanDuration = HumanDuration::secs(5),
        /// Connect timeout of outgoing calls: on loopback or a LAN a connect takes
        /// microseconds, so one second means the peer is gone.
        pub client_connect_timeout: HumanDuration = HumanDuration::secs(1),
        /// One JSON line per request (`request completed`, at INFO).
        pub access_log: bool = true,
        /// Share of requests logged (0.0 to 1.0), taken evenly (every n-th)...
        pub access_log_sample: f64 = 1.0,
        /// ...except responses with this status or above, always logged.
        pub access_log_always_from: u16 = 400,
        /// Serve `POST /admin/crash` (loopback only): the process kills itself with
        /// SIGKILL, as `bazaar chaos` does from outside. Only where a supervisor
        /// restarts it (`bazaar up` turns it on for the processes it starts).
        pub allow_crash: bool = false,
    }
}

config_section! {
    /// `[log]`
    pub struct LogSettings {
        /// An `EnvFilter` directive; `RUST_LOG` wins when set.
        pub level: String = "info,sqlx=warn,hyper=warn".to_owned(),
        /// `json` (default) or `pretty`.
        pub format: LogFormat = LogFormat::Json,
        /// Write JSON lines in blocks instead of one write per line (nginx's
        /// `access_log buffer=`, Envoy's flush interval): a thread's lines go out when
        /// it runs out of work, when 32 KiB are pending, or 200 ms after they were
        /// logged, whichever is first. Warnings and errors are written at once. At a
        /// gateway's tens of thousands of access lines a second this saves a system
        /// call per request; lines not yet written are lost if the process is killed.
        pub buffer: bool = true,
    }
}

config_section! {
    /// `[identity]`: how services verify the identity the gateway forwards.
    pub struct IdentitySettings {
        /// Service whose JWKS signs forwarded identities.
        pub issuer_service: String = "gateway".to_owned(),
        /// Path of that JWKS on the issuer.
        pub jwks_path: String = "/.well-known/bazaar-identity-jwks.json".to_owned(),
        /// `iss` of forwarded identity tokens.
        pub issuer: String = "bazaar-gateway".to_owned(),
        /// `aud` of forwarded identity tokens: only services accept them.
        pub audience: String = "bazaar-services".to_owned(),
        /// Lifetime of a forwarded identity: long enough for one request's fan-out,
        /// short enough that a leaked one is soon worthless.
        pub token_ttl: HumanDuration = HumanDuration::secs(60),
        /// Clock skew tolerated between gateway and services.
        pub leeway: HumanDuration = HumanDuration::secs(5),
    }
}

config_section! {
    /// `[discovery]`: how a service finds the others and announces itself.
    pub struct DiscoverySettings {
        /// `auto` (the registry when `registry_url` is set, else static), `static`,
        /// `consul`, `etcd` or `dns`.
        pub backend: DiscoveryBackend = DiscoveryBackend::Auto,
        /// Service name -> URL(s), comma separated: the static backend, and the
        /// fallback of the others for names they do not know. `bazaar up` fills this
        /// in for the processes it starts (`BAZAAR_DISCOVERY__SERVICES__<NAME>`); `_`
        /// in a name stands for `-`.
        pub services: BTreeMap<String, String> = BTreeMap::new(),
        /// A Consul-compatible registry (the control plane's, or a Consul agent): each
        /// service registers there with an HTTP health check and resolves peers from it.
        pub registry_url: Option<String> = None,
        /// etcd v3 client URL, e.g. `http://127.0.0.1:2379`.
        pub etcd_url: Option<String> = None,
        /// Key prefix instances live under in etcd.
        pub etcd_prefix: String = discovery::etcd::DEFAULT_PREFIX.to_owned(),
        /// Lease of an etcd registration: how long a crashed instance stays listed.
        /// Refreshed every third of it.
        pub etcd_ttl: HumanDuration = HumanDuration(discovery::etcd::DEFAULT_TTL),
        /// DNS server as `ip:port`; unset reads the system's resolv.conf.
        pub dns_server: Option<String> = None,
        /// What follows a service name in DNS (Kubernetes: `<namespace>.svc.<zone>`).
        pub dns_domain: String = "default.svc.cluster.local".to_owned(),
        /// SRV port name: `_<name>._tcp.<service>.<domain>`.
        pub dns_port_name: String = "http".to_owned(),
        /// Port for services found by A/AAAA records only.
        pub dns_port: u16 = 80,
    }
}

/// The discovery backend (see [`DiscoverySettings::backend`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryBackend {
    Auto,
    Static,
    Consul,
    Etcd,
    Dns,
}

/// A resolver, and where this process announces itself (none for static and DNS).
#[derive(Clone)]
pub struct Discovery {
    pub resolver: std::sync::Arc<dyn discovery::Resolver>,
    pub registrar: Option<std::sync::Arc<dyn discovery::Registrar>>,
}

impl DiscoverySettings {
    /// The backend these settings describe.
    pub fn build(&self) -> Result<Discovery, crate::config::ConfigError> {
        use std::sync::Arc;
        let error = |key: &str, problem: String, fix: &str| crate::config::ConfigError {
            key: format!("discovery.{key}"),
            origin: "config".into(),
            problem,
            fix: fix.into(),
        };
        let fallback = self.resolver().map_err(|e| {
            error(
                "services",
                e.to_string(),
                "give each service a URL like http://127.0.0.1:8081",
            )
        })?;
        let backend = match (self.backend, &self.registry_url) {
            (DiscoveryBackend::Auto, Some(_)) => DiscoveryBackend::Consul,
            (DiscoveryBackend::Auto, None) => DiscoveryBackend::Static,
            (backend, _) => backend,
        };
        Ok(match backend {
            DiscoveryBackend::Consul => {
                let url = self.registry_url.as_deref().ok_or_else(|| {
                    error(
                        "registry_url",
                        "backend `consul` needs the registry's URL".into(),
                        "set discovery.registry_url, e.g. http://127.0.0.1:8500",
                    )
                })?;
                let client = discovery::consul::ConsulClient::new(url);
                Discovery {
                    resolver: Arc::new(discovery::consul::RegistryResolver::new(
                        client.clone(),
                        fallback,
                    )),
                    registrar: Some(Arc::new(client)),
                }
            }
            DiscoveryBackend::Etcd => {
                let url = self.etcd_url.as_deref().ok_or_else(|| {
                    error(
                        "etcd_url",
                        "backend `etcd` needs an etcd endpoint".into(),
                        "set discovery.etcd_url, e.g. http://127.0.0.1:2379",
                    )
                })?;
                let client = discovery::etcd::EtcdClient::new(url, &self.etcd_prefix);
                Discovery {
                    resolver: Arc::new(discovery::etcd::EtcdResolver::new(
                        client.clone(),
                        fallback,
                    )),
                    registrar: Some(Arc::new(discovery::etcd::EtcdRegistrar::new(
                        client,
                        self.etcd_ttl.0,
                    ))),
                }
            }
            DiscoveryBackend::Dns => {
                let server = match &self.dns_server {
                    None => None,
                    Some(raw) => Some(raw.parse().map_err(|_| {
                        error(
                            "dns_server",
                            format!("`{raw}` is not an ip:port address"),
                            "write it like 10.96.0.10:53, or leave it unset for resolv.conf",
                        )
                    })?),
                };
                let source = discovery::dns::DnsSource::new(discovery::dns::DnsConfig {
                    server,
                    domain: self.dns_domain.clone(),
                    port_name: self.dns_port_name.clone(),
                    port: self.dns_port,
                    ..Default::default()
                })
                .map_err(|e| {
                    error(
                        "dns_server",
                        format!("cannot set up DNS resolution: {e}"),
                        "set discovery.dns_server to a reachable DNS server",
                    )
                })?;
                Discovery {
                    resolver: Arc::new(discovery::dns::DnsResolver::new(source, fallback)),
                    registrar: None,
                }
            }
            DiscoveryBackend::Static | DiscoveryBackend::Auto => Discovery {
                resolver: Arc::new(fallback),
                registrar: None,
            },
        })
    }

    /// The static resolver these settings describe.
    pub fn resolver(&self) -> Result<discovery::StaticResolver, discovery::ResolveError> {
        let names: Vec<(String, &str)> = self
            .services
            .iter()
            .map(|(k, v)| (k.replace('_', "-"), v.as_str()))
            .collect();
        discovery::StaticResolver::parse(names.iter().map(|(k, v)| (k.as_str(), *v)))
    }
}

config_section! {
    /// `[events]`: the broker events travel through.
    pub struct EventsSettings {
        /// `embedded` (the control plane's log), `nats` (JetStream), `kafka` (any
        /// Kafka-protocol broker) or `rabbitmq` (streams and quorum queues).
        pub backend: EventsBackend = EventsBackend::Embedded,
        /// The embedded broker's URL (the control plane); `bazaar up` sets it.
        pub url: Option<String> = None,
        /// NATS server for backend `nats`.
        pub nats_url: String = "nats://127.0.0.1:4222".to_owned(),
        /// Bootstrap servers for backend `kafka`, `host:port[,host:port...]`.
        pub kafka_brokers: String = "127.0.0.1:9092".to_owned(),
        /// AMQP URL for backend `rabbitmq` (`%2f` is the default vhost `/`).
        pub rabbitmq_url: secrecy::SecretString =
            secrecy::SecretString::from("amqp://guest:guest@127.0.0.1:5672/%2f"),
        /// First part of every stream, subject, topic, queue and group name on NATS,
        /// Kafka or RabbitMQ: shops sharing a broker keep apart by it.
        pub prefix: String = "bazaar".to_owned(),
        /// Partitions of the topics Bazaar creates on NATS, Kafka or RabbitMQ: the
        /// most members of a group working at once (the embedded broker's are
        /// `control_plane.log_partitions`).
        pub partitions: u32 = 8,
    }
}

/// The events backend (see [`EventsSettings::backend`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventsBackend {
    Embedded,
    Nats,
    Kafka,
    Rabbitmq,
}

impl EventsSettings {
    /// Connects to the configured broker; `None` when the embedded broker's URL is
    /// not known (a service run alone): its events then wait in its outbox.
    pub async fn connect(
        &self,
    ) -> Result<Option<std::sync::Arc<dyn messaging::EventBus>>, messaging::BusError> {
        Ok(match self.backend {
            EventsBackend::Embedded => self.url.as_deref().map(|url| {
                std::sync::Arc::new(messaging::embedded::client::EmbeddedBus::new(url))
                    as std::sync::Arc<dyn messaging::EventBus>
            }),
            EventsBackend::Nats => {
                let bus = messaging::nats::NatsBus::connect(messaging::nats::NatsConfig {
                    url: self.nats_url.clone(),
                    prefix: self.prefix.clone(),
                    partitions: self.partitions.max(1),
                    ..Default::default()
                })
                .await?;
                Some(std::sync::Arc::new(bus))
            }
            EventsBackend::Kafka => {
                let bus = messaging::kafka::KafkaBus::connect(messaging::kafka::KafkaConfig {
                    brokers: self.kafka_brokers.clone(),
                    prefix: self.prefix.clone(),
                    partitions: self.partitions.max(1),
                    ..Default::default()
                })?;
                Some(std::sync::Arc::new(bus))
            }
            EventsBackend::Rabbitmq => {
                use secrecy::ExposeSecret;
                let bus =
                    messaging::rabbitmq::RabbitBus::connect(messaging::rabbitmq::RabbitConfig {
                        url: self.rabbitmq_url.expose_secret().to_owned(),
                        prefix: self.prefix.clone(),
                        partitions: self.partitions.max(1),
                        ..Default::default()
                    })
                    .await?;
                Some(std::sync::Arc::new(bus))
            }
        })
    }
}

config_section! {
    /// `[saga]`: how the place-order saga runs (every service of a shop must agree).
    pub struct SagaSettings {
        /// `orchestration` (a durable orchestrator in `orders` sends commands and
        /// awaits replies) or `choreography` (each service reacts to the previous
        /// one's event and emits the next).
        pub mode: SagaMode = SagaMode::Orchestration,
    }
}

/// The saga style (see [`SagaSettings::mode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SagaMode {
    Orchestration,
    Choreography,
}

impl SagaMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SagaMode::Orchestration => "orchestration",
            SagaMode::Choreography => "choreography",
        }
    }
}

config_section! {
    /// `[breaker]`: the circuit breaker in front of each downstream service, on every
    /// outgoing call of the chassis client (services and the gateway alike).
    pub struct BreakerSettings {
        /// Off turns every breaker to DISABLED (calls pass, nothing is recorded).
        pub enabled: bool = true,
        /// `count`: rates over the last `window_size` calls; `time`: over the calls
        /// of the last `window_size` seconds.
        pub window_type: WindowType = WindowType::Count,
        /// Calls (count window) or seconds (time window) rates are judged over.
        pub window_size: u32 = 100,
        /// Statuses counted as failures; empty means every 5xx. Errors and
        /// timeouts always count.
        pub failure_statuses: Vec<u16> = Vec::new(),
        /// Statuses that count for nothing (neither success nor failure).
        pub ignored_statuses: Vec<u16> = Vec::new(),
        /// Percent of failures (errors, timeouts, 5xx) that opens the breaker.
        pub failure_rate_threshold: f64 = 50.0,
        /// Percent of slow calls that opens it; 100 means only all-slow windows do.
        pub slow_call_rate_threshold: f64 = 100.0,
        /// A call this slow counts as slow: the client deadline's order of magnitude.
        pub slow_call_duration: HumanDuration = HumanDuration::secs(5),
        /// Calls in the window before rates mean anything.
        pub minimum_calls: u32 = 20,
        /// Trial calls in half-open; all must mostly succeed to close again.
        pub permitted_in_half_open: u32 = 5,
        /// First wait before trial calls; long enough for a restart to finish.
        pub wait_in_open: HumanDuration = HumanDuration::secs(5),
        /// Each consecutive opening multiplies the wait, so a dead dependency is
        /// probed less and less often.
        pub wait_multiplier: f64 = 2.0,
        pub max_wait_in_open: HumanDuration = HumanDuration::secs(60),
    }
}

/// The kind of sliding window a breaker judges rates over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowType {
    Count,
    Time,
}

impl BreakerSettings {
    /// How the breaker classifies an answer with `status`.
    pub fn classify(&self, status: http::StatusCode) -> resilience::circuit_breaker::Outcome {
        use resilience::circuit_breaker::Outcome;
        let code = status.as_u16();
        if self.ignored_statuses.contains(&code) {
            Outcome::Ignored
        } else if (self.failure_statuses.is_empty() && status.is_server_error())
            || self.failure_statuses.contains(&code)
        {
            Outcome::Failure
        } else {
            Outcome::Success
        }
    }

    /// The breaker configuration these settings describe.
    pub fn config(&self) -> resilience::circuit_breaker::Config {
        resilience::circuit_breaker::Config {
            window: match self.window_type {
                WindowType::Count => resilience::circuit_breaker::Window::Count(self.window_size),
                WindowType::Time => resilience::circuit_breaker::Window::Time(
                    std::time::Duration::from_secs(u64::from(self.window_size)),
                ),
            },
            failure_rate_threshold: self.failure_rate_threshold,
            slow_call_rate_threshold: self.slow_call_rate_threshold,
            slow_call_duration: self.slow_call_duration.0,
            minimum_calls: self.minimum_calls,
            permitted_in_half_open: self.permitted_in_half_open,
            wait_in_open: self.wait_in_open.0,
            wait_multiplier: self.wait_multiplier,
            max_wait_in_open: self.max_wait_in_open.0,
        }
    }

    /// Every invalid setting, as configuration errors.
    pub fn validate(&self) -> Vec<crate::config::ConfigError> {
        self.config()
            .validate()
            .into_iter()
            .map(|e| crate::config::ConfigError {
                key: format!(
                    "breaker.{}",
                    if e.field == "window" {
                        "window_size"
                    } else {
                        e.field
                    }
                ),
                origin: "configuration".into(),
                problem: e.problem.into(),
                fix: "see docs/configuration.md for the allowed range".into(),
            })
            .collect()
    }
}

config_section! {
    /// `[retry]`: retries of idempotent calls between services (reads through the
    /// chassis client), within the request's deadline and a budget.
    pub struct RetrySettings {
        /// Attempts in all, the first included.
        pub max_attempts: u32 = 3,
        /// Backoff base: the ceiling doubles per attempt; the delay is random below it.
        pub base_delay: HumanDuration = HumanDuration::millis(25),
        pub max_delay: HumanDuration = HumanDuration::secs(1),
        /// Retries allowed per request, over 10 s: 0.2 caps the extra load at 20%,
        /// so retries never multiply an outage.
        pub budget_ratio: f32 = 0.2,
    }
}

config_section! {
    /// `[bulkhead]`: concurrent calls allowed to each downstream service.
    pub struct BulkheadSettings {
        /// Calls in flight to one service; beyond it, calls wait up to `max_wait`.
        pub max_concurrent: usize = 256,
        /// A call that cannot start this soon fails fast (503) instead of queueing.
        pub max_wait: HumanDuration = HumanDuration::millis(20),
    }
}

/// The client's resilience settings, together.
#[derive(Clone, Debug, Default)]
pub struct ResilienceSettings {
    pub breaker: BreakerSettings,
    pub retry: RetrySettings,
    pub bulkhead: BulkheadSettings,
    /// Per-service overrides, by service name (`_` for `-`).
    pub downstream: std::collections::BTreeMap<String, DownstreamSettings>,
}

fn invalid(key: &str, problem: &str, fix: &str) -> crate::config::ConfigError {
    crate::config::ConfigError {
        key: key.to_owned(),
        origin: "configuration".into(),
        problem: problem.to_owned(),
        fix: fix.to_owned(),
    }
}

impl RetrySettings {
    /// Every invalid setting, as configuration errors.
    pub fn validate(&self) -> Vec<crate::config::ConfigError> {
        let mut errors = Vec::new();
        if self.max_attempts == 0 {
            errors.push(invalid(
                "retry.max_attempts",
                "must be at least 1",
                "use 1 to disable retries",
            ));
        }
        if !(0.0..=10.0).contains(&self.budget_ratio) {
            errors.push(invalid(
                "retry.budget_ratio",
                "must be between 0 and 10",
                "use 0.2 for at most 20% extra load",
            ));
        }
        if self.max_delay < self.base_delay {
            errors.push(invalid(
                "retry.max_delay",
                "must be at least retry.base_delay",
                "raise max_delay",
            ));
        }
        errors
    }
}

impl BulkheadSettings {
    /// Every invalid setting, as configuration errors.
    pub fn validate(&self) -> Vec<crate::config::ConfigError> {
        if self.max_concurrent == 0 {
            return vec![invalid(
                "bulkhead.max_concurrent",
                "must be at least 1",
                "use 256, the default",
            )];
        }
        Vec::new()
    }
}

impl ResilienceSettings {
    /// Every invalid setting, global and per downstream service.
    pub fn validate(&self) -> Vec<crate::config::ConfigError> {
        let mut errors = self.breaker.validate();
        errors.extend(self.retry.validate());
        errors.extend(self.bulkhead.validate());
        let global = errors.clone();
        for (name, o) in &self.downstream {
            let (merged, _) = self.for_service(name);
            let prefix = format!("downstream.{name}.");
            let renamed = |e: crate::config::ConfigError, key: &str| crate::config::ConfigError {
                key: format!("{prefix}{key}"),
                ..e
            };
            for e in merged
                .breaker
                .validate()
                .into_iter()
                .chain(merged.retry.validate())
                .chain(merged.bulkhead.validate())
            {
                // A global mistake is reported once, under its own key, not again
                // for every service that inherits it.
                if global.iter().any(|g| g.key == e.key) {
                    continue;
                }
                let key = e.key.replace('.', "_");
                errors.push(renamed(e, &key));
            }
            if let Some(rate) = o.rate_limit
                && (!rate.is_finite() || rate <= 0.0)
            {
                errors.push(invalid(
                    &format!("{prefix}rate_limit"),
                    "must be a positive number of calls per second",
                    "remove it for no limit",
                ));
            }
            if o.rate_limit_burst == Some(0) {
                errors.push(invalid(
                    &format!("{prefix}rate_limit_burst"),
                    "must be at least 1",
                    "use 1 for no burst",
                ));
            }
        }
        errors
    }
}

/// `[downstream.<service>]`: overrides of the client pipeline for one downstream
/// service; every key is optional and falls back to the global sections.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownstreamSettings {
    /// Deadline of one attempt (default `http.client_timeout`).
    pub timeout: Option<HumanDuration>,
    /// Deadline of a call with all its retries (default: attempts x timeout).
    pub total_timeout: Option<HumanDuration>,
    /// Calls per second this client sends at most (default: no limit).
    pub rate_limit: Option<f64>,
    /// Calls allowed at once above the rate (default 1).
    pub rate_limit_burst: Option<u32>,
    /// How long a call may wait for its turn before it is rejected (default 0).
    pub rate_limit_max_wait: Option<HumanDuration>,
    pub retry_max_attempts: Option<u32>,
    pub bulkhead_max_concurrent: Option<usize>,
    pub breaker_enabled: Option<bool>,
    pub breaker_failure_rate_threshold: Option<f64>,
    pub breaker_minimum_calls: Option<u32>,
    pub breaker_wait_in_open: Option<HumanDuration>,
}

impl ResilienceSettings {
    /// The settings for `service`: the global sections with its overrides applied.
    pub fn for_service(&self, service: &str) -> (ResilienceSettings, DownstreamSettings) {
        let key = service.replace('-', "_");
        let o = self.downstream.get(&key).cloned().unwrap_or_default();
        let mut s = self.clone();
        if let Some(v) = o.retry_max_attempts {
            s.retry.max_attempts = v;
        }
        if let Some(v) = o.bulkhead_max_concurrent {
            s.bulkhead.max_concurrent = v;
        }
        if let Some(v) = o.breaker_enabled {
            s.breaker.enabled = v;
        }
        if let Some(v) = o.breaker_failure_rate_threshold {
            s.breaker.failure_rate_threshold = v;
        }
        if let Some(v) = o.breaker_minimum_calls {
            s.breaker.minimum_calls = v;
        }
        if let Some(v) = o.breaker_wait_in_open {
            s.breaker.wait_in_open = v;
        }
        (s, o)
    }
}
