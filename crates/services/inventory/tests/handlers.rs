//! Inventory's message handlers on both engines: stock appears with products, a
//! reservation takes all of an order's lines or none, each message acts once, a
//! release gives back exactly what was held, confirmed orders sell, expired
//! reservations return, and concurrent orders never oversell.
#![allow(clippy::unwrap_used)]

use chassis::settings::SagaMode;
use chassis::testing::{Engine, TestDb};
use inventory::{Inventory, Settings};
use messaging::CloudEvent;
use messaging::consumer::{HandlerError, Meta};
use serde_json::{Value, json};
use sqlx::Row;

fn meta() -> Meta {
    Meta {
        topic: "t".into(),
        key: "k".into(),
        partition: 0,
        offset: 1,
        attempt: 1,
    }
}

fn product(id: &str) -> CloudEvent {
    CloudEvent::new(
        "/bazaar/products",
        "product.created",
        Some(id),
        json!({"product_id": id, "name": "Mug", "description": "", "price_cents": 100, "currency": "EUR"}),
    )
}

fn reserve(order: &str, lines: &[(&str, i64)]) -> CloudEvent {
    let items: Vec<Value> = lines
        .iter()
        .map(|(p, q)| json!({"product_id": p, "quantity": q}))
        .collect();
    CloudEvent::new(
        "/bazaar/orders",
        "inventory.reserve",
        Some(order),
        json!({"order_id": order, "user_id": "u-1", "total_cents": 500, "currency": "EUR", "items": items}),
    )
}

fn command(ty: &str, order: &str) -> CloudEvent {
    CloudEvent::new(
        "/bazaar/orders",
        ty,
        Some(order),
        json!({"order_id": order}),
    )
}

/// (available, reserved, sold) of a product.
async fn stock(i: &Inventory, product: &str) -> (i64, i64, i64) {
    let r = sqlx::query("SELECT available, reserved, sold FROM stock WHERE product_id = $1")
        .bind(product)
        .fetch_one(&i.pool)
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// The types of the events waiting in the outbox for `order`.
async fn emitted(i: &Inventory, order: &str) -> Vec<String> {
    sqlx::query("SELECT payload FROM messaging_outbox WHERE event_key = $1 ORDER BY seq")
        .bind(order)
        .fetch_all(&i.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let e: Value = serde_json::from_str(&r.get::<String, _>(0)).unwrap();
            match e["data"]["reason"].as_str() {
                Some(reason) => format!("{} {reason}", e["type"].as_str().unwrap()),
                None => e["type"].as_str().unwrap().to_owned(),
            }
        })
        .collect()
}

async fn setup(
    engine: Engine,
    stock: i64,
    mode: SagaMode,
) -> (Inventory, chassis::db::Database, TestDb) {
    let db = TestDb::new(engine);
    let database = chassis::db::Database::connect(&db.url, &inventory::MIGRATOR)
        .await
        .unwrap();
    let settings = Settings {
        initial_stock: stock,
        ..Settings::default()
    };
    let i = Inventory::new(database.pool().clone(), &settings, mode)
        .await
        .unwrap();
    for p in ["mug", "pen"] {
        i.on_product(product(p), meta()).await.unwrap();
    }
    (i, database, db)
}

async fn lifecycle(engine: Engine) {
    let (i, database, _db) = setup(engine, 10, SagaMode::Orchestration).await;
    // A product announced twice keeps its stock.
    i.on_product(product("mug"), meta()).await.unwrap();
    assert_eq!(stock(&i, "mug").await, (10, 0, 0));

    let first = reserve("o-1", &[("mug", 3), ("pen", 1), ("mug", 1)]);
    for _ in 0..3 {
        i.on_command(first.clone(), meta()).await.unwrap();
    }
    assert_eq!(
        stock(&i, "mug").await,
        (6, 4, 0),
        "lines of one product add up, once"
    );
    assert_eq!(stock(&i, "pen").await, (9, 1, 0));
    // The orchestrator asking again (a new command) gets the same answer, no new stock moved.
    i.on_command(reserve("o-1", &[("mug", 4), ("pen", 1)]), meta())
        .await
        .unwrap();
    assert_eq!(stock(&i, "mug").await, (6, 4, 0));
    assert_eq!(
        emitted(&i, "o-1").await,
        ["inventory.reserved", "inventory.reserved"]
    );

    // More than is left: nothing taken, all or none.
    i.on_command(reserve("o-2", &[("pen", 1), ("mug", 7)]), meta())
        .await
        .unwrap();
    assert_eq!(
        (stock(&i, "mug").await, stock(&i, "pen").await),
        ((6, 4, 0), (9, 1, 0))
    );
    assert_eq!(
        emitted(&i, "o-2").await,
        ["inventory.rejected out_of_stock"]
    );

    // Released twice: given back once.
    i.on_command(command("inventory.release", "o-1"), meta())
        .await
        .unwrap();
    i.on_command(command("inventory.release", "o-1"), meta())
        .await
        .unwrap();
    assert_eq!(stock(&i, "mug").await, (10, 0, 0));

    // A release that overtook its reserve: the late reserve is refused.
    i.on_command(command("inventory.release", "o-3"), meta())
        .await
        .unwrap();
    i.on_command(reserve("o-3", &[("mug", 1)]), meta())
        .await
        .unwrap();
    assert_eq!(stock(&i, "mug").await, (10, 0, 0));
    assert_eq!(
        emitted(&i, "o-3").await,
        ["inventory.released", "inventory.rejected cancelled"]
    );

    // Confirmed: sold.
    i.on_command(reserve("o-4", &[("mug", 2)]), meta())
        .await
        .unwrap();
    i.on_order(
        CloudEvent::new(
            "/bazaar/orders",
            "order.confirmed",
            Some("o-4"),
            json!({"order_id": "o-4"}),
        ),
        meta(),
    )
    .await
    .unwrap();
    assert_eq!(stock(&i, "mug").await, (8, 0, 2));
    // In orchestration an order.created does not reserve (the orchestrator commands it).
    i.on_order(
        CloudEvent::new(
            "/bazaar/orders",
            "order.created",
            Some("o-5"),
            reserve("o-5", &[("mug", 1)]).data,
        ),
        meta(),
    )
    .await
    .unwrap();
    assert_eq!(stock(&i, "mug").await, (8, 0, 2));

    // Expired: released when its time is up, not before.
    i.on_command(reserve("o-6", &[("pen", 2)]), meta())
        .await
        .unwrap();
    let now = chassis::clock::now_millis();
    assert_eq!(i.expire(now).await.unwrap(), 0);
    assert_eq!(i.expire(now + 601_000).await.unwrap(), 1);
    assert_eq!(stock(&i, "pen").await, (10, 0, 0));
    assert_eq!(
        emitted(&i, "o-6").await,
        ["inventory.reserved", "inventory.released expired"]
    );

    // A product inventory has not heard of yet: asked again, then out of stock.
    let unknown = reserve("o-9", &[("lamp", 1)]);
    assert!(
        matches!(i.on_command(unknown.clone(), meta()).await, Err(HandlerError::Retry(r)) if r.contains("lamp"))
    );
    let last = Meta {
        attempt: 3,
        ..meta()
    };
    i.on_command(unknown, last).await.unwrap();
    assert_eq!(
        emitted(&i, "o-9").await,
        ["inventory.rejected out_of_stock"]
    );

    // Bad messages are rejected with a reason.
    let mut bad = reserve("o-7", &[("mug", 0)]);
    assert!(
        matches!(i.on_command(bad.clone(), meta()).await, Err(HandlerError::Reject(r)) if r.contains("not positive"))
    );
    bad.data = json!({"order_id": "o-7"});
    assert!(
        matches!(i.on_command(bad, meta()).await, Err(HandlerError::Reject(r)) if r.contains("inventory.reserve"))
    );
    let unknown = command("inventory.teleport", "o-8");
    assert!(matches!(
        i.on_command(unknown, meta()).await,
        Err(HandlerError::Reject(_))
    ));

    // The database refuses negative stock and broken sums whatever the code does.
    for breach in [
        "UPDATE stock SET available = -1, reserved = reserved + available + 1 WHERE product_id = 'mug'",
        "UPDATE stock SET sold = sold + 1 WHERE product_id = 'mug'",
    ] {
        assert!(
            sqlx::query(breach).execute(&i.pool).await.is_err(),
            "{breach}"
        );
    }
    database.close().await;
}

/// 30 orders of 5 mugs race for 100: exactly 20 are held, the rest rejected, and
/// the mug's stock adds up.
async fn no_oversell(engine: Engine) {
    let (i, database, _db) = setup(engine, 100, SagaMode::Choreography).await;
    let mut tasks = Vec::new();
    for n in 0..30 {
        let i = i.clone();
        tasks.push(tokio::spawn(async move {
            let event = CloudEvent::new(
                "/bazaar/orders",
                "order.created",
                Some(&format!("c-{n}")),
                reserve(&format!("c-{n}"), &[("mug", 5)]).data,
            );
            // Redelivered until it goes through, as the consumer runner would.
            loop {
                match i.on_order(event.clone(), meta()).await {
                    Ok(()) => return,
                    Err(HandlerError::Retry(_)) => tokio::task::yield_now().await,
                    Err(e) => panic!("{e}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(stock(&i, "mug").await, (0, 100, 0));
    let held: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM reservations WHERE status = 'held'")
        .fetch_one(&i.pool)
        .await
        .unwrap();
    assert_eq!(held, 20);
    database.close().await;
}

/// A sale, a release and an expiry of the same reservations race (as they may on
/// PostgreSQL with several instances): each reservation ends in one state, and its
/// stock moved once, to where that state says.
async fn settling_races(engine: Engine) {
    let (i, database, _db) = setup(engine, 100, SagaMode::Choreography).await;
    let orders: Vec<String> = (0..12).map(|n| format!("s-{n}")).collect();
    for order in &orders {
        let created = CloudEvent::new(
            "/bazaar/orders",
            "order.created",
            Some(order),
            reserve(order, &[("mug", 2)]).data,
        );
        i.on_order(created, meta()).await.unwrap();
    }
    assert_eq!(stock(&i, "mug").await, (76, 24, 0));
    let until_done = |i: Inventory, event: CloudEvent| async move {
        loop {
            match i.on_order(event.clone(), meta()).await {
                Ok(()) => return,
                Err(HandlerError::Retry(_)) => tokio::task::yield_now().await,
                Err(e) => panic!("{e}"),
            }
        }
    };
    let mut tasks = Vec::new();
    for order in &orders {
        for ty in ["order.confirmed", "order.cancelled"] {
            tasks.push(tokio::spawn(until_done(i.clone(), command(ty, order))));
        }
    }
    let expiring = i.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            if expiring.expire(i64::MAX).await.is_ok() {
                return;
            }
            tokio::task::yield_now().await;
        }
    }));
    for t in tasks {
        t.await.unwrap();
    }
    let count = |status: &'static str| {
        let pool = i.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM reservations WHERE status = $1")
                .bind(status)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let (sold, released, expired) = (
        count("committed").await,
        count("released").await,
        count("expired").await,
    );
    assert_eq!(sold + released + expired, 12);
    assert_eq!(
        stock(&i, "mug").await,
        (100 - 2 * sold, 0, 2 * sold),
        "{sold} sold, {released} released, {expired} expired"
    );
    database.close().await;
}

#[tokio::test]
async fn settling_races_move_stock_once_on_sqlite() {
    settling_races(Engine::Sqlite).await;
}

#[tokio::test]
async fn settling_races_move_stock_once_on_postgres() {
    settling_races(Engine::Postgres).await;
}

#[tokio::test]
async fn reservations_on_sqlite() {
    lifecycle(Engine::Sqlite).await;
}

#[tokio::test]
async fn reservations_on_postgres() {
    lifecycle(Engine::Postgres).await;
}

#[tokio::test]
async fn concurrent_orders_never_oversell_on_sqlite() {
    no_oversell(Engine::Sqlite).await;
}

#[tokio::test]
async fn concurrent_orders_never_oversell_on_postgres() {
    no_oversell(Engine::Postgres).await;
}
