//! `bazaar up`: bind every service's socket, start the services (each its own
//! process, or all in this one), wait until each is ready, supervise, and stop them
//! all gracefully on Ctrl-C or SIGTERM.
//!
//! The supervisor binds the listening sockets itself and hands each child its
//! socket (fd 3, `LISTEN_FDS=1`, systemd's convention). So every port is known
//! before anything starts (all URLs are passed to every service at once), port 0
//! works, and a restarted service keeps its port while clients' connections wait
//! in the kernel's backlog instead of being refused.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chassis::{CancellationToken, Listen};
use command_fds::{CommandFdExt, FdMapping};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::config::ShopConfig;
use crate::services::{self, ServiceName};
use crate::state::{ProcessEntry, RunState, alive};

/// How long a service may take to become ready before `up` gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Interval between readiness probes while starting.
const READY_POLL: Duration = Duration::from_millis(50);
/// First restart delay after a crash; doubles up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A service that ran this long before crashing restarts with the initial delay.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// Environment variable telling a child which pid supervises it.
pub const SUPERVISOR_ENV: &str = "_BAZAAR_SUPERVISOR_PID";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Each service its own OS process.
    Processes,
    /// Every service in this one process: the modular monolith.
    Monolith,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Processes => "processes",
            Mode::Monolith => "monolith",
        }
    }
}

pub struct UpOptions {
    pub mode: Mode,
    pub port: Option<u16>,
    pub config_file: Option<PathBuf>,
    /// Instances per service beyond one (`--scale orders=3`).
    pub scale: Vec<(ServiceName, usize)>,
}

struct Bound {
    service: ServiceName,
    /// `orders` for the first instance, `orders-2`, `orders-3`... for the others.
    label: String,
    listener: TcpListener,
    url: String,
}

pub async fn run(mut config: ShopConfig, options: UpOptions) -> anyhow::Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            config.data_dir.display()
        )
    })?;
    config.data_dir = config.data_dir.canonicalize()?;
    let data_dir = config.data_dir.clone();
    // Before any process loads the configuration: each opens the gateway's operator
    // routes to this key.
    crate::operator::ensure_key(&data_dir)?;
    crate::operator::attach(&mut config)?;
    if let Some(state) = RunState::read(&data_dir).ok().flatten()
        && alive(state.supervisor_pid)
        && state.supervisor_pid != std::process::id()
    {
        bail!(
            "a shop is already running from {} (pid {}); stop it, or pass another --data-dir",
            data_dir.display(),
            state.supervisor_pid
        );
    }
    if let Some(port) = options.port {
        config.gateway.port = port;
    }
    // `--port 0` runs shops side by side: their admin APIs cannot share a port.
    if config.gateway.port == 0 {
        config.gateway.admin_port = 0;
    }
    let logs = data_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    init_logging(&config, &logs, options.mode)?;

    let bound = bind_all(&config, &options.scale)?;
    let urls: Vec<(ServiceName, String)> =
        bound.iter().map(|b| (b.service, b.url.clone())).collect();
    let labels: Vec<String> = bound.iter().map(|b| b.label.clone()).collect();
    let tokens: Vec<CancellationToken> = bound.iter().map(|_| CancellationToken::new()).collect();
    let pids: Arc<Mutex<HashMap<usize, u32>>> = Arc::default();
    let state = RunState {
        supervisor_pid: std::process::id(),
        mode: options.mode.as_str().to_owned(),
        gateway_url: url_of(&urls, ServiceName::Gateway),
        processes: Vec::new(),
    };
    let writer = StateWriter {
        data_dir: data_dir.clone(),
        base: state,
        urls: urls.clone(),
        pids: pids.clone(),
    };

    // Services report here when they cannot start, so `up` fails fast instead of
    // waiting for the readiness timeout.
    let (fail_tx, mut fail_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let starting = Arc::new(AtomicBool::new(true));
    let mut tasks = Vec::new();
    match options.mode {
        Mode::Processes => {
            let exe = std::env::current_exe().context("cannot find the bazaar executable")?;
            let mut env = child_env(&urls, &data_dir, config.saga.mode);
            if std::env::var_os(RUNTIME_WORKERS_ENV).is_none() {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                env.push((
                    RUNTIME_WORKERS_ENV.into(),
                    runtime_workers(cores, bound.len()).to_string(),
                ));
            }
            env.push((
                "BAZAAR_GATEWAY__ADMIN_PORT".into(),
                config.gateway.admin_port.to_string(),
            ));
            for (index, b) in bound.into_iter().enumerate() {
                let child = ChildSpec {
                    service: b.service,
                    index,
                    log: logs.join(format!("{}.log", b.label)),
                    label: b.label,
                    exe: exe.clone(),
                    config_file: options.config_file.clone(),
                    env: env.clone(),
                    listener: b.listener,
                };
                let watch = Watch {
                    stop: tokens[index].clone(),
                    pids: pids.clone(),
                    writer: writer.clone(),
                    starting: starting.clone(),
                    fail: fail_tx.clone(),
                };
                tasks.push((index, tokio::spawn(supervise(child, watch))));
            }
        }
        Mode::Monolith => {
            // The same discovery as the processes get: the control plane's registry,
            // with the supervisor's map as the fallback.
            let mut discovery = config.discovery.clone();
            discovery.services.extend(discovery_map(&urls));
            discovery.registry_url = Some(url_of(&urls, ServiceName::ControlPlane));
            config.discovery = discovery.clone();
            config.events.url = Some(url_of(&urls, ServiceName::ControlPlane));
            let built = discovery.build().map_err(|e| anyhow::anyhow!("{e}"))?;
            for (index, b) in bound.into_iter().enumerate() {
                pids.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(index, std::process::id());
                let token = tokens[index].clone();
                let config = config.clone();
                let discovery = built.clone();
                let service = b.service;
                let fail = fail_tx.clone();
                tasks.push((
                    index,
                    tokio::spawn(async move {
                        let listen = Listen::Inherited(b.listener);
                        if let Err(e) = services::run(service, &config, listen, discovery, token).await {
                            tracing::error!(service = service.name(), error = %format!("{e:#}"), "service failed");
                            let _ = fail.send(format!("{} failed: {e:#}", service.name()));
                        }
                    }),
                ));
            }
        }
    }

    let signal = chassis::shutdown::on_signal();
    let ready = tokio::select! {
        r = wait_ready(&urls, &labels, &logs) => r,
        Some(reason) = fail_rx.recv() => Err(anyhow::anyhow!(reason)),
        () = signal.cancelled() => Err(anyhow::anyhow!("interrupted while starting")),
    };
    starting.store(false, Ordering::Relaxed);
    if let Err(e) = ready {
        stop_all(&tokens, tasks).await;
        RunState::remove(&data_dir);
        return Err(e);
    }
    writer.write();
    print_summary(&urls, &labels, &data_dir, options.mode, started.elapsed());
    signal.cancelled().await;
    println!("Stopping…");
    stop_all(&tokens, tasks).await;
    RunState::remove(&data_dir);
    println!("Stopped.");
    Ok(())
}

fn init_logging(config: &ShopConfig, logs: &Path, mode: Mode) -> anyhow::Result<()> {
    // The terminal shows progress and events; the log lines go to a file.
    let name = match mode {
        Mode::Processes => "supervisor.log",
        Mode::Monolith => "bazaar.log",
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logs.join(name))?;
    chassis::telemetry::logging::init_to(
        "bazaar",
        env!("CARGO_PKG_VERSION"),
        &config.log.level,
        config.log.format,
        chassis::telemetry::logging::Sink::File(file),
        // The supervisor's own log is small and read live by `bazaar logs`.
        false,
    );
    Ok(())
}

fn bind_all(config: &ShopConfig, scale: &[(ServiceName, usize)]) -> anyhow::Result<Vec<Bound>> {
    let host = &config.http.host;
    let mut bound = Vec::new();
    let instances = ServiceName::ALL.iter().flat_map(|s| {
        let count = scale.iter().find(|(n, _)| n == s).map_or(1, |(_, c)| *c);
        (0..count).map(move |i| (*s, i))
    });
    for (service, instance) in instances {
        // Extra instances take free ports: a fixed port fits one listener.
        let port = if instance == 0 {
            service.port(config)
        } else {
            0
        };
        let listener = TcpListener::bind((host.as_str(), port)).map_err(|e| {
            let key = match service {
                ServiceName::Gateway => "--port or gateway.port".to_owned(),
                other => format!("{}.port", other.name().replace('-', "_")),
            };
            anyhow::anyhow!(
                "cannot listen on {host}:{port} for {}: {e}; choose a free port with {key} (0 picks one)",
                service.name()
            )
        })?;
        let addr: SocketAddr = listener.local_addr()?;
        // A wildcard bind is reachable on loopback; advertise that.
        let shown = if addr.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        } else {
            addr
        };
        bound.push(Bound {
            service,
            label: if instance == 0 {
                service.name().to_owned()
            } else {
                format!("{}-{}", service.name(), instance + 1)
            },
            listener,
            url: format!("http://{shown}"),
        });
    }
    Ok(bound)
}

fn url_of(urls: &[(ServiceName, String)], service: ServiceName) -> String {
    urls.iter()
        .find(|(s, _)| *s == service)
        .map(|(_, u)| u.clone())
        .unwrap_or_default()
}

/// Service name (config spelling, `_` for `-`) -> its instances' URLs, comma separated.
fn discovery_map(urls: &[(ServiceName, String)]) -> std::collections::BTreeMap<String, String> {
    let mut map: std::collections::BTreeMap<String, String> = Default::default();
    for (s, u) in urls {
        let entry = map.entry(s.name().replace('-', "_")).or_default();
        if !entry.is_empty() {
            entry.push(',');
        }
        entry.push_str(u);
    }
    map
}

/// Tokio's own variable for the worker threads of a multi-threaded runtime.
const RUNTIME_WORKERS_ENV: &str = "TOKIO_WORKER_THREADS";

/// Async worker threads per child: the machine's cores shared among the processes
/// (at least one each). Tokio's default, a worker per core in every process, made
/// nine processes on two cores wake each other's spare workers: one worker each cut
/// the shop's context switches per order by a fifth and its CPU per order by 6%
/// (docs/benchmarks.md). The gateway's proxy threads are sized on their own
/// (`gateway.workers`).
fn runtime_workers(cores: usize, processes: usize) -> usize {
    (cores / processes.max(1)).max(1)
}

/// What every child gets on top of the inherited environment.
fn child_env(
    urls: &[(ServiceName, String)],
    data_dir: &Path,
    saga: chassis::settings::SagaMode,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = discovery_map(urls)
        .into_iter()
        .map(|(name, u)| {
            (
                format!("BAZAAR_DISCOVERY__SERVICES__{}", name.to_ascii_uppercase()),
                u,
            )
        })
        .collect();
    env.push(("BAZAAR_DATA_DIR".into(), data_dir.display().to_string()));
    // Services register with the control plane's registry and resolve through it.
    env.push((
        "BAZAAR_DISCOVERY__REGISTRY_URL".into(),
        url_of(urls, ServiceName::ControlPlane),
    ));
    // The control plane hosts the embedded broker too.
    env.push((
        "BAZAAR_EVENTS__URL".into(),
        url_of(urls, ServiceName::ControlPlane),
    ));
    // Every process runs the saga the same way (`--saga-mode` reaches them here).
    env.push(("BAZAAR_SAGA__MODE".into(), saga.as_str().into()));
    env.push((SUPERVISOR_ENV.into(), std::process::id().to_string()));
    // The supervisor restarts a crashed child, so `bazaar chaos --gateway` may crash one.
    env.push(("BAZAAR_HTTP__ALLOW_CRASH".into(), "true".into()));
    env.push(("LISTEN_FDS".into(), "1".into()));
    env
}

#[derive(Clone)]
struct StateWriter {
    data_dir: PathBuf,
    base: RunState,
    urls: Vec<(ServiceName, String)>,
    pids: Arc<Mutex<HashMap<usize, u32>>>,
}

impl StateWriter {
    fn write(&self) {
        let pids = self.pids.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut state = self.base.clone();
        state.processes = self
            .urls
            .iter()
            .enumerate()
            .map(|(i, (s, url))| ProcessEntry {
                name: s.name().to_owned(),
                pid: pids.get(&i).copied().unwrap_or(0),
                url: url.clone(),
            })
            .collect();
        if let Err(e) = state.write(&self.data_dir) {
            eprintln!("! cannot write the run state: {e:#}");
        }
    }
}

struct ChildSpec {
    service: ServiceName,
    /// Position among every instance `up` runs.
    index: usize,
    label: String,
    exe: PathBuf,
    config_file: Option<PathBuf>,
    env: Vec<(String, String)>,
    log: PathBuf,
    listener: TcpListener,
}

impl ChildSpec {
    fn spawn(&self) -> anyhow::Result<tokio::process::Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut command = tokio::process::Command::new(&self.exe);
        command.arg("run").arg(self.service.name());
        if let Some(file) = &self.config_file {
            command.arg("--config").arg(file);
        }
        command
            .envs(self.env.iter().cloned())
            .env_remove("LISTEN_PID")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a Ctrl-C in the terminal reaches only `up`,
            // which then stops the services in order.
            .process_group(0)
            .kill_on_drop(true);
        command.fd_mappings(vec![FdMapping {
            parent_fd: self.listener.try_clone()?.into(),
            child_fd: 3,
        }])?;
        Ok(command.spawn()?)
    }
}

/// What a supervising task shares with `up`.
struct Watch {
    stop: CancellationToken,
    pids: Arc<Mutex<HashMap<usize, u32>>>,
    writer: StateWriter,
    /// True until every service was ready once.
    starting: Arc<AtomicBool>,
    fail: tokio::sync::mpsc::UnboundedSender<String>,
}

/// Crashes while the shop is starting after which `up` gives up: a service that
/// dies this often before ever being ready has a problem a restart will not fix.
const STARTUP_CRASHES: u32 = 3;

/// Runs one child, restarting it with backoff when it dies, until `stop`.
async fn supervise(child: ChildSpec, watch: Watch) {
    let Watch {
        stop,
        pids,
        writer,
        starting,
        fail,
    } = watch;
    let name = child.label.as_str();
    let mut backoff = INITIAL_BACKOFF;
    let mut restarts = 0u32;
    loop {
        let mut process = match child.spawn() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("✗ cannot start {name}: {e:#}; retrying in {backoff:?}");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let pid = process.id().unwrap_or(0);
        pids.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(child.index, pid);
        if restarts > 0 {
            eprintln!("✓ {name} restarted (pid {pid})");
            tracing::info!(child = name, pid, restarts, "restarted");
            writer.write();
        }
        let since = Instant::now();
        tokio::select! {
            status = process.wait() => {
                if stop.is_cancelled() {
                    return;
                }
                if since.elapsed() > STABLE_AFTER {
                    backoff = INITIAL_BACKOFF;
                }
                restarts += 1;
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                if starting.load(Ordering::Relaxed) && restarts >= STARTUP_CRASHES {
                    let _ = fail.send(format!(
                        "{name} exited {restarts} times while starting ({status}); last lines of {}:\n{}",
                        child.log.display(),
                        tail(&child.log, 10)
                    ));
                    return;
                }
                eprintln!("! {name} exited ({status}); restarting in {backoff:?} (restart {restarts}; log: {})", child.log.display());
                tracing::warn!(child = name, %status, restarts, "exited; restarting");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            () = stop.cancelled() => {
                terminate(&mut process, name).await;
                return;
            }
        }
    }
}

/// The last `n` lines of a log file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Time a service gets to drain after SIGTERM before SIGKILL: above the chassis's
/// default 10 s grace period.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

async fn terminate(process: &mut tokio::process::Child, name: &str) {
    let Some(pid) = process.id().and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    match tokio::time::timeout(STOP_TIMEOUT, process.wait()).await {
        Ok(_) => tracing::info!(child = name, "stopped"),
        Err(_) => {
            eprintln!("! {name} did not stop within {STOP_TIMEOUT:?}; killing it");
            let _ = process.kill().await;
        }
    }
}

/// Stops services in reverse start order: the gateway first, so no new request
/// reaches a service that is already stopping.
async fn stop_all(tokens: &[CancellationToken], tasks: Vec<(usize, tokio::task::JoinHandle<()>)>) {
    for (index, task) in tasks.into_iter().rev() {
        if let Some(t) = tokens.get(index) {
            t.cancel();
        }
        let _ = task.await;
    }
}

/// Polls every service's `/readyz` with a live progress display.
async fn wait_ready(
    urls: &[(ServiceName, String)],
    labels: &[String],
    logs: &Path,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()?;
    let tty = std::io::stderr().is_terminal();
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{spinner} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let checks = urls.iter().zip(labels).map(|((_, url), label)| {
        let bar = multi.add(ProgressBar::new_spinner().with_style(style.clone()));
        bar.set_message(format!("starting {label:<14} {url}"));
        bar.enable_steady_tick(Duration::from_millis(80));
        let client = client.clone();
        let multi = multi.clone();
        async move {
            let started = Instant::now();
            loop {
                let ready = client.get(format!("{url}/readyz")).send().await;
                if ready.is_ok_and(|r| r.status().is_success()) {
                    let line = format!(
                        "✓ {label:<14} ready in {:>5.2}s  {url}",
                        started.elapsed().as_secs_f64()
                    );
                    bar.finish_and_clear();
                    if tty {
                        let _ = multi.println(&line);
                    } else {
                        eprintln!("{line}");
                    }
                    return Ok(());
                }
                if started.elapsed() > READY_TIMEOUT {
                    bar.abandon_with_message(format!("✗ {label} not ready"));
                    bail!(
                        "{label} did not become ready within {READY_TIMEOUT:?}; see {}",
                        logs.join(format!("{label}.log")).display()
                    );
                }
                tokio::time::sleep(READY_POLL).await;
            }
        }
    });
    futures::future::try_join_all(checks).await.map(|_| ())
}

fn print_summary(
    urls: &[(ServiceName, String)],
    labels: &[String],
    data_dir: &Path,
    mode: Mode,
    elapsed: Duration,
) {
    println!();
    println!(
        "Bazaar is up in {:.2}s ({} mode).",
        elapsed.as_secs_f64(),
        mode.as_str()
    );
    println!();
    for ((service, url), label) in urls.iter().zip(labels).rev() {
        let note = if *service == ServiceName::Gateway {
            "  <- the shop's public entry"
        } else {
            ""
        };
        println!("  {label:<14} {url}{note}");
    }
    println!();
    println!("Data and logs: {}", data_dir.display());
    println!(
        "Operator key (ps, verify and chaos with --gateway): {}",
        crate::operator::key_path(data_dir).display()
    );
    println!(
        "Try: curl {}/products?limit=3",
        url_of(urls, ServiceName::Gateway)
    );
    println!("Press Ctrl-C to stop.");
}

#[cfg(test)]
mod tests {
    #[test]
    fn children_share_the_cores_with_at_least_one_worker_each() {
        assert_eq!(super::runtime_workers(2, 9), 1);
        assert_eq!(super::runtime_workers(32, 9), 3);
        assert_eq!(super::runtime_workers(8, 0), 8);
    }
}
