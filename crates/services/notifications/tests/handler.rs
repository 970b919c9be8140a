//! The order-event handler on both engines: one message per event however often it
//! is delivered; events it cannot use are rejected (dead-lettered), others ignored.
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

fn created(order: &str) -> CloudEvent {
    CloudEvent::new(
        "/bazaar/orders",
        "order.created",
        Some(order),
        json!({
            "order_id": order, "user_id": "u-1", "status": "PENDING", "total_cents": 1250,
            "currency": "EUR", "created_at": "2026-11-26T10:00:00Z",
            "items": [{"product_id": "p", "product_name": "Mug", "quantity": 3, "unit_price_cents": 416}],
        }),
    )
}

async fn run(engine: Engine) {
    let db = TestDb::new(engine);
    let database = chassis::db::Database::connect(&db.url, &notifications::MIGRATOR)
        .await
        .unwrap();
    let pool = database.pool().clone();
    Inbox::install(&pool).await.unwrap();
    let inbox = Inbox::new("notifications");
    let event = created("o-1");
    for _ in 0..3 {
        notifications::handle(&pool, &inbox, event.clone(), meta())
            .await
            .unwrap();
    }
    let texts: Vec<String> =
        sqlx::query_scalar("SELECT text FROM notifications WHERE user_id = 'u-1'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(texts, ["We received your order of 3 items: 12.50 EUR."]);
    // Its end: one message, whichever way and however often it is delivered.
    let mut cancelled = created("o-1");
    cancelled.ty = "order.cancelled".into();
    cancelled.data["reason"] = json!("payment_declined");
    for _ in 0..2 {
        notifications::handle(&pool, &inbox, cancelled.clone(), meta())
            .await
            .unwrap();
    }
    let kinds: Vec<(String, String)> =
        sqlx::query_as("SELECT kind, text FROM notifications WHERE order_id = 'o-1' ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        kinds[1],
        (
            "order_cancelled".to_owned(),
            "Your order was cancelled: the payment was declined. You were not charged.".to_owned()
        )
    );
    assert_eq!(kinds.len(), 2);
    // An order that timed out may have been charged: its notice says the
    // payment comes back rather than that none was taken.
    let mut timed_out = created("o-5");
    timed_out.ty = "order.cancelled".into();
    timed_out.data["reason"] = json!("timeout");
    notifications::handle(&pool, &inbox, timed_out, meta())
        .await
        .unwrap();
    let text: String = sqlx::query_scalar("SELECT text FROM notifications WHERE order_id = 'o-5'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        text,
        "Your order was cancelled: it could not be completed in time. \
         Any payment taken for it is refunded."
    );

    let mut broken = created("o-2");
    broken.data["items"] = json!("not a list");
    assert!(matches!(
        notifications::handle(&pool, &inbox, broken, meta()).await,
        Err(HandlerError::Reject(r)) if r.contains("items")
    ));
    let mut anonymous = created("o-3");
    anonymous.data.as_object_mut().unwrap().remove("user_id");
    assert!(matches!(
        notifications::handle(&pool, &inbox, anonymous, meta()).await,
        Err(HandlerError::Reject(r)) if r.contains("user_id")
    ));
    let unknown = CloudEvent::new("/bazaar/orders", "order.archived", Some("o-4"), json!({}));
    assert!(matches!(
        notifications::handle(&pool, &inbox, unknown, meta()).await,
        Err(HandlerError::Reject(r)) if r.contains("unknown event type `order.archived`")
    ));
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM notifications")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 3);
    database.close().await;
}

#[tokio::test]
async fn one_message_per_event_on_sqlite() {
    run(Engine::Sqlite).await;
}

#[tokio::test]
async fn one_message_per_event_on_postgres() {
    run(Engine::Postgres).await;
}
