//! The configuration the gateway serves with, swapped whole on reload.
//!
//! A request loads the current [`Runtime`] once and keeps that `Arc` to its end, so a
//! reload never changes a request midway and never drops one: the old runtime lives
//! until its last request finishes. A new configuration is compiled and validated
//! before the swap; an invalid one is refused with every error named, and the old
//! one keeps serving (the failure shows in the log, in
//! `bazaar_gateway_config_reload_failures_total` and in the admin API).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

use crate::auth::ApiKeys;
use crate::configuration::{Declarative, UpstreamConfig};
use crate::ratelimit::KeyedLimiter;
use crate::routes::RouteTable;

/// How often the configuration file is checked for changes.
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// One compiled configuration.
pub struct Runtime {
    pub version: u64,
    pub loaded_at: SystemTime,
    pub table: RouteTable,
    /// Looked up on every rate-limited request: a fast hash (names from config).
    pub limiters: HashMap<String, Arc<KeyedLimiter>, foldhash::fast::RandomState>,
    pub api_keys: ApiKeys,
    pub config: Declarative,
}

/// What an upstream not configured gets.
static DEFAULT_UPSTREAM: std::sync::LazyLock<UpstreamConfig> =
    std::sync::LazyLock::new(UpstreamConfig::default);

impl Runtime {
    /// `service`'s upstream settings (the defaults when not configured).
    pub fn upstream(&self, service: &str) -> &UpstreamConfig {
        self.config
            .upstreams
            .get(service)
            .unwrap_or(&DEFAULT_UPSTREAM)
    }

    /// Compiles `config`; limiters whose policy did not change keep their state
    /// (a reload must not hand every client a fresh burst).
    fn compile(
        config: Declarative,
        version: u64,
        previous: Option<&Runtime>,
    ) -> Result<Self, Vec<String>> {
        let (table, api_keys) = config.compile()?;
        let limiters = config
            .rate_limits
            .iter()
            .map(|(name, policy)| {
                let kept = previous
                    .and_then(|p| p.limiters.get(name))
                    .filter(|l| &l.policy == policy)
                    .cloned();
                (
                    name.clone(),
                    kept.unwrap_or_else(|| Arc::new(KeyedLimiter::new(policy.clone()))),
                )
            })
            .collect();
        Ok(Self {
            version,
            loaded_at: SystemTime::now(),
            table,
            limiters,
            api_keys,
            config,
        })
    }
}

/// Where the declarative configuration comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// `[gateway]` itself: fixed for the process's life.
    Settings(Box<Declarative>),
    /// A TOML file, re-read on reload.
    File(PathBuf),
}

impl Source {
    fn read(&self) -> Result<Declarative, Vec<String>> {
        match self {
            Source::Settings(d) => Ok((**d).clone()),
            Source::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| vec![format!("cannot read {}: {e}", path.display())])?;
                Declarative::from_toml(&text).map_err(|errors| {
                    errors
                        .into_iter()
                        .map(|e| format!("{}: {e}", path.display()))
                        .collect()
                })
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Source::Settings(_) => "[gateway] settings".to_owned(),
            Source::File(path) => path.display().to_string(),
        }
    }
}

/// `t` as RFC 3339, for the admin API.
pub fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The last reload's outcome, for the admin API.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LastReload {
    pub ok: bool,
    pub at: String,
    pub trigger: String,
    pub errors: Vec<String>,
}

#[derive(Clone, Default)]
struct ReloadMetrics {
    reloads: Counter,
    failures: Counter,
    version: Gauge,
}

/// The current runtime and how to replace it.
pub struct Config {
    current: ArcSwap<Runtime>,
    source: Source,
    next_version: AtomicU64,
    /// Serializes reloads (file watch, SIGHUP and admin calls may race).
    reloading: tokio::sync::Mutex<()>,
    last: Mutex<Option<LastReload>>,
    metrics: ReloadMetrics,
}

impl Config {
    /// Loads the first configuration; an invalid one stops the start.
    pub fn load(source: Source) -> Result<Self, Vec<String>> {
        let runtime = Runtime::compile(source.read()?, 1, None)?;
        let metrics = ReloadMetrics::default();
        metrics.version.set(1);
        Ok(Self {
            current: ArcSwap::from_pointee(runtime),
            source,
            next_version: AtomicU64::new(2),
            reloading: tokio::sync::Mutex::new(()),
            last: Mutex::new(None),
            metrics,
        })
    }

    /// `bazaar_gateway_config_version`, `..._reloads_total`, `..._reload_failures_total`.
    pub fn register_metrics(&self, metrics: &telemetry::metrics::Metrics) {
        let m = &self.metrics;
        metrics.register(
            "bazaar_gateway_config_version",
            "Version of the configuration serving",
            m.version.clone(),
        );
        metrics.register(
            "bazaar_gateway_config_reloads",
            "Configuration reloads applied",
            m.reloads.clone(),
        );
        metrics.register(
            "bazaar_gateway_config_reload_failures",
            "Configuration reloads refused (the previous configuration kept serving)",
            m.failures.clone(),
        );
    }

    /// The runtime serving now.
    pub fn current(&self) -> Arc<Runtime> {
        self.current.load_full()
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    pub fn last_reload(&self) -> Option<LastReload> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Re-reads the source and swaps in what it says: the new version, or every
    /// error (the current configuration stays).
    pub async fn reload(&self, trigger: &str) -> Result<u64, Vec<String>> {
        let _one_at_a_time = self.reloading.lock().await;
        let previous = self.current();
        let outcome = self.source.read().and_then(|config| {
            let version = self.next_version.fetch_add(1, Ordering::Relaxed);
            Runtime::compile(config, version, Some(&previous))
        });
        let at = rfc3339(SystemTime::now());
        let result = match outcome {
            Ok(runtime) => {
                let version = runtime.version;
                self.current.store(Arc::new(runtime));
                self.metrics.reloads.inc();
                self.metrics
                    .version
                    .set(i64::try_from(version).unwrap_or(i64::MAX));
                tracing::info!(version, trigger, "gateway configuration reloaded");
                Ok(version)
            }
            Err(errors) => {
                self.metrics.failures.inc();
                tracing::error!(trigger, errors = ?errors, serving = previous.version, "gateway configuration refused; the previous one keeps serving");
                Err(errors)
            }
        };
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(LastReload {
            ok: result.is_ok(),
            at,
            trigger: trigger.to_owned(),
            errors: result.as_ref().err().cloned().unwrap_or_default(),
        });
        result
    }

    /// Reloads when the file's content changes (checked every 500 ms: polling
    /// also sees editors that replace the file and Kubernetes' symlink swaps, which
    /// inotify watches on the old inode miss) and on SIGHUP, until `stop`.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let path = match &self.source {
            Source::File(path) => Some(path.clone()),
            Source::Settings(_) => None,
        };
        let mut seen = path.as_ref().and_then(|p| std::fs::read(p).ok());
        let mut hangup = hangup_signal();
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = recv(&mut hangup) => {
                    let _ = self.reload("SIGHUP").await;
                }
                _ = tick.tick(), if path.is_some() => {
                    let Some(path) = &path else { continue };
                    let now = std::fs::read(path).ok();
                    if now.is_some() && now != seen {
                        seen = now;
                        let _ = self.reload("file change").await;
                    }
                }
            }
        }
    }
}

#[cfg(unix)]
fn hangup_signal() -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

#[cfg(unix)]
async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
fn hangup_signal() -> Option<()> {
    None
}

#[cfg(not(unix))]
async fn recv(_: &mut Option<()>) -> Option<()> {
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[routes]]
prefix = "/a"
service = "a"
rate_limit = "slow"

[rate_limits.slow]
rate = 1
"#;

    #[tokio::test]
    async fn a_bad_file_is_refused_and_the_old_one_keeps_serving() {
        let dir = std::env::temp_dir().join(format!("gw-reload-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gateway.toml");
        std::fs::write(&path, GOOD).unwrap();
        let config = Config::load(Source::File(path.clone())).unwrap();
        let limiter = config.current().limiters["slow"].clone();
        assert_eq!(config.current().version, 1);

        std::fs::write(&path, "[[routes]]\nprefix = \"nope\"\nservice = \"\"\n").unwrap();
        let errors = config.reload("test").await.unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(config.current().version, 1);
        assert!(!config.last_reload().unwrap().ok);

        std::fs::write(
            &path,
            format!("{GOOD}\n[[routes]]\nprefix = \"/b\"\nservice = \"b\"\n"),
        )
        .unwrap();
        let version = config.reload("test").await.unwrap();
        let now = config.current();
        assert_eq!(now.version, version);
        assert_eq!(now.table.iter().count(), 2);
        // The unchanged policy kept its state.
        assert!(Arc::ptr_eq(&now.limiters["slow"], &limiter));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
