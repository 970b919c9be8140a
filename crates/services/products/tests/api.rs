//! The products service on a real port, against fresh SQLite and PostgreSQL databases.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chassis::testing::{Engine, IdentityFixture, TestDb, service_config};
use products::{Application, Config, Settings};
use serde_json::Value;

struct App {
    url: String,
    http: reqwest::Client,
    _db: TestDb,
    _identity: IdentityFixture,
}

async fn spawn(engine: Engine) -> App {
    let db = TestDb::new(engine);
    let identity = IdentityFixture::start().await;
    let app = Application::build(Config {
        service: service_config(products::NAME, &identity, &[]),
        database_url: db.url.clone().into(),
        settings: Settings::default(),
    })
    .await
    .unwrap();
    let url = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped(chassis::CancellationToken::new()));
    App {
        url,
        http: reqwest::Client::new(),
        _db: db,
        _identity: identity,
    }
}

impl App {
    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

async fn catalog_behaviour(engine: Engine) {
    let app = spawn(engine).await;

    // Walk every page: 50 seeded products, each once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/products?limit=7&cursor={c}"),
            None => "/products?limit=7".to_owned(),
        };
        let (status, page) = app.get(&path).await;
        assert_eq!(status, 200, "{page}");
        for item in page["items"].as_array().unwrap() {
            for field in ["id", "name", "description", "price_cents", "currency"] {
                assert!(!item[field].is_null(), "{field} missing in {item}");
            }
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 50);
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 50);

    // Search is case-insensitive; LIKE wildcards are literal.
    let (_, found) = app.get("/products?q=BACKPACK&limit=100").await;
    assert_eq!(found["items"].as_array().unwrap().len(), 10);
    let (_, none) = app.get("/products?q=%25").await;
    assert_eq!(none["items"].as_array().unwrap().len(), 0);

    // Batch read keeps the asked order and leaves unknown ids out.
    let unknown = uuid::Uuid::now_v7();
    let (status, batch) = app
        .get(&format!("/products?ids={},{unknown},{}", seen[3], seen[1]))
        .await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = batch["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [seen[3].as_str(), seen[1].as_str()]);

    let (status, one) = app.get(&format!("/products/{}", seen[0])).await;
    assert_eq!(status, 200);
    assert_eq!(one["id"], seen[0].as_str());
}

#[tokio::test]
async fn catalog_on_sqlite() {
    catalog_behaviour(Engine::Sqlite).await;
}

#[tokio::test]
async fn catalog_on_postgres() {
    catalog_behaviour(Engine::Postgres).await;
}

#[tokio::test]
async fn bad_reads_are_clear_problems() {
    let app = spawn(Engine::Sqlite).await;
    for (path, status) in [
        (format!("/products/{}", uuid::Uuid::now_v7()), 404),
        ("/products/not-a-uuid".to_owned(), 400),
        ("/products?limit=0".to_owned(), 422),
        ("/products?limit=abc".to_owned(), 400),
        ("/products?cursor=!!!".to_owned(), 400),
        ("/products?ids=1,2".to_owned(), 422),
        ("/products?ids=".to_owned(), 422),
        (format!("/products?q={}", "x".repeat(101)), 422),
        ("/nothing-here".to_owned(), 404),
    ] {
        let r = app
            .http
            .get(format!("{}{path}", app.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{path}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{path}"
        );
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["status"], status, "{path}");
        assert!(body["title"].is_string() && body["type"].is_string());
        assert_eq!(body["instance"], path.split('?').next().unwrap());
    }
    let r = app
        .http
        .delete(format!("{}/products", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
}

#[tokio::test]
async fn standard_endpoints_and_correlation() {
    let app = spawn(Engine::Sqlite).await;
    let (status, health) = app.get("/healthz").await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    let (status, ready) = app.get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["checks"]["database"], "ok");
    let (status, openapi) = app.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(openapi["paths"]["/products/{id}"]["get"].is_object());

    let r = app
        .http
        .get(format!("{}/products?limit=1", app.url))
        .header("x-correlation-id", "test-corr-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-correlation-id"], "test-corr-1");
    let r = app
        .http
        .get(format!("{}/products?limit=1", app.url))
        .send()
        .await
        .unwrap();
    assert!(
        !r.headers()["x-correlation-id"].is_empty(),
        "generated when absent"
    );

    app.get(&format!("/products/{}", uuid::Uuid::now_v7()))
        .await;
    let metrics = app
        .http
        .get(format!("{}/metrics", app.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("http_server_request_duration_seconds_bucket{"));
    assert!(metrics.contains("route=\"/products/{id}\""), "{metrics}");
    assert!(
        !metrics.contains("route=\"/products/0"),
        "raw paths must never be labels"
    );
}
