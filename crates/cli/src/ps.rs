//! `bazaar ps`: what runs in the shop, and how healthy it is: from a data directory
//! (the supervisor's run state, each process probed), or through the gateway's
//! operator routes (the control plane's view of the registry).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use futures::future::join_all;
use serde::{Deserialize, Serialize};

use crate::state::{RunState, alive};

/// How long a health probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Serialize)]
pub struct Row {
    pub name: String,
    /// Unknown (null) when the shop is seen through its gateway.
    pub pid: Option<u32>,
    pub url: String,
    /// `ready`, `not ready`, `unreachable` or `stopped`.
    pub health: String,
}

/// Where the shop is found: how `ps`, `verify` and `chaos` reach it.
#[derive(Clone, Debug)]
pub enum Shop {
    /// Started by `bazaar up` from this data directory, on this machine.
    Local(PathBuf),
    /// Behind this gateway, reached with the operator key.
    Remote { gateway: String, key: String },
}

impl Shop {
    /// Each process (local) or registered instance (remote); empty when nothing runs.
    pub async fn rows(&self) -> anyhow::Result<Vec<Row>> {
        match self {
            Shop::Local(dir) => local_rows(dir).await,
            Shop::Remote { gateway, key } => remote_rows(gateway, key).await,
        }
    }

    /// An HTTP client for the shop's services (carrying the operator key if remote).
    pub fn client(&self, timeout: Duration) -> anyhow::Result<reqwest::Client> {
        match self {
            Shop::Local(_) => Ok(reqwest::Client::builder().timeout(timeout).build()?),
            Shop::Remote { key, .. } => crate::operator::client(key, timeout),
        }
    }

    /// The base URL that reaches `row`'s service: the process itself (local), or
    /// the service's operator route (remote: one of its instances).
    pub fn base_url(&self, row: &Row) -> String {
        match self {
            Shop::Local(_) => row.url.clone(),
            Shop::Remote { gateway, .. } => {
                crate::operator::service_url(gateway, service_of(&row.name))
            }
        }
    }

    /// "no shop runs ..." with the way to point at one.
    pub fn nothing_runs(&self) -> anyhow::Error {
        match self {
            Shop::Local(dir) => anyhow::anyhow!(
                "no shop runs from {}; start one with `bazaar up`, or pass --data-dir or --gateway",
                dir.display()
            ),
            Shop::Remote { gateway, .. } => anyhow::anyhow!(
                "the gateway at {gateway} lists no services; is the control plane running?"
            ),
        }
    }
}

/// `orders-2` is an instance of `orders`.
pub fn service_of(name: &str) -> &str {
    match name.rsplit_once('-') {
        Some((service, n)) if n.bytes().all(|b| b.is_ascii_digit()) && !n.is_empty() => service,
        _ => name,
    }
}

async fn local_rows(data_dir: &Path) -> anyhow::Result<Vec<Row>> {
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
                pid: Some(p.pid),
                url: p.url,
                health: health.to_owned(),
            }
        }
    }))
    .await)
}

#[derive(Deserialize)]
struct Services {
    services: Vec<Service>,
}

#[derive(Deserialize)]
struct Service {
    name: String,
    instances: Vec<Instance>,
}

#[derive(Deserialize)]
struct Instance {
    url: String,
    health: String,
}

/// The control plane's `GET /v1/services`, through the gateway.
async fn remote_rows(gateway: &str, key: &str) -> anyhow::Result<Vec<Row>> {
    let client = crate::operator::client(key, Duration::from_secs(5))?;
    let url = format!(
        "{}/v1/services",
        crate::operator::service_url(gateway, control_plane::NAME)
    );
    let response = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("cannot reach the gateway at {gateway}"))?;
    match response.status().as_u16() {
        401 | 403 => anyhow::bail!(
            "the gateway at {gateway} refused the operator key ({}); pass the key of that shop's \
             data directory (operator.key) with --operator-key",
            response.status()
        ),
        404 => anyhow::bail!(
            "the gateway at {gateway} has no operator routes: it runs its own routes, or \
             started without an operator key (`bazaar up` makes one)"
        ),
        _ => {}
    }
    let listing: Services = response
        .error_for_status()
        .with_context(|| format!("GET {url}"))?
        .json()
        .await
        .with_context(|| format!("GET {url}: not the control plane's listing"))?;
    let mut rows = vec![Row {
        name: control_plane::NAME.to_owned(),
        pid: None,
        url: crate::operator::service_url(gateway, control_plane::NAME),
        // It just answered.
        health: "ready".to_owned(),
    }];
    for service in listing.services {
        for (n, instance) in service.instances.into_iter().enumerate() {
            rows.push(Row {
                name: if n == 0 {
                    service.name.clone()
                } else {
                    format!("{}-{}", service.name, n + 1)
                },
                pid: None,
                url: instance.url,
                health: match instance.health.as_str() {
                    "not_ready" => "not ready".to_owned(),
                    other => other.to_owned(),
                },
            });
        }
    }
    if !rows.iter().any(|r| r.name == gateway::NAME) {
        rows.push(Row {
            name: gateway::NAME.to_owned(),
            pid: None,
            url: gateway.trim_end_matches('/').to_owned(),
            health: "ready".to_owned(),
        });
    }
    Ok(rows)
}

pub async fn run(shop: &Shop, json: bool) -> anyhow::Result<()> {
    let rows = shop.rows().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        match shop {
            Shop::Local(dir) => println!("no shop is running from {}", dir.display()),
            Shop::Remote { gateway, .. } => println!("the gateway at {gateway} lists no services"),
        }
        return Ok(());
    }
    println!("{:<15} {:>8}  {:<28} HEALTH", "NAME", "PID", "URL");
    for r in rows {
        let pid = r.pid.map_or_else(|| "-".to_owned(), |p| p.to_string());
        println!("{:<15} {:>8}  {:<28} {}", r.name, pid, r.url, r.health);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn instances_are_named_after_their_service() {
        assert_eq!(super::service_of("orders-2"), "orders");
        assert_eq!(super::service_of("orders"), "orders");
        assert_eq!(super::service_of("control-plane"), "control-plane");
        assert_eq!(super::service_of("control-plane-3"), "control-plane");
    }
}
