//! The chassis's middleware and standard endpoints, driven with `oneshot` (no socket
//! is served), plus graceful shutdown on a real port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use chassis::config::{ByteSize, HumanDuration};
use chassis::extract::Json;
use chassis::http::Readiness;
use chassis::testing::{IdentityFixture, service_config};
use chassis::{Chassis, Problem};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::Value;
use tower::ServiceExt;

#[derive(Deserialize)]
struct Item {
    #[allow(dead_code)]
    name: String,
    #[allow(dead_code)]
    count: u32,
}

async fn app() -> (Router, IdentityFixture) {
    let identity = IdentityFixture::start().await;
    let mut config = service_config("demo", &identity, &[]);
    config.http.body_limit = ByteSize(1024);
    config.http.request_timeout = HumanDuration::millis(200);
    let chassis = Chassis::bind(config).await.unwrap();
    let routes =
        Router::new()
            .route(
                "/items",
                post(|Json(_): Json<Item>| async { StatusCode::CREATED }),
            )
            .route(
                "/items/{id}",
                get(
                    |chassis::extract::Path(id): chassis::extract::Path<u32>| async move {
                        id.to_string()
                    },
                ),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "late"
                }),
            )
            .route(
                "/panic",
                get(|| async {
                    #[allow(clippy::panic)]
                    if true {
                        panic!("boom");
                    }
                    ""
                }),
            )
            .route(
                "/teapot",
                get(|| async { Problem::new(StatusCode::IM_A_TEAPOT, "teapot", "I am a teapot") }),
            )
            .route(
                "/whoami",
                get(|id: chassis::identity::Identity| async move { id.subject }),
            );
    let router = chassis.router(
        routes,
        Readiness::default(),
        Some(utoipa::openapi::OpenApi::default()),
    );
    (router, identity)
}

async fn call(router: &Router, request: Request<Body>) -> (StatusCode, http::HeaderMap, Value) {
    let response = router.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn json_post(path: &str, body: &str) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

#[tokio::test]
async fn client_mistakes_are_problems_with_the_right_status() {
    let (router, _id) = app().await;
    let cases: Vec<(&str, Request<Body>, StatusCode)> = vec![
        (
            "malformed JSON",
            json_post("/items", "{"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "missing field",
            json_post("/items", r#"{"name":"x"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "wrong type",
            json_post("/items", r#"{"name":"x","count":-1}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "no content type",
            Request::post("/items").body(Body::from("{}")).unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "too large",
            json_post(
                "/items",
                &format!(r#"{{"name":"{}","count":1}}"#, "x".repeat(2000)),
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "bad path parameter",
            Request::get("/items/abc").body(Body::empty()).unwrap(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "unknown path",
            Request::get("/nope").body(Body::empty()).unwrap(),
            StatusCode::NOT_FOUND,
        ),
        (
            "wrong method",
            Request::delete("/items").body(Body::empty()).unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            "no identity",
            Request::get("/whoami").body(Body::empty()).unwrap(),
            StatusCode::UNAUTHORIZED,
        ),
    ];
    for (name, request, status) in cases {
        let path = request.uri().path().to_owned();
        let (got, headers, body) = call(&router, request).await;
        assert_eq!(got, status, "{name}: {body}");
        assert_eq!(
            headers["content-type"], "application/problem+json",
            "{name}"
        );
        assert_eq!(body["status"], status.as_u16(), "{name}");
        assert_eq!(body["instance"], path.as_str(), "{name}");
        assert!(body["correlation_id"].is_string(), "{name}");
        assert_eq!(
            body["correlation_id"],
            headers["x-correlation-id"].to_str().unwrap(),
            "{name}"
        );
    }
    let (_, _, body) = call(&router, json_post("/items", r#"{"name":"x"}"#)).await;
    assert_eq!(body["errors"][0]["field"], "count");
    let (_, headers, _) = call(
        &router,
        Request::delete("/items").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(
        headers["allow"], "POST",
        "headers of the original response are kept"
    );
}

#[tokio::test]
async fn timeouts_panics_and_handler_problems() {
    let (router, _id) = app().await;
    let (status, _, body) = call(&router, Request::get("/slow").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["type"], "tag:bazaar.dev,2026:problem/timeout");
    let (status, _, body) =
        call(&router, Request::get("/panic").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        !body["detail"].as_str().unwrap().contains("boom"),
        "internals never leak"
    );
    let (status, _, body) = call(
        &router,
        Request::get("/teapot").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::IM_A_TEAPOT);
    assert_eq!(body["instance"], "/teapot");
}

#[tokio::test]
async fn identity_and_context_headers() {
    let (router, identity) = app().await;
    let request = Request::get("/whoami")
        .header("x-bazaar-identity", identity.token("user-7"))
        .header("x-correlation-id", "abc-123")
        .body(Body::empty())
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-correlation-id"], "abc-123");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"user-7");
    // The token is remembered once verified; the memo answers for exactly that token.
    let token = identity.token("user-8");
    let mut tampered = token.clone().into_bytes();
    let last = tampered.len() - 2;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    for (presented, expected) in [
        (&token, StatusCode::OK),
        (&token, StatusCode::OK),
        (&tampered, StatusCode::UNAUTHORIZED),
    ] {
        let request = Request::get("/whoami")
            .header("x-bazaar-identity", presented.as_str())
            .body(Body::empty())
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), expected);
    }

    let (status, _, body) = call(
        &router,
        Request::get("/healthz").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (status, _, _) = call(
        &router,
        Request::get("/readyz").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = call(
        &router,
        Request::get("/items/5").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let response = router
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let text = String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(text.contains(r#"route="/whoami""#), "{text}");
    assert!(text.contains(r#"route="/items/{id}""#), "{text}");
    assert!(
        !text.contains(r#"route="/items/5""#),
        "raw paths are never labels"
    );
}

#[tokio::test]
async fn readiness_fails_when_a_dependency_cannot_be_resolved() {
    let identity = IdentityFixture::start().await;
    let chassis = Chassis::bind(service_config("demo", &identity, &[]))
        .await
        .unwrap();
    let router = chassis.router(
        Router::new(),
        Readiness {
            database: None,
            dependencies: vec!["nowhere".into()],
        },
        None,
    );
    let (status, _, body) = call(
        &router,
        Request::get("/readyz").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body["checks"]["dependency:nowhere"]
            .as_str()
            .unwrap()
            .contains("nowhere")
    );
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests_then_stops_accepting() {
    let identity = IdentityFixture::start().await;
    let mut config = service_config("demo", &identity, &[]);
    config.http.shutdown_grace = HumanDuration::secs(5);
    let chassis = Chassis::bind(config).await.unwrap();
    let addr = chassis.local_addr();
    let started = std::sync::Arc::new(tokio::sync::Notify::new());
    let signal = started.clone();
    let routes = Router::new().route(
        "/work",
        get(move || {
            let signal = signal.clone();
            async move {
                signal.notify_one();
                tokio::time::sleep(Duration::from_millis(500)).await;
                "done"
            }
        }),
    );
    let router = chassis.router(routes, Readiness::default(), None);
    let stop = chassis::CancellationToken::new();
    let server = tokio::spawn(chassis.serve(router, stop.clone()));
    let in_flight = tokio::spawn(reqwest::get(format!("http://{addr}/work")));
    // Shut down only once the request is being handled.
    started.notified().await;
    stop.cancel();
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "done");
    server.await.unwrap().unwrap();
    assert!(
        reqwest::get(format!("http://{addr}/healthz"))
            .await
            .is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test]
async fn admin_breakers_answer_loopback_and_force_open_stops_calls() {
    let identity = IdentityFixture::start().await;
    let config = service_config("demo", &identity, &[("peer", &identity.url)]);
    let chassis = Chassis::bind(config).await.unwrap();
    let addr = chassis.local_addr();
    let client = chassis.client.clone();
    let router = chassis.router(Router::new(), Readiness::default(), None);
    tokio::spawn(chassis.serve(router, chassis::CancellationToken::new()));
    let http = reqwest::Client::new();

    let r = http
        .post(format!("http://{addr}/admin/breakers/peer/force-open"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let err = client
        .get_json::<Value>("peer", "/anything")
        .await
        .unwrap_err();
    assert!(
        matches!(err, chassis::client::ClientError::CircuitOpen { .. }),
        "{err}"
    );

    let list: Value = http
        .get(format!("http://{addr}/admin/breakers"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["breakers"][0]["name"], "peer");
    assert_eq!(list["breakers"][0]["state"], "FORCED_OPEN");

    let r = http
        .post(format!("http://{addr}/admin/breakers/peer/force-closed"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .post(format!("http://{addr}/admin/breakers/nobody/force-open"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http
        .post(format!("http://{addr}/admin/breakers/peer/explode"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let metrics = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"bazaar_circuit_state{service="demo",breaker="peer"} 0"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn admin_endpoints_refuse_callers_that_are_not_local() {
    // Through oneshot there is no peer address, which counts as not local.
    let (router, _id) = app().await;
    let (status, _, _) = call(
        &router,
        Request::get("/admin/breakers").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_passed_deadline_stops_the_work_and_calls_carry_the_time_left() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let identity = IdentityFixture::start().await;
    // Downstream: reports the deadline it was given.
    let downstream = Chassis::bind(service_config("down", &identity, &[]))
        .await
        .unwrap();
    let down_addr = downstream.local_addr();
    let echo = Router::new().route(
        "/deadline",
        get(|headers: http::HeaderMap| async move {
            axum::Json(serde_json::json!({ "ms": headers.get("x-bazaar-deadline").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()) }))
        }),
    );
    let echo = downstream.router(echo, Readiness::default(), None);
    tokio::spawn(downstream.serve(echo, chassis::CancellationToken::new()));

    let up = Chassis::bind(service_config(
        "up",
        &identity,
        &[("down", &format!("http://{down_addr}"))],
    ))
    .await
    .unwrap();
    let addr = up.local_addr();
    let client = up.client.clone();
    let finished = std::sync::Arc::new(AtomicU32::new(0));
    let done = finished.clone();
    let routes =
        Router::new()
            .route(
                "/slow",
                get(move || {
                    let done = done.clone();
                    async move {
                        tokio::time::sleep(Duration::from_millis(400)).await;
                        done.fetch_add(1, Ordering::SeqCst);
                        "done"
                    }
                }),
            )
            .route(
                "/ask",
                get(move || {
                    let client = client.clone();
                    async move {
                        axum::Json(client.get_json::<Value>("down", "/deadline").await.unwrap())
                    }
                }),
            );
    let router = up.router(routes, Readiness::default(), None);
    tokio::spawn(up.serve(router, chassis::CancellationToken::new()));
    let http = reqwest::Client::new();

    let started = std::time::Instant::now();
    let r = http
        .get(format!("http://{addr}/slow"))
        .header("x-bazaar-deadline", "100")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(
        started.elapsed() < Duration::from_millis(350),
        "answered at the deadline"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        finished.load(Ordering::SeqCst),
        0,
        "the handler's work was stopped"
    );

    let asked: Value = http
        .get(format!("http://{addr}/ask"))
        .header("x-bazaar-deadline", "1500")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ms = asked["ms"].as_u64().unwrap();
    assert!(
        ms > 1000 && ms <= 1500,
        "the downstream was given the time left: {ms}"
    );
    // Without a caller deadline, the downstream gets this call's own deadline (2 s in tests).
    let asked: Value = http
        .get(format!("http://{addr}/ask"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ms = asked["ms"].as_u64().unwrap();
    assert!(ms > 1500 && ms <= 2000, "{ms}");
}

#[tokio::test]
async fn reads_are_retried_on_unavailable_answers_but_not_on_errors_of_the_request() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let seen = std::sync::Arc::new(AtomicU32::new(0));
    let count = seen.clone();
    // 503 twice, then 200; `/broken` always 500; `/down` always 503.
    let app = Router::new()
        .route(
            "/flaky",
            get(move || {
                let n = count.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < 2 {
                        (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response()
                    } else {
                        axum::Json(serde_json::json!({"ok": true})).into_response()
                    }
                }
            }),
        )
        .route(
            "/broken",
            get(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
        )
        .route("/down", get(|| async { StatusCode::SERVICE_UNAVAILABLE }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hits = std::sync::Arc::new(AtomicU32::new(0));
    let counted = hits.clone();
    let app = app.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            counted.fetch_add(1, Ordering::SeqCst);
            next.run(req)
        },
    ));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let identity = IdentityFixture::start().await;
    let chassis = Chassis::bind(service_config("demo", &identity, &[("flaky", &url)]))
        .await
        .unwrap();

    let ok: Value = chassis.client.get_json("flaky", "/flaky").await.unwrap();
    assert_eq!(ok["ok"], true);
    assert_eq!(seen.load(Ordering::SeqCst), 3, "two retries, then success");

    hits.store(0, Ordering::SeqCst);
    let err = chassis
        .client
        .get_json::<Value>("flaky", "/broken")
        .await
        .unwrap_err();
    assert!(matches!(err, chassis::client::ClientError::Status { status, .. } if status == 500));
    assert_eq!(hits.load(Ordering::SeqCst), 1, "a 500 is not retried");

    hits.store(0, Ordering::SeqCst);
    let err = chassis
        .client
        .get_json::<Value>("flaky", "/down")
        .await
        .unwrap_err();
    assert!(err.is_unavailable());
    assert_eq!(hits.load(Ordering::SeqCst), 3, "at most max_attempts");
}
