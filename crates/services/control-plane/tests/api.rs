//! The control plane reports each service's readiness as it probes it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chassis::testing::{IdentityFixture, service_config};
use serde_json::Value;

fn log_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("bazaar-cp-log-{}", uuid::Uuid::new_v4().simple()))
}

#[tokio::test]
async fn reports_ready_and_unreachable_services() {
    let identity = IdentityFixture::start().await;
    // A live service: another control plane, which is ready without dependencies.
    let other = control_plane::Application::build(control_plane::Config {
        service: service_config("peer", &identity, &[]),
        settings: control_plane::Settings::default(),
        log_dir: log_dir(),
    })
    .await
    .unwrap();
    let peer = format!("http://127.0.0.1:{}", other.port());
    tokio::spawn(other.run_until_stopped(chassis::CancellationToken::new()));
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dead = format!("http://{dead}");
    let app = control_plane::Application::build(control_plane::Config {
        service: service_config(
            control_plane::NAME,
            &identity,
            &[("peer", &peer), ("ghost", &dead)],
        ),
        settings: control_plane::Settings::default(),
        log_dir: log_dir(),
    })
    .await
    .unwrap();
    let url = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped(chassis::CancellationToken::new()));

    let body: Value = reqwest::get(format!("{url}/v1/services"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let health = |name: &str| {
        body["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()["instances"][0]["health"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(health("peer"), "ready");
    assert_eq!(health("ghost"), "unreachable");
}

#[tokio::test]
async fn hosts_the_registry_api() {
    let identity = IdentityFixture::start().await;
    let app = control_plane::Application::build(control_plane::Config {
        service: service_config(control_plane::NAME, &identity, &[]),
        settings: control_plane::Settings::default(),
        log_dir: log_dir(),
    })
    .await
    .unwrap();
    let url = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped(chassis::CancellationToken::new()));
    let http = reqwest::Client::new();
    let r = http
        .put(format!("{url}/v1/agent/service/register"))
        .json(&serde_json::json!({"Name": "orders", "ID": "orders-1", "Port": 8081}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let list: Vec<Value> = http
        .get(format!("{url}/v1/health/service/orders?passing"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list[0]["Service"]["Port"], 8081);
    // A bad registration keeps its field errors through the chassis's problem layer.
    let r = http
        .put(format!("{url}/v1/agent/service/register"))
        .json(&serde_json::json!({"Port": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["field"], "Name");
}
