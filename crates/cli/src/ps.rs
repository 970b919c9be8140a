//! `bazaar ps`: what runs from a data directory, and how healthy it is.

use std::path::Path;
use std::time::Duration;

use futures::future::join_all;
use serde::Serialize;

use crate::state::{RunState, alive};

/// How long a health probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Serialize)]
pub struct Row {
    pub name: String,
    pub pid: u32,
    pub url: String,
    /// `ready`, `not ready`, `unreachable` or `stopped`.
    pub health: String,
}

pub async fn rows(data_dir: &Path) -> anyhow::Result<Vec<Row>> {
    let Some(state) = RunState::read(data_dir)? else {
        return Ok(Vec::new());
    };
    if !alive(state.supervisor_pid) {
        return Ok(Vec::new());
    }
    let client = reqwest::Client::builder().timeout(PROBE_TIMEOUT).build()?;
    Ok(join_all(state.processes.into_iter().map(|p| {
        let client = client.clone();
        async move {
            let health = if !alive(p.pid) {
                "stopped"
            } else {
                match client.get(format!("{}/readyz", p.url)).send().await {
                    Ok(r) if r.status().is_success() => "ready",
                    Ok(_) => "not ready",
                    Err(_) => "unreachable",
                }
            };
            Row {
                name: p.name,
                pid: p.pid,
                url: p.url,
                health: health.to_owned(),
            }
        }
    }))
    .await)
}

pub async fn run(data_dir: &Path, json: bool) -> anyhow::Result<()> {
    let rows = rows(data_dir).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no shop is running from {}", data_dir.display());
        return Ok(());
    }
    println!("{:<15} {:>8}  {:<28} HEALTH", "NAME", "PID", "URL");
    for r in rows {
        println!("{:<15} {:>8}  {:<28} {}", r.name, r.pid, r.url, r.health);
    }
    Ok(())
}
