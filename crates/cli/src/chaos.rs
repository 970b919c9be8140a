//! `bazaar chaos`: while the shop runs (and `bazaar load` drives it), kills a random
//! service process with SIGKILL every interval and lets the supervisor restart it;
//! can also inject latency or errors into one service (its `POST /admin/faults`).
//! Through a gateway (`--gateway`) it cannot signal processes: it asks a service to
//! crash itself (`POST /admin/crash`, SIGKILL from within) over the operator routes.
//! Afterwards `bazaar verify` tells whether every invariant survived.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::seq::SliceRandom;
use serde_json::json;

use crate::ps::{Row, Shop, service_of};

pub struct Options {
    pub interval: Duration,
    pub duration: Duration,
    /// Processes to kill from (names as `bazaar ps` shows them); empty: all.
    pub services: Vec<String>,
    /// Kill nothing (only inject).
    pub no_kill: bool,
    /// Inject into this service...
    pub inject: Option<String>,
    /// ...this latency per request and event...
    pub latency: Duration,
    /// ...and fail this share of them.
    pub error_rate: f64,
}

pub async fn run(shop: &Shop, options: Options) -> anyhow::Result<()> {
    let rows = shop.rows().await?;
    if rows.is_empty() {
        return Err(shop.nothing_runs());
    }
    if matches!(shop, Shop::Local(_))
        && !options.no_kill
        && rows
            .iter()
            .all(|r| r.pid == rows.first().and_then(|f| f.pid))
    {
        bail!(
            "the shop runs as one process (monolith mode): killing it leaves nothing to restart \
             it; restart it with `bazaar up --mode processes`, or pass --no-kill to only inject"
        );
    }
    for wanted in options.services.iter().chain(options.inject.iter()) {
        if !rows
            .iter()
            .any(|r| r.name == *wanted || service_of(&r.name) == *wanted)
        {
            let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
            bail!(
                "no process `{wanted}` runs in the shop; it has {}",
                names.join(", ")
            );
        }
    }
    if !(0.0..=1.0).contains(&options.error_rate) {
        bail!("--error-rate must be between 0 and 1");
    }
    let http = shop.client(Duration::from_secs(5))?;
    if let Some(target) = &options.inject {
        let url = rows
            .iter()
            .find(|r| r.name == *target || service_of(&r.name) == *target)
            .map(|r| shop.base_url(r))
            .context("the service to inject into is gone")?;
        let fault = json!({
            "latency": format!("{}ms", options.latency.as_millis()),
            "error_rate": options.error_rate,
            "duration": format!("{}ms", options.duration.as_millis()),
        });
        http.post(format!("{url}/admin/faults"))
            .json(&fault)
            .send()
            .await
            .with_context(|| format!("injecting into {target}"))?
            .error_for_status()
            .with_context(|| format!("injecting into {target}"))?;
        println!(
            "injected into {target}: {} ms latency, {:.0}% errors, for {:.0}s",
            options.latency.as_millis(),
            options.error_rate * 100.0,
            options.duration.as_secs_f64()
        );
    }
    let started = Instant::now();
    let mut kills = 0;
    while started.elapsed() + options.interval <= options.duration && !options.no_kill {
        tokio::time::sleep(options.interval).await;
        let rows = match shop.rows().await {
            Ok(rows) => rows,
            // Through the gateway, the listing fails while the control plane restarts.
            Err(e) if matches!(shop, Shop::Remote { .. }) => {
                let at = started.elapsed().as_secs_f64();
                println!("{at:>5.1}s  the shop's listing failed ({e:#}); no kill this round");
                continue;
            }
            Err(e) => return Err(e),
        };
        let candidates: Vec<&Row> = rows
            .iter()
            .filter(|r| r.health != "stopped")
            // Through the gateway, chaos cannot crash the gateway it speaks through.
            .filter(|r| r.pid.is_some() || service_of(&r.name) != gateway::NAME)
            .filter(|r| {
                options.services.is_empty()
                    || options
                        .services
                        .iter()
                        .any(|s| *s == r.name || s == service_of(&r.name))
            })
            .collect();
        let Some(victim) = candidates.choose(&mut rand::thread_rng()) else {
            continue;
        };
        let at = started.elapsed().as_secs_f64();
        match kill(shop, &http, victim).await {
            Ok(()) => {
                kills += 1;
                match victim.pid {
                    Some(pid) => println!("{at:>5.1}s  killed {} (pid {pid})", victim.name),
                    None => println!("{at:>5.1}s  crashed an instance of {}", victim.name),
                }
            }
            Err(e) => println!("{at:>5.1}s  could not kill {}: {e:#}", victim.name),
        }
    }
    if let Some(rest) = options.duration.checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    // Give the supervisor time to bring the last victim back.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = match shop.rows().await {
            Ok(rows) => rows,
            Err(e) if matches!(shop, Shop::Remote { .. }) && Instant::now() < deadline => {
                tracing::debug!(error = %format!("{e:#}"), "the shop's listing failed; asking again");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let ready = rows.iter().filter(|r| r.health == "ready").count();
        if ready == rows.len() && !rows.is_empty() {
            println!("{kills} process(es) killed; all {ready} processes ready again");
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{kills} process(es) killed; only {ready} of {} processes are ready again",
                rows.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGKILL to a local process; through the gateway, the service's own crash endpoint.
async fn kill(shop: &Shop, http: &reqwest::Client, victim: &Row) -> anyhow::Result<()> {
    match victim.pid {
        Some(pid) => {
            let pid = i32::try_from(pid).context("a pid out of range")?;
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )?;
            Ok(())
        }
        None => {
            http.post(format!("{}/admin/crash", shop.base_url(victim)))
                .send()
                .await?
                .error_for_status()?;
            Ok(())
        }
    }
}
