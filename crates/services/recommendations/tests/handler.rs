//! Co-purchase counts on both engines: pairs counted once per order, whatever the
//! redeliveries; the top list ordered by count.
#![allow(clippy::unwrap_used)]

use chassis::testing::{Engine, TestDb};
use messaging::CloudEvent;
use messaging::consumer::{HandlerError, Meta};
use messaging::inbox::Inbox;
use serde_json::json;

fn meta() -> Meta {
    Meta {
        topic: "orders".into(),
        key: "o".into(),
        partition: 0,
        offset: 1,
        attempt: 1,
    }
}

fn order(id: &str, products: &[&str]) -> CloudEvent {
    event("order.confirmed", id, products)
}

fn event(ty: &str, id: &str, products: &[&str]) -> CloudEvent {
    let items: Vec<_> = products
        .iter()
        .map(|p| json!({"product_id": p, "product_name": format!("name of {p}"), "quantity": 1, "unit_price_cents": 100}))
        .collect();
    CloudEvent::new(
        "/bazaar/orders",
        ty,
        Some(id),
        json!({ "order_id": id, "user_id": "u", "items": items }),
    )
}

async fn run(engine: Engine) {
    let db = TestDb::new(engine);
    let database = chassis::db::Database::connect(&db.url, &recommendations::MIGRATOR)
        .await
        .unwrap();
    let pool = database.pool().clone();
    Inbox::install(&pool).await.unwrap();
    let inbox = Inbox::new("recommendations");
    let first = order("o-1", &["a", "b", "c"]);
    recommendations::handle(&pool, &inbox, first.clone(), meta())
        .await
        .unwrap();
    recommendations::handle(&pool, &inbox, first, meta())
        .await
        .unwrap(); // redelivered
    recommendations::handle(&pool, &inbox, order("o-2", &["a", "b", "b"]), meta())
        .await
        .unwrap();
    // Placed or cancelled orders were not bought: they count for nothing.
    for ty in ["order.created", "order.cancelled"] {
        recommendations::handle(&pool, &inbox, event(ty, "o-9", &["a", "c"]), meta())
            .await
            .unwrap();
    }
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT other_id, orders FROM co_purchases WHERE product_id = 'a' ORDER BY orders DESC, other_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows, [("b".to_owned(), 2), ("c".to_owned(), 1)]);
    let name: String = sqlx::query_scalar("SELECT name FROM product_names WHERE product_id = 'c'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(name, "name of c");
    let mut broken = order("o-3", &["a"]);
    broken.data["items"][0]["product_id"] = json!(7);
    assert!(matches!(
        recommendations::handle(&pool, &inbox, broken, meta()).await,
        Err(HandlerError::Reject(_))
    ));
    let unknown = CloudEvent::new("/bazaar/orders", "order.shipped", Some("o-4"), json!({}));
    assert!(matches!(
        recommendations::handle(&pool, &inbox, unknown, meta()).await,
        Err(HandlerError::Reject(r)) if r.contains("unknown event type")
    ));
    database.close().await;
}

#[tokio::test]
async fn pairs_count_once_per_order_on_sqlite() {
    run(Engine::Sqlite).await;
}

#[tokio::test]
async fn pairs_count_once_per_order_on_postgres() {
    run(Engine::Postgres).await;
}
