//! orders and products on real ports, on fresh SQLite and PostgreSQL databases.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chassis::testing::{Engine, IdentityFixture, TestDb, service_config};
use serde_json::{Value, json};

struct Shop {
    orders: String,
    http: reqwest::Client,
    identity: IdentityFixture,
    product_ids: Vec<String>,
    prices: Vec<i64>,
    _dbs: (TestDb, TestDb),
}

async fn spawn(engine: Engine) -> Shop {
    let identity = IdentityFixture::start().await;
    let products_db = TestDb::new(engine);
    let products = products::Application::build(products::Config {
        service: service_config(products::NAME, &identity, &[]),
        database_url: products_db.url.clone().into(),
        settings: products::Settings::default(),
    })
    .await
    .unwrap();
    let products_url = format!("http://127.0.0.1:{}", products.port());
    tokio::spawn(products.run_until_stopped(chassis::CancellationToken::new()));
    let shop = spawn_orders(engine, &identity, &products_url).await;
    let http = reqwest::Client::new();
    let page: Value = http
        .get(format!("{products_url}/products?limit=5"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = page["items"].as_array().unwrap();
    Shop {
        orders: shop.0,
        http,
        product_ids: items
            .iter()
            .map(|p| p["id"].as_str().unwrap().to_owned())
            .collect(),
        prices: items
            .iter()
            .map(|p| p["price_cents"].as_i64().unwrap())
            .collect(),
        identity,
        _dbs: (products_db, shop.1),
    }
}

async fn spawn_orders(
    engine: Engine,
    identity: &IdentityFixture,
    products_url: &str,
) -> (String, TestDb) {
    let db = TestDb::new(engine);
    let app = orders::Application::build(orders::Config {
        service: service_config(orders::NAME, identity, &[("products", products_url)]),
        database_url: db.url.clone().into(),
        settings: orders::Settings::default(),
        saga_mode: chassis::settings::SagaMode::Orchestration,
    })
    .await
    .unwrap();
    let url = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped(chassis::CancellationToken::new()));
    (url, db)
}

impl Shop {
    fn post(&self, user: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}/orders", self.orders))
            .header("x-bazaar-identity", self.identity.token(user))
    }
    async fn get(&self, user: &str, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.orders))
            .header("x-bazaar-identity", self.identity.token(user))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }
    async fn count(&self, user: &str) -> usize {
        self.get(user, "/orders?limit=100").await.1["items"]
            .as_array()
            .unwrap()
            .len()
    }
}

async fn ordering(engine: Engine) {
    let shop = spawn(engine).await;
    let user = uuid::Uuid::now_v7().to_string();
    let body = json!({"items": [
        {"product_id": shop.product_ids[0], "quantity": 2},
        {"product_id": shop.product_ids[1], "quantity": 1},
    ]});
    let r = shop.post(&user).json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let order: Value = r.json().await.unwrap();
    assert_eq!(order["status"], "PENDING");
    assert_eq!(order["items"][0]["unit_price_cents"], shop.prices[0]);
    assert_eq!(order["total_cents"], shop.prices[0] * 2 + shop.prices[1]);
    assert_eq!(
        location,
        format!("/orders/{}", order["id"].as_str().unwrap())
    );

    let (status, mut read) = shop.get(&user, &location).await;
    assert_eq!(status, 200);
    // Its saga started in the same transaction: the reservation was asked for.
    let steps = read.as_object_mut().unwrap().remove("steps").unwrap();
    assert_eq!(
        (&steps[0]["step"], &steps[0]["what"]),
        (&json!("reserve"), &json!("sent"))
    );
    assert_eq!(read, order);

    // Another user cannot see it, and does not learn it exists.
    let (status, _) = shop.get(&uuid::Uuid::now_v7().to_string(), &location).await;
    assert_eq!(status, 404);

    // Pagination, newest first.
    for _ in 0..3 {
        shop.post(&user).json(&body).send().await.unwrap();
    }
    let (_, page) = shop.get(&user, "/orders?limit=3").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 3);
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, rest) = shop
        .get(&user, &format!("/orders?limit=3&cursor={cursor}"))
        .await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 1);
    assert_eq!(rest["items"][0]["id"], order["id"]);
    assert!(rest["next_cursor"].is_null());
}

#[tokio::test]
async fn ordering_on_sqlite() {
    ordering(Engine::Sqlite).await;
}

#[tokio::test]
async fn ordering_on_postgres() {
    ordering(Engine::Postgres).await;
}

#[tokio::test]
async fn idempotency_key_gives_one_order() {
    let shop = spawn(Engine::Sqlite).await;
    let user = uuid::Uuid::now_v7().to_string();
    let body = json!({"items": [{"product_id": shop.product_ids[2], "quantity": 1}]});
    let send = |body: Value| {
        shop.post(&user)
            .header("idempotency-key", "k-1")
            .json(&body)
            .send()
    };
    // Concurrent retries of one request.
    let (a, b) = tokio::join!(send(body.clone()), send(body.clone()));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (201, 201));
    let (a, b): (Value, Value) = (a.json().await.unwrap(), b.json().await.unwrap());
    assert_eq!(a["id"], b["id"]);
    let again = send(body.clone()).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap()["id"], a["id"]);

    let other = json!({"items": [{"product_id": shop.product_ids[2], "quantity": 2}]});
    let r = send(other).await.unwrap();
    assert_eq!(r.status().as_u16(), 422);
    assert_eq!(shop.count(&user).await, 1);
}

#[tokio::test]
async fn products_down_is_a_clear_503() {
    let identity = IdentityFixture::start().await;
    // A port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (orders, _db) = spawn_orders(Engine::Sqlite, &identity, &format!("http://{dead}")).await;
    let r = reqwest::Client::new()
        .post(format!("{orders}/orders"))
        .header("x-bazaar-identity", identity.token("u1"))
        .json(&json!({"items": [{"product_id": uuid::Uuid::now_v7(), "quantity": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert!(r.headers().contains_key("retry-after"));
}

/// A delivery's particulars for the catalog's consumer.
fn catalog_meta() -> messaging::consumer::Meta {
    messaging::consumer::Meta {
        topic: orders::catalog::TOPIC.into(),
        key: "k".into(),
        partition: 0,
        offset: 1,
        attempt: 1,
    }
}

/// `product.created` as products publishes it.
fn product_created(id: uuid::Uuid, price_cents: i64) -> messaging::CloudEvent {
    messaging::CloudEvent::new(
        "/bazaar/products",
        "product.created",
        Some(&id.to_string()),
        json!({"product_id": id, "name": "Teapot", "description": "Holds tea",
               "price_cents": price_cents, "currency": "EUR"}),
    )
}

/// With the catalog's prices replicated from its events, orders keeps taking
/// orders for the products it knows while products is down; one it does not know yet
/// still needs products, and gets the same clear 503.
async fn replicated_prices(engine: Engine) {
    use messaging::consumer::HandlerError;
    let identity = IdentityFixture::start().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (orders, db) = spawn_orders(engine, &identity, &format!("http://{dead}")).await;
    let database = chassis::db::Database::connect(&db.url, &orders::MIGRATOR)
        .await
        .unwrap();
    let inbox = messaging::inbox::Inbox::new(orders::NAME);
    // The service's own copy is not this one: it reads what this one writes.
    let catalog = orders::catalog::Catalog::default();
    let meta = catalog_meta();
    let known = uuid::Uuid::now_v7();
    let event = product_created(known, 1250);
    for _ in 0..2 {
        // The second is a redelivery: claimed once, applied once.
        catalog
            .handle(database.pool(), &inbox, &event, &meta)
            .await
            .unwrap();
    }
    let negative = product_created(uuid::Uuid::now_v7(), -1);
    assert!(matches!(
        catalog
            .handle(database.pool(), &inbox, &negative, &meta)
            .await,
        Err(HandlerError::Reject(_))
    ));
    let place = |items: Value| {
        reqwest::Client::new()
            .post(format!("{orders}/orders"))
            .header("x-bazaar-identity", identity.token("u1"))
            .json(&json!({ "items": items }))
            .send()
    };

    let r = place(json!([{"product_id": known, "quantity": 3}]))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let order: Value = r.json().await.unwrap();
    assert_eq!(order["items"][0]["name"], "Teapot");
    assert_eq!(order["items"][0]["unit_price_cents"], 1250);
    assert_eq!(
        (&order["total_cents"], &order["currency"]),
        (&json!(3750), &json!("EUR"))
    );

    let unknown = uuid::Uuid::now_v7();
    let r = place(
        json!([{"product_id": known, "quantity": 1}, {"product_id": unknown, "quantity": 1}]),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
}

#[tokio::test]
async fn replicated_prices_on_sqlite() {
    replicated_prices(Engine::Sqlite).await;
}

#[tokio::test]
async fn replicated_prices_on_postgres() {
    replicated_prices(Engine::Postgres).await;
}

#[tokio::test]
async fn a_price_change_applied_here_is_read_at_once() {
    let db = TestDb::new(Engine::Sqlite);
    let database = chassis::db::Database::connect(&db.url, &orders::MIGRATOR)
        .await
        .unwrap();
    let (pool, inbox) = (database.pool(), messaging::inbox::Inbox::new(orders::NAME));
    messaging::inbox::Inbox::install(pool).await.unwrap();
    let catalog = orders::catalog::Catalog::default();
    let id = uuid::Uuid::now_v7();
    let meta = catalog_meta();
    assert!(catalog.known(pool, &[id]).await.unwrap().is_empty());
    catalog
        .handle(pool, &inbox, &product_created(id, 300), &meta)
        .await
        .unwrap();
    assert_eq!(
        catalog.known(pool, &[id]).await.unwrap()[&id].price_cents,
        300
    );
    catalog
        .handle(pool, &inbox, &product_created(id, 450), &meta)
        .await
        .unwrap();
    assert_eq!(
        catalog.known(pool, &[id]).await.unwrap()[&id].price_cents,
        450
    );
}
