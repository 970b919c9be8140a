//! The HTTP reads on both engines (`oneshot`, no socket), and the built service.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::body::Body;
use chassis::config::HumanDuration;
use chassis::testing::{Engine, IdentityFixture, TestDb, service_config};
use http_body_util::BodyExt;
use messaging::CloudEvent;
use messaging::consumer::Meta;
use messaging::inbox::Inbox;
use messaging::outbox::Outbox;
use payments::{Payments, Provider, Settings};
use serde_json::{Value, json};
use tower::ServiceExt;

fn meta() -> Meta {
    Meta {
        topic: "payments.commands".into(),
        key: "o".into(),
        partition: 0,
        offset: 1,
        attempt: 1,
    }
}

fn command(ty: &str, order: &str) -> CloudEvent {
    CloudEvent::new(
        "/bazaar/orders",
        ty,
        Some(order),
        json!({"order_id": order, "user_id": "u-1", "amount_cents": 700, "currency": "EUR"}),
    )
}

async fn get(router: &axum::Router, uri: &str) -> (u16, Value) {
    let response = router
        .clone()
        .oneshot(axum::http::Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

async fn reads(engine: Engine) {
    let db = TestDb::new(engine);
    let database = chassis::db::Database::connect(&db.url, &payments::MIGRATOR)
        .await
        .unwrap();
    let pool = database.pool().clone();
    Inbox::install(&pool).await.unwrap();
    Outbox::install(&pool).await.unwrap();
    let settings = Settings {
        latency_min: HumanDuration::millis(0),
        latency_max: HumanDuration::millis(0),
        ..Settings::default()
    };
    let p = Payments::new(
        pool.clone(),
        Outbox::new(),
        Provider::new(&settings).unwrap(),
    );
    // a: charged; b: charged and refunded; c: refunded before any charge.
    for (ty, order) in [
        ("payments.charge", "a"),
        ("payments.charge", "b"),
        ("payments.refund", "b"),
        ("payments.refund", "c"),
        ("payments.charge", "c"),
    ] {
        p.command(command(ty, order), meta()).await.unwrap();
    }
    let router = payments::routes::router(pool);

    let (status, b) = get(&router, "/payments/b").await;
    assert_eq!(status, 200);
    assert_eq!(b["order_id"], "b");
    assert_eq!(b["charges"][0]["status"], "charged");
    assert_eq!(b["charges"][0]["amount_cents"], 700);
    assert_eq!(b["charges"][0]["currency"], "EUR");
    assert!(
        b["charges"][0]["created_at"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    assert_eq!(b["refunds"][0]["amount_cents"], 700);
    assert!(b["refunds"][0]["refund_id"].is_string());
    let (_, c) = get(&router, "/payments/c").await;
    assert_eq!(c["charges"], json!([]));
    assert_eq!(c["refunds"][0]["refund_id"], Value::Null);
    assert_eq!(c["refunds"][0]["amount_cents"], 0);
    let (status, none) = get(&router, "/payments/never%20seen").await;
    assert_eq!(status, 200);
    assert_eq!(
        none,
        json!({"order_id": "never seen", "charges": [], "refunds": []})
    );

    let (status, first) = get(&router, "/payments?limit=2").await;
    assert_eq!(status, 200);
    let ids = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["order_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&first), ["a", "b"]);
    assert_eq!(first["items"][1], b);
    let next = first["next"].as_str().unwrap();
    let (_, second) = get(&router, &format!("/payments?limit=2&after={next}")).await;
    assert_eq!(ids(&second), ["c"]);
    assert_eq!(second["next"], Value::Null);
    let (_, all) = get(&router, "/payments").await;
    assert_eq!(ids(&all), ["a", "b", "c"]);

    for bad in ["/payments?limit=0", "/payments?limit=501"] {
        let (status, problem) = get(&router, bad).await;
        assert_eq!(status, 422, "{bad}");
        assert_eq!(problem["errors"][0]["field"], "limit");
    }
    let (status, _) = get(&router, "/payments?limit=ten").await;
    assert_eq!(status, 400);
    let (status, problem) = get(&router, "/payments?after=%25%25").await;
    assert_eq!(status, 400);
    assert!(problem["detail"].as_str().unwrap().contains("after"));
    database.close().await;
}

#[tokio::test]
async fn reads_on_sqlite() {
    reads(Engine::Sqlite).await;
}

#[tokio::test]
async fn reads_on_postgres() {
    reads(Engine::Postgres).await;
}

#[tokio::test]
async fn the_built_service_serves_its_reads_metrics_and_contract() {
    let identity = IdentityFixture::start().await;
    let db = TestDb::new(Engine::Sqlite);
    let app = payments::Application::build(payments::Config {
        service: service_config(payments::NAME, &identity, &[]),
        database_url: db.url.clone().into(),
        settings: Settings::default(),
        saga_mode: chassis::settings::SagaMode::Choreography,
    })
    .await
    .unwrap();
    let url = format!("http://127.0.0.1:{}", app.port());
    let stop = chassis::CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(stop.clone()));
    let http = reqwest::Client::new();
    let read = |path: &str| http.get(format!("{url}{path}")).send();
    assert_eq!(read("/readyz").await.unwrap().status(), 200);
    let order: Value = read("/payments/o-1").await.unwrap().json().await.unwrap();
    assert_eq!(order["charges"], json!([]));
    let metrics = read("/metrics").await.unwrap().text().await.unwrap();
    assert!(metrics.contains("payments_charges"), "{metrics}");
    let doc: Value = read("/openapi.json").await.unwrap().json().await.unwrap();
    assert!(doc["paths"]["/payments/{order_id}"].is_object());
    assert!(doc["paths"]["/payments"].is_object());
    stop.cancel();
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn invalid_settings_stop_the_build() {
    let identity = IdentityFixture::start().await;
    let db = TestDb::new(Engine::Sqlite);
    let built = payments::Application::build(payments::Config {
        service: service_config(payments::NAME, &identity, &[]),
        database_url: db.url.clone().into(),
        settings: Settings {
            outages: vec!["whenever".into()],
            ..Settings::default()
        },
        saga_mode: chassis::settings::SagaMode::Orchestration,
    })
    .await;
    let error = format!("{:#}", built.err().unwrap());
    assert!(error.contains("payments.outages"), "{error}");
}
