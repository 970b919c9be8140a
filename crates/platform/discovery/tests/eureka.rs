//! The Eureka REST subset: a JVM-style client's calls, against the same registry
//! Consul clients see.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

mod common;

use common::start;
use serde_json::{Value, json};

fn instance(id: &str, lease_secs: u64) -> Value {
    json!({"instance": {
        "instanceId": id, "hostName": "127.0.0.1", "app": "INVENTORY", "ipAddr": "127.0.0.1",
        "status": "UP", "port": {"$": 8085, "@enabled": "true"}, "vipAddress": "inventory",
        "dataCenterInfo": {"@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo", "name": "MyOwn"},
        "leaseInfo": {"renewalIntervalInSecs": 1, "durationInSecs": lease_secs},
    }})
}

#[tokio::test]
async fn register_renew_lapse_evict_and_cancel() {
    let url = start().await;
    let http = json_client();
    let r = http
        .post(format!("{url}/eureka/apps/INVENTORY"))
        .json(&instance("inv-1", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let app: Value = common::json(http.get(format!("{url}/eureka/apps/INVENTORY"))).await;
    assert_eq!(app["application"]["instance"][0]["status"], "UP");
    assert_eq!(app["application"]["instance"][0]["port"]["$"], 8085);
    // Consul clients see the same instance.
    let passing: Vec<Value> =
        common::json(http.get(format!("{url}/v1/health/service/inventory?passing"))).await;
    assert_eq!(passing[0]["Service"]["ID"], "inv-1");

    assert_eq!(
        common::status(http.put(format!("{url}/eureka/apps/INVENTORY/inv-1"))).await,
        200
    );
    assert_eq!(
        common::status(http.put(format!("{url}/eureka/apps/INVENTORY/ghost"))).await,
        404
    );

    // No renewal: the lease lapses (DOWN), then the instance is evicted.
    let started = Instant::now();
    loop {
        let r = http
            .get(format!("{url}/eureka/apps/INVENTORY"))
            .send()
            .await
            .unwrap();
        if r.status() == 404 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "never evicted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(started.elapsed() >= Duration::from_secs(1));

    http.post(format!("{url}/eureka/apps/INVENTORY"))
        .json(&instance("inv-2", 90))
        .send()
        .await
        .unwrap();
    let all: Value = common::json(http.get(format!("{url}/eureka/apps"))).await;
    assert_eq!(all["applications"]["application"][0]["name"], "INVENTORY");
    assert_eq!(
        common::status(http.delete(format!("{url}/eureka/apps/INVENTORY/inv-2"))).await,
        200
    );
    assert_eq!(
        common::status(http.get(format!("{url}/eureka/apps/INVENTORY"))).await,
        404
    );
}

#[tokio::test]
async fn bad_instances_are_400s_naming_the_field() {
    let url = start().await;
    let http = json_client();
    for (body, field) in [
        (json!({}), "instance"),
        (json!({"instance": {"port": 1}}), "instance.ipAddr"),
        (
            json!({"instance": {"ipAddr": "127.0.0.1", "port": {"$": 70000}}}),
            "instance.port",
        ),
    ] {
        let r = http
            .post(format!("{url}/eureka/apps/X"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let problem: Value = r.json().await.unwrap();
        assert_eq!(problem["errors"][0]["field"], field);
    }
}

/// Eureka clients ask for JSON explicitly (the default answer is XML).
fn json_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::ACCEPT,
        reqwest::header::HeaderValue::from_static("application/json"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

#[tokio::test]
async fn without_an_accept_header_the_listing_is_eurekas_xml() {
    let url = common::start().await;
    let http = json_client();
    http.post(format!("{url}/eureka/apps/INVENTORY"))
        .json(&instance("inv-<1>", 1))
        .send()
        .await
        .unwrap();
    let r = reqwest::get(format!("{url}/eureka/apps")).await.unwrap();
    assert_eq!(r.headers()["content-type"], "application/xml");
    let xml = r.text().await.unwrap();
    assert!(xml.starts_with("<?xml"), "{xml}");
    for part in [
        "<applications><versions__delta>",
        "<application><name>INVENTORY</name><instance><instanceId>inv-&lt;1&gt;</instanceId>",
        "<port enabled=\"true\">",
        "<dataCenterInfo class=\"com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo\"><name>MyOwn</name></dataCenterInfo>",
    ] {
        assert!(xml.contains(part), "{part} missing in {xml}");
    }
}
