//! The embedded registry behind its Consul-compatible API, on real ports, with real
//! HTTP, TCP and TTL checks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

mod common;

use serde_json::{Value, json};

async fn start() -> (String, reqwest::Client) {
    (common::start().await, reqwest::Client::new())
}

/// A live instance answering its health check.
async fn live() -> String {
    let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

async fn passing(http: &reqwest::Client, url: &str, name: &str) -> Vec<String> {
    let list: Vec<Value> =
        common::json(http.get(format!("{url}/v1/health/service/{name}?passing"))).await;
    list.iter()
        .map(|e| e["Service"]["ID"].as_str().unwrap().to_owned())
        .collect()
}

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn checks_decide_who_is_discovered_and_dead_instances_are_removed() {
    let (url, http) = start().await;
    let up = live().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let register = |id: &str, target: &str, extra: Value| {
        let mut check = json!({"HTTP": format!("http://{target}/healthz"), "Interval": "100ms", "Timeout": "1s"});
        if let (Some(c), Some(e)) = (check.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        http.put(format!("{url}/v1/agent/service/register"))
            .json(&json!({"Name": "orders", "ID": id, "Address": "127.0.0.1", "Port": 1, "Tags": ["v2"], "Check": check}))
            .send()
    };
    assert_eq!(
        register("orders-1", &up, json!({})).await.unwrap().status(),
        200
    );
    assert_eq!(
        register(
            "orders-2",
            &dead,
            json!({"DeregisterCriticalServiceAfter": "400ms"})
        )
        .await
        .unwrap()
        .status(),
        200
    );

    eventually("only the live instance passes", || async {
        passing(&http, &url, "orders").await == ["orders-1"]
    })
    .await;
    let all: Vec<Value> = common::json(http.get(format!("{url}/v1/health/service/orders"))).await;
    let dead_entry = all.iter().find(|e| e["Service"]["ID"] == "orders-2");
    if let Some(entry) = dead_entry {
        assert_eq!(entry["Checks"][0]["Status"], "critical");
    }
    // The dead one is deregistered once critical for 400 ms.
    eventually("the dead instance is removed", || async {
        let all: Vec<Value> =
            common::json(http.get(format!("{url}/v1/catalog/service/orders"))).await;
        all.len() == 1 && all[0]["ServiceID"] == "orders-1"
    })
    .await;
    let services: Value = common::json(http.get(format!("{url}/v1/catalog/services"))).await;
    assert_eq!(services, json!({"orders": ["v2"]}));
}

#[tokio::test]
async fn blocking_queries_return_on_change() {
    let (url, http) = start().await;
    let r = http
        .get(format!("{url}/v1/health/service/users"))
        .send()
        .await
        .unwrap();
    let index: u64 = r.headers()["x-consul-index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let watcher = {
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let r = http
                .get(format!(
                    "{url}/v1/health/service/users?index={index}&wait=5s"
                ))
                .send()
                .await
                .unwrap();
            let next: u64 = r.headers()["x-consul-index"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            (
                started.elapsed(),
                next,
                r.json::<Vec<Value>>().await.unwrap().len(),
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    http.put(format!("{url}/v1/agent/service/register"))
        .json(&json!({"Name": "users", "Port": 9}))
        .send()
        .await
        .unwrap();
    let (waited, next, count) = watcher.await.unwrap();
    assert!(next > index);
    assert_eq!(count, 1);
    assert!(
        waited < Duration::from_secs(1),
        "woke on the change: {waited:?}"
    );
    // Without a change, the wait times out with the same index.
    let started = Instant::now();
    let r = http
        .get(format!("{url}/v1/catalog/services?index={next}&wait=200ms"))
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(
        r.headers()["x-consul-index"].to_str().unwrap(),
        next.to_string()
    );
}

#[tokio::test]
async fn ttl_checks_pass_when_renewed_and_fail_when_not() {
    let (url, http) = start().await;
    http.put(format!("{url}/v1/agent/service/register"))
        .json(
            &json!({"Name": "worker", "ID": "w1", "Check": {"CheckID": "w1-ttl", "TTL": "300ms"}}),
        )
        .send()
        .await
        .unwrap();
    assert!(
        passing(&http, &url, "worker").await.is_empty(),
        "critical until the first pass"
    );
    assert_eq!(
        common::status(http.put(format!("{url}/v1/agent/check/pass/w1-ttl"))).await,
        200
    );
    assert_eq!(passing(&http, &url, "worker").await, ["w1"]);
    eventually("the TTL expires", || async {
        passing(&http, &url, "worker").await.is_empty()
    })
    .await;
    assert_eq!(
        common::status(http.put(format!("{url}/v1/agent/check/pass/nope"))).await,
        404
    );
    // Re-registering an ID replaces it; deregistering removes it.
    http.put(format!("{url}/v1/agent/service/register"))
        .json(&json!({"Name": "worker", "ID": "w1", "Port": 7}))
        .send()
        .await
        .unwrap();
    let all: Vec<Value> = common::json(http.get(format!("{url}/v1/catalog/service/worker"))).await;
    assert_eq!((all.len(), &all[0]["ServicePort"]), (1, &json!(7)));
    assert_eq!(
        passing(&http, &url, "worker").await,
        ["w1"],
        "no checks: passing"
    );
    assert_eq!(
        common::status(http.put(format!("{url}/v1/agent/service/deregister/w1"))).await,
        200
    );
    assert_eq!(
        common::status(http.put(format!("{url}/v1/agent/service/deregister/w1"))).await,
        404
    );
}

#[tokio::test]
async fn bad_registrations_are_400s_naming_the_field() {
    let (url, http) = start().await;
    for (body, field) in [
        (json!({"Port": 1}), "Name"),
        (json!({"Name": "x", "Port": 99999}), "Port"),
        (json!({"Name": "x", "Port": "eighty"}), "port"),
        (
            json!({"Name": "x", "Check": {"HTTP": "http://a/", "Interval": "often"}}),
            "Check.Interval",
        ),
        (json!({"Name": "x", "Tags": {"a": 1}}), "tags"),
    ] {
        let r = http
            .put(format!("{url}/v1/agent/service/register"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let problem: Value = r.json().await.unwrap();
        assert_eq!(problem["errors"][0]["field"], field, "{body}");
    }
    let services: Value = common::json(http.get(format!("{url}/v1/catalog/services"))).await;
    assert_eq!(services, json!({}), "nothing was registered");
}
