//! Clients nobody here wrote, unmodified, against the embedded registry: the npm
//! `consul` package (the guide's) and pip's `py-eureka-client`. `foreign/setup.sh`
//! installs them (pinned) into a cache outside the clone on first use.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

mod common;

fn foreign_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/foreign")
}

/// Where setup.sh installed the clients (run once per test binary).
fn installed() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new("bash")
            .arg(foreign_dir().join("setup.sh"))
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "installing the foreign clients failed (needs node/npm and python3 with venv):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

/// Runs a client script; its last stdout line is its JSON verdict.
fn run(mut command: Command) -> Value {
    let out = command.output().expect("client starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed:\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap()
}

#[tokio::test]
async fn the_npm_consul_package_registers_discovers_passing_and_deregisters() {
    let registry = common::start().await;
    let dir = installed().to_owned();
    let verdict = tokio::task::spawn_blocking(move || {
        let mut node = Command::new("node");
        node.arg(foreign_dir().join("consul_client.js"))
            .arg(&registry)
            .env("NODE_PATH", dir.join("node_modules"));
        run(node)
    })
    .await
    .unwrap();
    assert_eq!(
        verdict["passing"],
        serde_json::json!(["node-inventory-1"]),
        "{verdict}"
    );
    assert_eq!(
        verdict["all"],
        serde_json::json!(["node-inventory-1", "node-inventory-2"]),
        "{verdict}"
    );
    assert_eq!(
        verdict["by_tag"],
        serde_json::json!(["node-inventory-1"]),
        "{verdict}"
    );
    assert_eq!(
        verdict["check_statuses"],
        serde_json::json!(["critical", "passing"]),
        "{verdict}"
    );
    assert_eq!(verdict["catalog_has_service"], true, "{verdict}");
    assert_eq!(
        verdict["catalog_nodes"],
        serde_json::json!(["node-inventory-1", "node-inventory-2"]),
        "{verdict}"
    );
    assert_eq!(verdict["after"], 0, "{verdict}");
}

#[tokio::test]
async fn py_eureka_client_registers_is_discovered_and_called_then_cancels() {
    let registry = common::start().await;
    let dir = installed().to_owned();
    let verdict = tokio::task::spawn_blocking(move || {
        let mut python = Command::new(dir.join("venv/bin/python"));
        python
            .arg(foreign_dir().join("eureka_client.py"))
            .arg(&registry);
        run(python)
    })
    .await
    .unwrap();
    assert_eq!(verdict["answer"], "hello from python", "{verdict}");
    let id = format!("py-inventory-{}", verdict["port"]);
    assert_eq!(verdict["consul_view"], serde_json::json!([id]), "{verdict}");
    assert_eq!(verdict["after"], 0, "{verdict}");
}
