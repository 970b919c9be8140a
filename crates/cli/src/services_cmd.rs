//! `bazaar services`: every service in the control plane's registry, each instance
//! with its health, as the registry's checks see it.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use chassis::settings::{DiscoveryBackend, DiscoverySettings};
use serde::Serialize;
use serde_json::Value;

use crate::state::{RunState, alive};

#[derive(Debug, Serialize)]
pub struct InstanceRow {
    pub service: String,
    pub id: String,
    pub address: String,
    /// `passing`, `warning` or `critical`: the worst of the instance's checks.
    pub health: String,
}

/// The control plane (registry, event log) of the shop running from `data_dir`.
pub fn control_plane_url(data_dir: &Path) -> anyhow::Result<String> {
    let state = RunState::read(data_dir)?
        .filter(|s| alive(s.supervisor_pid))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no shop is running from {}; start one with `bazaar up`",
                data_dir.display()
            )
        })?;
    state
        .processes
        .iter()
        .find(|p| p.name == "control-plane")
        .map(|p| p.url.clone())
        .ok_or_else(|| anyhow::anyhow!("the running shop has no control plane"))
}

/// Instances in etcd (backend `etcd`): a key exists only while its lease is alive, so
/// every listed instance is passing.
async fn etcd_rows(discovery: &DiscoverySettings) -> anyhow::Result<Vec<InstanceRow>> {
    let url = discovery
        .etcd_url
        .as_deref()
        .context("discovery.etcd_url is not set")?;
    let client = discovery::etcd::EtcdClient::new(url, &discovery.etcd_prefix);
    let mut rows: Vec<InstanceRow> = client
        .all()
        .await?
        .into_iter()
        .map(|(service, i)| InstanceRow {
            service,
            address: i
                .base_url
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            id: i.id,
            health: "passing".to_owned(),
        })
        .collect();
    rows.sort_by(|a, b| (&a.service, &a.id).cmp(&(&b.service, &b.id)));
    Ok(rows)
}

pub async fn rows(data_dir: &Path) -> anyhow::Result<Vec<InstanceRow>> {
    let base = control_plane_url(data_dir)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let services: serde_json::Map<String, Value> = http
        .get(format!("{base}/v1/catalog/services"))
        .send()
        .await?
        .json()
        .await?;
    let mut rows = Vec::new();
    for name in services.keys() {
        let entries: Vec<Value> = http
            .get(format!("{base}/v1/health/service/{name}"))
            .send()
            .await?
            .json()
            .await?;
        for e in entries {
            let statuses: Vec<&str> = e["Checks"]
                .as_array()
                .map(|c| c.iter().filter_map(|c| c["Status"].as_str()).collect())
                .unwrap_or_default();
            let health = ["critical", "warning"]
                .into_iter()
                .find(|s| statuses.contains(s))
                .unwrap_or("passing");
            rows.push(InstanceRow {
                service: name.clone(),
                id: e["Service"]["ID"].as_str().unwrap_or_default().to_owned(),
                address: format!(
                    "{}:{}",
                    e["Service"]["Address"].as_str().unwrap_or_default(),
                    e["Service"]["Port"]
                ),
                health: health.to_owned(),
            });
        }
    }
    Ok(rows)
}

/// Lists from the configured backend: etcd's keys, or the running shop's registry.
pub async fn run(data_dir: &Path, discovery: &DiscoverySettings, json: bool) -> anyhow::Result<()> {
    let rows = if discovery.backend == DiscoveryBackend::Etcd {
        etcd_rows(discovery).await?
    } else {
        rows(data_dir).await?
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<15} {:<36} {:<22} HEALTH",
        "SERVICE", "INSTANCE", "ADDRESS"
    );
    for r in rows {
        println!(
            "{:<15} {:<36} {:<22} {}",
            r.service, r.id, r.address, r.health
        );
    }
    Ok(())
}
