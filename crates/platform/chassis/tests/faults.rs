//! The client's resilience against a fault-injecting server on a real port: hangs,
//! errors, and recovery.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use chassis::Chassis;
use chassis::client::ClientError;
use chassis::config::HumanDuration;
use chassis::testing::{IdentityFixture, service_config};
use resilience::circuit_breaker::State;
use serde_json::Value;

const NORMAL: u8 = 0;
const HANG: u8 = 1;
const UNAVAILABLE: u8 = 2;
/// Answers 200 after 80 ms.
const SLOW: u8 = 3;
/// Answers 503 to one request in three, 200 otherwise.
const FLAKY: u8 = 4;

struct Faulty {
    url: String,
    mode: Arc<AtomicU8>,
    requests: Arc<AtomicU32>,
}

async fn faulty() -> Faulty {
    let mode = Arc::new(AtomicU8::new(NORMAL));
    let requests = Arc::new(AtomicU32::new(0));
    let (m, r) = (mode.clone(), requests.clone());
    let app = Router::new().route(
        "/data",
        get(move || {
            let (m, r) = (m.clone(), r.clone());
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                let n = r.load(Ordering::SeqCst);
                match m.load(Ordering::SeqCst) {
                    HANG => std::future::pending::<axum::response::Response>().await,
                    UNAVAILABLE => StatusCode::SERVICE_UNAVAILABLE.into_response(),
                    SLOW => {
                        tokio::time::sleep(Duration::from_millis(80)).await;
                        axum::Json(serde_json::json!({"ok": true})).into_response()
                    }
                    FLAKY if n % 3 == 0 => StatusCode::SERVICE_UNAVAILABLE.into_response(),
                    _ => axum::Json(serde_json::json!({"ok": true})).into_response(),
                }
            }
        }),
    );
    let url = chassis::testing::serve(app).await;
    Faulty {
        url,
        mode,
        requests,
    }
}

#[tokio::test]
async fn a_hanging_dependency_costs_a_bounded_wait_then_fails_fast_and_recovers() {
    let dep = faulty().await;
    let identity = IdentityFixture::start().await;
    let mut config = service_config("caller", &identity, &[("dep", &dep.url)]);
    config.http.client_timeout = HumanDuration::millis(100);
    let b = &mut config.resilience.breaker;
    b.window_size = 10;
    b.minimum_calls = 5;
    b.wait_in_open = HumanDuration::millis(500);
    b.permitted_in_half_open = 2;
    let chassis = Chassis::bind(config).await.unwrap();
    let client = chassis.client.clone();

    dep.mode.store(HANG, Ordering::SeqCst);
    let mut latencies = Vec::new();
    for _ in 0..100 {
        let started = Instant::now();
        let err = client.get_json::<Value>("dep", "/data").await.unwrap_err();
        latencies.push(started.elapsed());
        assert!(err.is_unavailable(), "{err}");
    }
    latencies.sort();
    let p99 = latencies[98];
    // Three attempts of 100 ms and their backoff bound the worst call; once the
    // breaker is open, calls fail in microseconds.
    assert!(p99 < Duration::from_millis(600), "p99 {p99:?}");
    assert!(
        latencies[50] < Duration::from_millis(5),
        "median {:?}: the breaker did not open",
        latencies[50]
    );
    let breaker = client.downstreams().get("dep").breaker.clone().unwrap();
    assert_eq!(breaker.state(), State::Open);
    let reached = dep.requests.load(Ordering::SeqCst);
    assert!(
        reached <= 12,
        "{reached} requests reached a dependency known to hang"
    );

    // The dependency recovers: after the wait, trial calls pass and close the breaker.
    dep.mode.store(NORMAL, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..2 {
        let ok: Value = client.get_json("dep", "/data").await.unwrap();
        assert_eq!(ok["ok"], true);
    }
    assert_eq!(breaker.state(), State::Closed);
}

#[tokio::test]
async fn retries_stay_within_the_budget_when_everything_fails() {
    let dep = faulty().await;
    let identity = IdentityFixture::start().await;
    let mut config = service_config("caller", &identity, &[("dep", &dep.url)]);
    // No breaker: the budget alone must bound the extra load.
    config.resilience.breaker.enabled = false;
    config.resilience.retry.base_delay = HumanDuration::millis(0);
    config.resilience.retry.max_delay = HumanDuration::millis(0);
    let chassis = Chassis::bind(config).await.unwrap();
    dep.mode.store(UNAVAILABLE, Ordering::SeqCst);
    let calls = 1_000;
    for _ in 0..calls {
        let err = chassis
            .client
            .get_json::<Value>("dep", "/data")
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::Status { status, .. } if status == StatusCode::SERVICE_UNAVAILABLE)
        );
    }
    let reached = dep.requests.load(Ordering::SeqCst);
    let retries = reached - calls;
    // 20% of the calls, plus the budget's floor of 10 retries/s kept for 10 s.
    assert!(
        retries <= calls / 5 + 100,
        "{retries} retries for {calls} calls"
    );
    assert!(retries >= calls / 5, "the budget allows 20%: {retries}");
}

#[tokio::test]
async fn per_service_overrides_rate_limit_one_downstream_only() {
    let dep = faulty().await;
    let identity = IdentityFixture::start().await;
    let mut config = service_config(
        "caller",
        &identity,
        &[("dep", &dep.url), ("other", &dep.url)],
    );
    config.resilience.downstream.insert(
        "dep".into(),
        chassis::settings::DownstreamSettings {
            rate_limit: Some(2.0),
            rate_limit_burst: Some(1),
            ..Default::default()
        },
    );
    assert!(config.resilience.validate().is_empty());
    let chassis = Chassis::bind(config).await.unwrap();
    let client = chassis.client.clone();
    client.get_json::<Value>("dep", "/data").await.unwrap();
    let err = client.get_json::<Value>("dep", "/data").await.unwrap_err();
    match err {
        ClientError::RateLimited { retry_after, .. } => {
            assert!(retry_after <= Duration::from_millis(500))
        }
        other => panic!("expected a rate-limit rejection, got {other}"),
    }
    for _ in 0..5 {
        client.get_json::<Value>("other", "/data").await.unwrap();
    }
}

#[tokio::test]
async fn a_per_service_timeout_overrides_the_client_default() {
    let dep = faulty().await;
    dep.mode.store(HANG, Ordering::SeqCst);
    let identity = IdentityFixture::start().await;
    let mut config = service_config("caller", &identity, &[("dep", &dep.url)]);
    config.http.client_timeout = HumanDuration::secs(5);
    config.resilience.downstream.insert(
        "dep".into(),
        chassis::settings::DownstreamSettings {
            timeout: Some(HumanDuration::millis(100)),
            retry_max_attempts: Some(1),
            ..Default::default()
        },
    );
    let chassis = Chassis::bind(config).await.unwrap();
    let started = Instant::now();
    let err = chassis
        .client
        .get_json::<Value>("dep", "/data")
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Timeout { after, .. } if after == Duration::from_millis(100)),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn invalid_overrides_are_configuration_errors() {
    let mut settings = chassis::settings::ResilienceSettings::default();
    settings.downstream.insert(
        "products".into(),
        chassis::settings::DownstreamSettings {
            rate_limit: Some(-1.0),
            retry_max_attempts: Some(0),
            ..Default::default()
        },
    );
    let keys: Vec<String> = settings.validate().into_iter().map(|e| e.key).collect();
    assert_eq!(
        keys,
        [
            "downstream.products.retry_max_attempts",
            "downstream.products.rate_limit"
        ]
    );
}

#[tokio::test]
async fn connection_resets_are_retried_and_reported_as_unavailable() {
    // A server that accepts and closes every connection without answering.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicU32::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    let identity = IdentityFixture::start().await;
    let chassis = Chassis::bind(service_config("caller", &identity, &[("reset", &url)]))
        .await
        .unwrap();
    let err = chassis
        .client
        .get_json::<Value>("reset", "/data")
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert_eq!(accepted.load(Ordering::SeqCst), 3, "three attempts");
}

#[tokio::test]
async fn a_slow_body_is_cut_at_the_attempt_deadline() {
    use axum::body::Body;
    let app = Router::new().route(
        "/data",
        get(|| async {
            let chunks = futures::stream::unfold(0u8, |n| async move {
                if n > 0 {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
                Some((
                    Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"{")),
                    n + 1,
                ))
            });
            Body::from_stream(chunks)
        }),
    );
    let url = chassis::testing::serve(app).await;
    let identity = IdentityFixture::start().await;
    let mut config = service_config("caller", &identity, &[("slow", &url)]);
    config.http.client_timeout = HumanDuration::millis(150);
    let chassis = Chassis::bind(config).await.unwrap();
    let started = Instant::now();
    let err = chassis
        .client
        .get_json::<Value>("slow", "/data")
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "bounded: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_full_bulkhead_rejects_at_once() {
    let dep = faulty().await;
    dep.mode.store(HANG, Ordering::SeqCst);
    let identity = IdentityFixture::start().await;
    let mut config = service_config("caller", &identity, &[("dep", &dep.url)]);
    config.resilience.bulkhead.max_concurrent = 1;
    config.resilience.bulkhead.max_wait = HumanDuration::millis(10);
    config.http.client_timeout = HumanDuration::millis(500);
    let chassis = Chassis::bind(config).await.unwrap();
    let client = chassis.client.clone();
    let first = tokio::spawn({
        let client = client.clone();
        async move { client.get_json::<Value>("dep", "/data").await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let err = client.get_json::<Value>("dep", "/data").await.unwrap_err();
    assert!(matches!(err, ClientError::BulkheadFull { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_millis(100));
    assert!(first.await.unwrap().is_err());
}

#[tokio::test]
async fn steady_latency_trips_the_slow_call_rate_and_calls_then_fail_fast() {
    let dep = faulty().await;
    dep.mode.store(SLOW, Ordering::SeqCst);
    let identity = IdentityFixture::start().await;
    let mut config = service_config("caller", &identity, &[("dep", &dep.url)]);
    let b = &mut config.resilience.breaker;
    b.window_size = 5;
    b.minimum_calls = 5;
    b.slow_call_duration = HumanDuration::millis(50);
    b.slow_call_rate_threshold = 60.0;
    let chassis = Chassis::bind(config).await.unwrap();
    for _ in 0..5 {
        let ok: Value = chassis.client.get_json("dep", "/data").await.unwrap();
        assert_eq!(ok["ok"], true, "slow but answering");
    }
    let started = Instant::now();
    let err = chassis
        .client
        .get_json::<Value>("dep", "/data")
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::CircuitOpen { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_millis(20));
}

#[tokio::test]
async fn retries_hide_an_error_rate_within_the_budget() {
    let dep = faulty().await;
    dep.mode.store(FLAKY, Ordering::SeqCst);
    let identity = IdentityFixture::start().await;
    let mut config = service_config("caller", &identity, &[("dep", &dep.url)]);
    config.resilience.breaker.enabled = false;
    let chassis = Chassis::bind(config).await.unwrap();
    let calls = 300;
    let mut failed = 0;
    for _ in 0..calls {
        if chassis
            .client
            .get_json::<Value>("dep", "/data")
            .await
            .is_err()
        {
            failed += 1;
        }
    }
    // One request in three fails; a retry almost always succeeds.
    assert_eq!(
        failed, 0,
        "{failed} of {calls} calls failed despite retries"
    );
    let reached = dep.requests.load(Ordering::SeqCst);
    let retries = reached - calls;
    assert!(
        retries >= calls / 3 - 1 && retries <= calls / 2,
        "{retries} retries for {calls} calls"
    );
}

#[test]
fn a_global_mistake_is_reported_once_not_per_service() {
    let mut settings = chassis::settings::ResilienceSettings::default();
    settings.retry.max_attempts = 0;
    settings.downstream.insert(
        "products".into(),
        chassis::settings::DownstreamSettings::default(),
    );
    settings.downstream.insert(
        "users".into(),
        chassis::settings::DownstreamSettings::default(),
    );
    let keys: Vec<String> = settings.validate().into_iter().map(|e| e.key).collect();
    assert_eq!(keys, ["retry.max_attempts"]);
}
