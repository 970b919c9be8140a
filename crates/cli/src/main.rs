//! The `bazaar` binary.
#![forbid(unsafe_code)]

mod chaos;
mod config;

/// mimalloc rather than glibc's malloc: every service allocates per request and per
/// event from several threads, where glibc's arenas showed up as 10-15% of the
/// gateway's CPU (`_int_malloc`, `malloc_consolidate`) under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
mod events_cmd;
mod load;
mod operator;
mod ps;
mod services;
mod services_cmd;
mod state;
mod up;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use messaging::StartFrom;
use services::ServiceName;
use up::Mode;

/// Exit code for a configuration the user must fix (clap uses 2 for usage errors too).
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "bazaar",
    version,
    about = "A small shop built from microservices: gateway, services, discovery, events, sagas.",
    long_about = "A small shop built from microservices, implementing the classic patterns for real.\n\n\
        Start everything with `bazaar up`, then talk to the gateway it prints.\n\
        Configuration is layered: defaults, then a TOML file (--config), then environment\n\
        variables named BAZAAR_<SECTION>__<KEY> (e.g. BAZAAR_HTTP__REQUEST_TIMEOUT=10s)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--saga-mode` values.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum SagaModeArg {
    Orchestration,
    Choreography,
}

impl From<SagaModeArg> for chassis::settings::SagaMode {
    fn from(mode: SagaModeArg) -> Self {
        match mode {
            SagaModeArg::Orchestration => Self::Orchestration,
            SagaModeArg::Choreography => Self::Choreography,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Start the whole shop and supervise it until Ctrl-C.
    Up {
        /// Where databases, keys, logs and run state live [default: .bazaar]
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The gateway's public port; 0 picks a free one [default: 8080]
        #[arg(long)]
        port: Option<u16>,
        /// `processes`: each service its own OS process; `monolith`: all in this one.
        #[arg(long, value_enum, default_value = "processes")]
        mode: Mode,
        /// A TOML configuration file (see docs/configuration.md).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Run several instances of a service, e.g. `--scale orders=3` (repeatable).
        #[arg(long, value_name = "SERVICE=N", value_parser = parse_scale)]
        scale: Vec<(ServiceName, usize)>,
        /// How the place-order saga runs (overrides `[saga] mode`).
        #[arg(long, value_enum)]
        saga_mode: Option<SagaModeArg>,
    },
    /// List the running processes of the shop started from a data directory.
    Ps {
        /// Print a JSON array of {name, pid, url, health}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        shop: ShopArgs,
    },
    /// List the services in the running shop's registry, each instance with its health.
    Services {
        /// Print a JSON array of {service, id, address, health}.
        #[arg(long)]
        json: bool,
        /// The shop's data directory [default: .bazaar]
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Watch the shop's events, replay a consumer group, repair dead letters.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
        /// The shop's data directory [default: .bazaar]
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
        #[arg(long, global = true)]
        config: Option<PathBuf>,
    },
    /// Drive the shop through its gateway as customers would (sign up, log in,
    /// browse, order): open loop at a fixed rate, or closed loop with N users.
    Load {
        /// Order journeys started per second, whatever the latency (open loop).
        #[arg(long, conflicts_with = "users")]
        rate: Option<u32>,
        /// Customers each starting their next journey when the last ended (closed loop).
        #[arg(long)]
        users: Option<u32>,
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        duration: std::time::Duration,
        /// Print the final report as one JSON object.
        #[arg(long)]
        json: bool,
        /// The running shop's gateway, instead of finding it through --data-dir.
        #[arg(long)]
        gateway: Option<String>,
        /// The shop's data directory [default: .bazaar]
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Kill random service processes (SIGKILL) at an interval while the shop runs,
    /// and let the supervisor restart them; optionally inject latency or errors into
    /// one service. Run `bazaar load` beside it, then `bazaar verify`.
    Chaos {
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        interval: std::time::Duration,
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        duration: std::time::Duration,
        /// Kill only these processes (as `bazaar ps` names them), e.g. `orders,payments`.
        #[arg(long, value_delimiter = ',')]
        services: Vec<String>,
        /// Kill nothing: only inject.
        #[arg(long)]
        no_kill: bool,
        /// Inject latency and/or errors into this service for the whole duration.
        #[arg(long, value_name = "SERVICE")]
        inject: Option<String>,
        /// Latency added to each of its requests and events.
        #[arg(long, default_value = "0ms", value_parser = parse_duration, requires = "inject")]
        latency: std::time::Duration,
        /// Share of its requests (503) and events (retried) that fail, 0 to 1.
        #[arg(long, default_value_t = 0.0, requires = "inject")]
        error_rate: f64,
        #[command(flatten)]
        shop: ShopArgs,
    },
    /// Check the shop's invariants through its services' APIs: every order ended,
    /// stock conserved and never oversold, one charge per confirmed order, one refund
    /// per charged cancelled order, one closing notification per order. Exits 1 and
    /// names each violation with its ids if one is broken.
    Verify {
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        /// How long to let the shop settle (orders end, their events reach every
        /// service) before a violation counts.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        settle: std::time::Duration,
        #[command(flatten)]
        shop: ShopArgs,
    },
    /// Run one service alone, configured by file and environment.
    Run {
        #[arg(value_enum)]
        service: ServiceName,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// Where `ps`, `verify` and `chaos` find the shop.
#[derive(clap::Args)]
struct ShopArgs {
    /// Reach the shop through this gateway (its operator routes) instead of
    /// finding it through --data-dir.
    #[arg(long, value_name = "URL")]
    gateway: Option<String>,
    /// The operator key --gateway presents [default: <data-dir>/operator.key]
    #[arg(long, env = "BAZAAR_OPERATOR_KEY", hide_env_values = true)]
    operator_key: Option<String>,
    /// The shop's data directory [default: .bazaar]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Print events as they arrive, until Ctrl-C.
    Tail {
        /// One topic; every topic when left out.
        #[arg(long)]
        topic: Option<String>,
        /// earliest, latest, an offset, or an RFC 3339 time.
        #[arg(long, default_value = "latest", value_parser = events_cmd::parse_from)]
        from: StartFrom,
        /// One CloudEvent per line.
        #[arg(long)]
        json: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Move a consumer group so it reads again from a point.
    Replay {
        #[arg(long)]
        topic: String,
        #[arg(long)]
        group: String,
        /// earliest, latest, an offset, or an RFC 3339 time.
        #[arg(long, value_parser = events_cmd::parse_from)]
        from: StartFrom,
    },
    /// The dead-letter topics: what consumers set aside, and why.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters with their reason.
    List {
        /// Dead letters of one topic; of every topic when left out.
        #[arg(long)]
        topic: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Publish the dead letters' events to their topic again (each once).
    Retry {
        #[arg(long)]
        topic: Option<String>,
    },
}

fn main() -> ExitCode {
    // Transparent huge pages are on for every mapping on many Linux machines
    // (`enabled = always`): each 2 MiB region the allocator touches is then resident
    // whole. Off for this process and the services it starts: the gateway's peak
    // RSS under load went from 36.5 to 30.8 MiB (docs/benchmarks.md). Best effort: a
    // kernel without the flag keeps its default.
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_thp_disable(true);
    let cli = Cli::parse();
    // A socket handed over by `bazaar up` must be taken before any thread starts.
    let inherited = match &cli.command {
        Command::Run { .. } => listenfd::ListenFd::from_env()
            .take_tcp_listener(0)
            .ok()
            .flatten(),
        _ => None,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Buffered log lines are written when a worker runs out of work.
        .on_thread_park(chassis::telemetry::logging::idle)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match dispatch(cli.command, inherited).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(Failure::Config(errors)) => {
                eprint!("{errors}");
                ExitCode::from(EXIT_CONFIG)
            }
            Err(Failure::Found) => ExitCode::FAILURE,
            Err(Failure::Other(e)) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Most instances of one service `--scale` starts: this is a laptop.
const MAX_SCALE: usize = 16;

/// Parses `orders=3`.
/// `--data-dir`, else the configuration's data directory.
fn shop_dir(
    data_dir: Option<PathBuf>,
    config: Option<&std::path::Path>,
) -> Result<PathBuf, Failure> {
    match data_dir {
        Some(dir) => Ok(dir),
        None => Ok(load(config)?.data_dir),
    }
}

/// The shop `ps`, `verify` and `chaos` look at: behind `--gateway` (with the operator
/// key), else the one running from the data directory.
fn find_shop(args: ShopArgs) -> Result<ps::Shop, Failure> {
    let ShopArgs {
        gateway,
        operator_key: key,
        data_dir,
        config,
    } = args;
    let config = config.as_deref();
    match gateway {
        Some(gateway) => {
            let url = reqwest::Url::parse(&gateway).map_err(|e| {
                Failure::Other(anyhow::anyhow!(
                    "--gateway `{gateway}` is not a URL ({e}); use e.g. http://127.0.0.1:8080"
                ))
            })?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(Failure::Other(anyhow::anyhow!(
                    "--gateway `{gateway}` must be an http:// or https:// URL"
                )));
            }
            // The key file is looked for only when no key was given.
            let dir = match (&key, data_dir) {
                (Some(_), dir) => dir.unwrap_or_default(),
                (None, dir) => shop_dir(dir, config)?,
            };
            let key = operator::key_for(key, &dir)?;
            Ok(ps::Shop::Remote {
                gateway: gateway.trim_end_matches('/').to_owned(),
                key,
            })
        }
        None => Ok(ps::Shop::Local(shop_dir(data_dir, config)?)),
    }
}

/// The gateway and orders URLs of the shop running from `dir`.
async fn shop_target(dir: &std::path::Path) -> Result<load::Target, Failure> {
    let rows = ps::Shop::Local(dir.to_owned()).rows().await?;
    let url = |name: &str| rows.iter().find(|r| r.name == name).map(|r| r.url.clone());
    match url("gateway") {
        Some(gateway) => Ok(load::Target {
            gateway,
            orders: url("orders"),
            accepted: Some(load::accepted_file(dir)),
        }),
        None => Err(Failure::Other(anyhow::anyhow!(
            "no shop runs from {}; start one with `bazaar up`, or pass --data-dir or --gateway",
            dir.display()
        ))),
    }
}

/// `30s`, `2m`, `1h30m`.
fn parse_duration(raw: &str) -> Result<std::time::Duration, String> {
    chassis::config::HumanDuration::parse(raw)
        .map(|d| d.0)
        .ok_or_else(|| format!("`{raw}` is not a duration; use e.g. 30s, 2m or 1h"))
}

fn parse_scale(raw: &str) -> Result<(ServiceName, usize), String> {
    use clap::ValueEnum;
    let (name, count) = raw
        .split_once('=')
        .ok_or_else(|| format!("`{raw}`: write SERVICE=N, e.g. orders=3"))?;
    let service = ServiceName::from_str(name, true).map_err(|_| {
        format!(
            "`{name}` is not a service; use one of control-plane, users, products, orders, gateway"
        )
    })?;
    let count: usize = count
        .parse()
        .ok()
        .filter(|n| (1..=MAX_SCALE).contains(n))
        .ok_or_else(|| format!("`{count}`: the instance count must be 1 to {MAX_SCALE}"))?;
    Ok((service, count))
}

enum Failure {
    Config(chassis::config::Errors),
    Other(anyhow::Error),
    /// The command ran and found something wrong (it said what).
    Found,
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

fn load(file: Option<&std::path::Path>) -> Result<config::ShopConfig, Failure> {
    config::load(file).map_err(Failure::Config)
}

async fn dispatch(
    command: Command,
    inherited: Option<std::net::TcpListener>,
) -> Result<(), Failure> {
    match command {
        Command::Up {
            data_dir,
            port,
            mode,
            config,
            scale,
            saga_mode,
        } => {
            let config_file = config.map(|c| c.canonicalize().unwrap_or(c));
            let mut shop = load(config_file.as_deref())?;
            if let Some(dir) = data_dir {
                shop.data_dir = dir;
            }
            if let Some(mode) = saga_mode {
                shop.saga.mode = mode.into();
            }
            up::run(
                shop,
                up::UpOptions {
                    mode,
                    port,
                    config_file,
                    scale,
                },
            )
            .await?;
            Ok(())
        }
        Command::Ps { json, shop } => {
            let shop = find_shop(shop)?;
            ps::run(&shop, json).await?;
            Ok(())
        }
        Command::Events {
            command,
            data_dir,
            config,
        } => {
            let mut shop = load(config.as_deref())?;
            if let Some(dir) = data_dir {
                shop.data_dir = dir;
            }
            let bus = events_cmd::bus(&shop).await?;
            match command {
                EventsCommand::Tail {
                    topic,
                    from,
                    json,
                    count,
                } => events_cmd::tail(bus, topic, from, json, count).await?,
                EventsCommand::Replay { topic, group, from } => {
                    events_cmd::replay(bus, &topic, &group, from).await?
                }
                EventsCommand::Dlq {
                    command: DlqCommand::List { topic, json },
                } => events_cmd::dlq_list(bus, topic, json).await?,
                EventsCommand::Dlq {
                    command: DlqCommand::Retry { topic },
                } => events_cmd::dlq_retry(bus, topic).await?,
            }
            Ok(())
        }
        Command::Services {
            json,
            data_dir,
            config,
        } => {
            let shop = load(config.as_deref())?;
            let dir = data_dir.unwrap_or(shop.data_dir);
            services_cmd::run(&dir, &shop.discovery, json).await?;
            Ok(())
        }
        Command::Load {
            rate,
            users,
            duration,
            json,
            gateway,
            data_dir,
            config,
        } => {
            let target = match gateway {
                Some(gateway) => load::Target {
                    gateway,
                    orders: None,
                    accepted: None,
                },
                None => {
                    let dir = shop_dir(data_dir, config.as_deref())?;
                    shop_target(&dir).await?
                }
            };
            let shape = match (rate, users) {
                (_, Some(0)) | (Some(0), _) => {
                    return Err(Failure::Other(anyhow::anyhow!(
                        "--rate and --users must be at least 1"
                    )));
                }
                (_, Some(users)) => load::Shape::Users(users),
                (rate, None) => load::Shape::Rate(rate.unwrap_or(100)),
            };
            let report = load::run(target, shape, duration, json).await?;
            load::print(&report, json)?;
            Ok(())
        }
        Command::Chaos {
            interval,
            duration,
            services,
            no_kill,
            inject,
            latency,
            error_rate,
            shop,
        } => {
            let shop = find_shop(shop)?;
            chaos::run(
                &shop,
                chaos::Options {
                    interval,
                    duration,
                    services,
                    no_kill,
                    inject,
                    latency,
                    error_rate,
                },
            )
            .await?;
            Ok(())
        }
        Command::Verify { json, settle, shop } => {
            let shop = find_shop(shop)?;
            if verify::run(&shop, settle, json).await? {
                Ok(())
            } else {
                Err(Failure::Found)
            }
        }
        Command::Run { service, config } => {
            let result = run_one(service, config, inherited).await;
            // Lines a buffered log still holds are written before the process ends.
            chassis::telemetry::logging::flush();
            result
        }
    }
}

async fn run_one(
    service: ServiceName,
    config: Option<PathBuf>,
    inherited: Option<std::net::TcpListener>,
) -> Result<(), Failure> {
    let shop = load(config.as_deref())?;
    watch_supervisor()?;
    chassis::telemetry::logging::init_to(
        service.name(),
        env!("CARGO_PKG_VERSION"),
        &shop.log.level,
        shop.log.format,
        chassis::telemetry::logging::Sink::Stdout,
        shop.log.buffer,
    );
    let discovery = shop
        .discovery
        .build()
        .map_err(|e| Failure::Config(chassis::config::Errors(vec![e])))?;
    let listen = match inherited {
        Some(listener) => chassis::Listen::Inherited(listener),
        None => {
            let addr = format!("{}:{}", shop.http.host, service.port(&shop));
            let addr = tokio::net::lookup_host(&addr)
                .await
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| {
                    anyhow::anyhow!("cannot resolve the listen address {addr}; check http.host")
                })?;
            chassis::Listen::Addr(addr)
        }
    };
    let shutdown = chassis::shutdown::on_signal();
    services::run(service, &shop, listen, discovery, shutdown)
        .await
        .map_err(|e| {
            tracing::error!(error = %format!("{e:#}"), "stopped with an error");
            Failure::Other(e)
        })
}

/// Under `bazaar up`, die with the supervisor: the kernel sends SIGTERM if it exits,
/// so a killed supervisor never leaves services behind.
fn watch_supervisor() -> Result<(), Failure> {
    let Ok(pid) = std::env::var(up::SUPERVISOR_ENV) else {
        return Ok(());
    };
    #[cfg(target_os = "linux")]
    {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
            .map_err(|e| anyhow::anyhow!("cannot watch the supervisor: {e}"))?;
        // The supervisor may have died before the watch was set.
        if nix::unistd::getppid().as_raw().to_string() != pid {
            return Err(anyhow::anyhow!("the supervisor (pid {pid}) is gone").into());
        }
    }
    let _ = pid;
    Ok(())
}
