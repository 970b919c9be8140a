//! The handlers on both engines, driven directly: an order is charged once however
//! often it is asked, refunds are answered once and idempotently, a refund before the
//! charge wins, an outage answers nothing, and bad messages are rejected.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chassis::config::HumanDuration;
use chassis::testing::{Engine, TestDb};
use messaging::CloudEvent;
use messaging::consumer::{HandlerError, Meta};
use messaging::inbox::Inbox;
use messaging::outbox::Outbox;
use payments::{Payments, Provider, Settings};
use serde_json::{Value, json};
use sqlx::AnyPool;

struct Fixture {
    pool: AnyPool,
    _db: TestDb,
}

async fn fixture(engine: Engine) -> Fixture {
    let db = TestDb::new(engine);
    let database = chassis::db::Database::connect(&db.url, &payments::MIGRATOR)
        .await
        .unwrap();
    let pool = database.pool().clone();
    Inbox::install(&pool).await.unwrap();
    Outbox::install(&pool).await.unwrap();
    Fixture { pool, _db: db }
}

fn settings(decline_rate: f64, outages: &[&str]) -> Settings {
    Settings {
        decline_rate,
        latency_min: HumanDuration::millis(0),
        latency_max: HumanDuration::millis(2),
        outages: outages.iter().map(|s| s.to_string()).collect(),
        ..Settings::default()
    }
}

fn handlers(f: &Fixture, decline_rate: f64, outages: &[&str]) -> Payments {
    let provider = Provider::new(&settings(decline_rate, outages)).unwrap();
    Payments::new(f.pool.clone(), Outbox::new(), provider)
}

fn meta() -> Meta {
    Meta {
        topic: "payments.commands".into(),
        key: "o".into(),
        partition: 0,
        offset: 1,
        attempt: 1,
    }
}

fn charge_cmd(order: &str) -> CloudEvent {
    CloudEvent::new(
        "/bazaar/orders",
        "payments.charge",
        Some(order),
        json!({"order_id": order, "user_id": "u-1", "amount_cents": 1250, "currency": "EUR"}),
    )
}

fn refund_cmd(order: &str) -> CloudEvent {
    CloudEvent::new(
        "/bazaar/orders",
        "payments.refund",
        Some(order),
        json!({"order_id": order}),
    )
}

/// The answers on the `payments` topic about `order`, oldest first: (type, data).
async fn answers(pool: &AnyPool, order: &str) -> Vec<(String, Value)> {
    let payloads: Vec<String> = sqlx::query_scalar(
        "SELECT payload FROM messaging_outbox WHERE topic = 'payments' AND event_key = $1 ORDER BY seq",
    )
    .bind(order)
    .fetch_all(pool)
    .await
    .unwrap();
    payloads
        .iter()
        .map(|p| {
            let e: Value = serde_json::from_str(p).unwrap();
            assert_eq!(e["subject"], order);
            (e["type"].as_str().unwrap().to_owned(), e["data"].clone())
        })
        .collect()
}

async fn count(pool: &AnyPool, sql: &str, order: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(order)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn charges(pool: &AnyPool, order: &str) -> i64 {
    count(
        pool,
        "SELECT COUNT(*) FROM charges WHERE order_id = $1",
        order,
    )
    .await
}

async fn refunds(pool: &AnyPool, order: &str) -> i64 {
    count(
        pool,
        "SELECT COUNT(*) FROM refunds WHERE order_id = $1",
        order,
    )
    .await
}

async fn charged_once_however_often_asked(engine: Engine) {
    let f = fixture(engine).await;
    let p = handlers(&f, 0.0, &[]);
    let command = charge_cmd("o-1");
    // One event redelivered: the inbox makes the later deliveries no-ops.
    for _ in 0..3 {
        p.command(command.clone(), meta()).await.unwrap();
    }
    assert_eq!(charges(&f.pool, "o-1").await, 1);
    let first = answers(&f.pool, "o-1").await;
    assert_eq!(first.len(), 1);
    let (ty, data) = &first[0];
    assert_eq!(ty, "payment.charged");
    assert_eq!(data["order_id"], "o-1");
    assert_eq!(data["amount_cents"], 1250);
    assert_eq!(data["currency"], "EUR");
    assert!(uuid::Uuid::parse_str(data["charge_id"].as_str().unwrap()).is_ok());
    // Re-sent commands (new event ids) get the recorded answer, even if the amount
    // and the decline rate say otherwise now.
    let decliner = handlers(&f, 1.0, &[]);
    let mut changed = charge_cmd("o-1");
    changed.data["amount_cents"] = json!(99);
    decliner.command(charge_cmd("o-1"), meta()).await.unwrap();
    decliner.command(changed, meta()).await.unwrap();
    assert_eq!(charges(&f.pool, "o-1").await, 1);
    let all = answers(&f.pool, "o-1").await;
    assert_eq!(all.len(), 3);
    assert!(all.iter().all(|a| a == &first[0]));
}

async fn declines_are_recorded_and_repeated(engine: Engine) {
    let f = fixture(engine).await;
    let p = handlers(&f, 1.0, &[]);
    p.command(charge_cmd("o-2"), meta()).await.unwrap();
    let status: String = sqlx::query_scalar("SELECT status FROM charges WHERE order_id = 'o-2'")
        .fetch_one(&f.pool)
        .await
        .unwrap();
    assert_eq!(status, "declined");
    handlers(&f, 0.0, &[])
        .command(charge_cmd("o-2"), meta())
        .await
        .unwrap();
    let expected = (
        "payment.declined".to_owned(),
        json!({"order_id": "o-2", "reason": "payment_declined"}),
    );
    assert_eq!(answers(&f.pool, "o-2").await, [expected.clone(), expected]);
    assert_eq!(charges(&f.pool, "o-2").await, 1);
    // Refunding a declined charge gives nothing back and records nothing.
    p.command(refund_cmd("o-2"), meta()).await.unwrap();
    assert_eq!(
        answers(&f.pool, "o-2").await[2],
        (
            "payment.refunded".to_owned(),
            json!({"order_id": "o-2", "refund_id": null, "amount_cents": 0})
        )
    );
    assert_eq!(refunds(&f.pool, "o-2").await, 0);
}

async fn refunded_once(engine: Engine) {
    let f = fixture(engine).await;
    let p = handlers(&f, 0.0, &[]);
    p.command(charge_cmd("o-3"), meta()).await.unwrap();
    let refund = refund_cmd("o-3");
    p.command(refund.clone(), meta()).await.unwrap();
    p.command(refund, meta()).await.unwrap();
    p.command(refund_cmd("o-3"), meta()).await.unwrap();
    assert_eq!(refunds(&f.pool, "o-3").await, 1);
    let all = answers(&f.pool, "o-3").await;
    assert_eq!(all.len(), 3, "charged, then refunded answered twice");
    let (ty, data) = &all[1];
    assert_eq!(ty, "payment.refunded");
    assert_eq!(data["amount_cents"], 1250);
    assert!(data["refund_id"].is_string());
    assert_eq!(all[1], all[2]);
    // A charge request after the refund is still answered with the charge.
    p.command(charge_cmd("o-3"), meta()).await.unwrap();
    assert_eq!(answers(&f.pool, "o-3").await[3], all[0]);
}

async fn a_refund_before_the_charge_wins(engine: Engine) {
    let f = fixture(engine).await;
    let p = handlers(&f, 0.0, &[]);
    p.command(refund_cmd("o-4"), meta()).await.unwrap();
    p.command(charge_cmd("o-4"), meta()).await.unwrap();
    p.command(charge_cmd("o-4"), meta()).await.unwrap();
    p.command(refund_cmd("o-4"), meta()).await.unwrap();
    assert_eq!(charges(&f.pool, "o-4").await, 0);
    assert_eq!(refunds(&f.pool, "o-4").await, 1, "the tombstone");
    let nothing = (
        "payment.refunded".to_owned(),
        json!({"order_id": "o-4", "refund_id": null, "amount_cents": 0}),
    );
    let cancelled = (
        "payment.declined".to_owned(),
        json!({"order_id": "o-4", "reason": "cancelled"}),
    );
    assert_eq!(
        answers(&f.pool, "o-4").await,
        [nothing.clone(), cancelled.clone(), cancelled, nothing]
    );
}

async fn an_outage_answers_nothing(engine: Engine) {
    let f = fixture(engine).await;
    let down = handlers(&f, 0.0, &["0s+1h"]);
    let command = charge_cmd("o-5");
    assert!(matches!(
        down.command(command.clone(), meta()).await,
        Err(HandlerError::Retry(r)) if r == "payment provider unavailable"
    ));
    assert_eq!(charges(&f.pool, "o-5").await, 0);
    assert!(answers(&f.pool, "o-5").await.is_empty());
    let claimed: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM messaging_inbox")
        .fetch_one(&f.pool)
        .await
        .unwrap();
    assert_eq!(claimed, 0, "the redelivery must be handled");
    // The same event once the provider is back: charged.
    handlers(&f, 0.0, &["1h+1h"])
        .command(command, meta())
        .await
        .unwrap();
    assert_eq!(charges(&f.pool, "o-5").await, 1);
    // A decided order is answered even while the provider is down.
    down.command(charge_cmd("o-5"), meta()).await.unwrap();
    assert_eq!(answers(&f.pool, "o-5").await.len(), 2);
}

async fn bad_messages_are_rejected(engine: Engine) {
    let f = fixture(engine).await;
    let p = handlers(&f, 0.0, &[]);
    let rejected = |r: Result<(), HandlerError>, needle: &str| match r {
        Err(HandlerError::Reject(reason)) => assert!(reason.contains(needle), "{reason}"),
        other => panic!("expected a reject naming {needle}, got {other:?}"),
    };
    let mut no_amount = charge_cmd("o-6");
    no_amount
        .data
        .as_object_mut()
        .unwrap()
        .remove("amount_cents");
    rejected(p.command(no_amount, meta()).await, "amount_cents");
    let mut negative = charge_cmd("o-6");
    negative.data["amount_cents"] = json!(-5);
    rejected(p.command(negative, meta()).await, "amount_cents");
    let mut currency = charge_cmd("o-6");
    currency.data["currency"] = json!("euro");
    rejected(p.command(currency, meta()).await, "currency");
    let mut no_user = charge_cmd("o-6");
    no_user.data["user_id"] = json!(7);
    rejected(p.command(no_user, meta()).await, "user_id");
    let no_order = CloudEvent::new("/bazaar/orders", "payments.refund", None, json!({}));
    rejected(p.command(no_order, meta()).await, "order_id");
    let unknown = CloudEvent::new("/bazaar/orders", "payments.void", None, json!({}));
    rejected(
        p.command(unknown, meta()).await,
        "unknown event type `payments.void`",
    );
    assert_eq!(charges(&f.pool, "o-6").await, 0);
}

async fn choreography_events(engine: Engine) {
    let f = fixture(engine).await;
    let p = handlers(&f, 0.0, &[]);
    let event = |ty: &str, data: Value| CloudEvent::new("/bazaar/x", ty, Some("o-7"), data);
    let reserved = event(
        "inventory.reserved",
        json!({"order_id": "o-7", "user_id": "u-1", "total_cents": 800, "currency": "EUR",
               "items": []}),
    );
    p.inventory_event(reserved, meta()).await.unwrap();
    let rejected = event("inventory.rejected", json!({"order_id": "o-7"}));
    p.inventory_event(rejected, meta()).await.unwrap();
    let created = event("order.created", json!({"order_id": "o-7"}));
    p.order_event(created, meta()).await.unwrap();
    let all = answers(&f.pool, "o-7").await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].1["amount_cents"], 800);
    let cancelled = event(
        "order.cancelled",
        json!({"order_id": "o-7", "reason": "timeout"}),
    );
    p.order_event(cancelled, meta()).await.unwrap();
    assert_eq!(answers(&f.pool, "o-7").await[1].1["amount_cents"], 800);
    assert_eq!(refunds(&f.pool, "o-7").await, 1);
    let stray = event("order.archived", json!({}));
    assert!(matches!(
        p.order_event(stray, meta()).await,
        Err(HandlerError::Reject(r)) if r.contains("order.archived")
    ));
    let stray = event("inventory.counted", json!({}));
    assert!(matches!(
        p.inventory_event(stray, meta()).await,
        Err(HandlerError::Reject(r)) if r.contains("inventory.counted")
    ));
}

/// Starts a transaction that, like a message being handled, holds `order`'s lock and
/// has written `row` without committing yet.
async fn in_flight(
    pool: &AnyPool,
    order: &str,
    row: &str,
) -> sqlx::Transaction<'static, sqlx::Any> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO payment_orders (order_id, updated_at) VALUES ($1, 0)")
        .bind(order)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(row).execute(&mut *tx).await.unwrap();
    tx
}

/// A charge and a refund of one order may be handled at once (different topics in
/// choreography): each waits for the other and sees what it did, so an order is never
/// left charged behind a refund that found nothing.
async fn one_message_about_an_order_at_a_time(engine: Engine) {
    let f = fixture(engine).await;
    let p = handlers(&f, 0.0, &[]);
    let charging = in_flight(
        &f.pool,
        "o-8",
        "INSERT INTO charges (charge_id, order_id, user_id, status, amount_cents, currency, created_at) \
         VALUES ('c-8', 'o-8', 'u-1', 'charged', 500, 'EUR', 0)",
    )
    .await;
    let refund = tokio::spawn({
        let p = p.clone();
        async move { p.command(refund_cmd("o-8"), meta()).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    charging.commit().await.unwrap();
    refund.await.unwrap().unwrap();
    assert_eq!(answers(&f.pool, "o-8").await[0].1["amount_cents"], 500);

    let refunding = in_flight(
        &f.pool,
        "o-9",
        "INSERT INTO refunds (order_id, refund_id, charge_id, amount_cents, created_at) \
         VALUES ('o-9', NULL, NULL, 0, 0)",
    )
    .await;
    let charge = tokio::spawn({
        let p = p.clone();
        async move { p.command(charge_cmd("o-9"), meta()).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    refunding.commit().await.unwrap();
    charge.await.unwrap().unwrap();
    assert_eq!(charges(&f.pool, "o-9").await, 0);
    assert_eq!(answers(&f.pool, "o-9").await[0].1["reason"], "cancelled");
}

macro_rules! on_both_engines {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(chassis::testing::Engine::Sqlite).await; })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(chassis::testing::Engine::Postgres).await; })*
        }
    };
}

on_both_engines!(
    charged_once_however_often_asked,
    declines_are_recorded_and_repeated,
    refunded_once,
    a_refund_before_the_charge_wins,
    an_outage_answers_nothing,
    bad_messages_are_rejected,
    choreography_events,
    one_message_about_an_order_at_a_time,
);
