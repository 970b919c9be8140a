//! `bazaar chaos`: while the shop runs (and `bazaar load` drives it), kills a random
//! service process with SIGKILL every interval and lets the supervisor restart it;
//! can also inject latency or errors into one service (its `POST /admin/faults`).
//! Afterwards `bazaar verify` tells whether every invariant survived.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::seq::SliceRandom;
use serde_json::json;

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

pub async fn run(data_dir: &Path, options: Options) -> anyhow::Result<()> {
    let rows = crate::ps::rows(data_dir).await?;
    if rows.is_empty() {
        bail!(
            "no shop runs from {}; start one with `bazaar up` or pass --data-dir",
            data_dir.display()
        );
    }
    for wanted in options.services.iter().chain(options.inject.iter()) {
        let base = |name: &str| name.split('-').next().unwrap_or(name).to_owned();
        if !rows
            .iter()
            .any(|r| r.name == *wanted || base(&r.name) == *wanted)
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
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    if let Some(target) = &options.inject {
        let url = rows
            .iter()
            .find(|r| r.name == *target)
            .map(|r| r.url.clone())
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
        let rows = crate::ps::rows(data_dir).await?;
        let candidates: Vec<_> = rows
            .iter()
            .filter(|r| r.health != "stopped")
            .filter(|r| options.services.is_empty() || options.services.contains(&r.name))
            .collect();
        let Some(victim) = candidates.choose(&mut rand::thread_rng()) else {
            continue;
        };
        let pid = i32::try_from(victim.pid).context("a pid out of range")?;
        match nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        ) {
            Ok(()) => {
                kills += 1;
                println!(
                    "{:>5.1}s  killed {} (pid {})",
                    started.elapsed().as_secs_f64(),
                    victim.name,
                    victim.pid
                );
            }
            Err(e) => println!(
                "{:>5.1}s  could not kill {}: {e}",
                started.elapsed().as_secs_f64(),
                victim.name
            ),
        }
    }
    if let Some(rest) = options.duration.checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    // Give the supervisor time to bring the last victim back.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = crate::ps::rows(data_dir).await?;
        let ready = rows.iter().filter(|r| r.health == "ready").count();
        if ready == rows.len() {
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
