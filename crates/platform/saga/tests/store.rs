//! The durable orchestrator on real databases (SQLite in a temporary file, and the
//! machine's PostgreSQL, `POSTGRES_TEST_URL`): every transition is one transaction
//! with its history and its command in the outbox; replies twice change nothing;
//! the timer retries and then compensates; a transition that lost a race is told.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use messaging::outbox::Outbox;
use messaging::{BoxFuture, CloudEvent};
use saga::machine::{Definition, Direction, Input, Phase, Reply};
use saga::store::{OnFinish, Orchestrator, Outgoing, Route, SagaError};
use serde_json::{Value, json};
use sqlx::{AnyConnection, AnyPool, Row};
use time::OffsetDateTime;

fn definition() -> Definition {
    Definition::new("place-order")
        .step("reserve", Duration::from_secs(2), 2, true)
        .step("charge", Duration::from_secs(2), 2, true)
}

fn orchestrator() -> Orchestrator {
    let route: Route = Arc::new(|saga, command| {
        let step = ["reserve", "charge"][command.step];
        let ty = match command.direction {
            Direction::Do => format!("test.{step}"),
            Direction::Undo => format!("test.undo_{step}"),
        };
        Outgoing {
            topic: "commands".to_owned(),
            key: saga.id.clone(),
            event: CloudEvent::new("/orders", &ty, Some(&saga.id), saga.data.clone()),
        }
    });
    let on_finish: OnFinish = Arc::new(
        |tx: &mut AnyConnection, saga, _sent| -> BoxFuture<'_, Result<(), sqlx::Error>> {
            let (id, outcome) = (saga.id.clone(), saga.phase.as_str());
            Box::pin(async move {
                sqlx::query("INSERT INTO outcomes (saga_id, outcome) VALUES ($1, $2)")
                    .bind(id)
                    .bind(outcome)
                    .execute(&mut *tx)
                    .await?;
                Ok(())
            })
        },
    );
    Orchestrator::new(definition(), Outbox::new(), route, on_finish)
}

async fn install(pool: &AnyPool) {
    Orchestrator::install(pool).await.unwrap();
    Outbox::install(pool).await.unwrap();
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS outcomes (saga_id TEXT NOT NULL, outcome TEXT NOT NULL)",
    )
    .execute(pool)
    .await
    .unwrap();
}

async fn sqlite() -> AnyPool {
    sqlx::any::install_default_drivers();
    let path = std::env::temp_dir().join(format!("bazaar-saga-{}.db", uuid()));
    let pool = AnyPool::connect(&format!("sqlite://{}?mode=rwc", path.display()))
        .await
        .unwrap();
    install(&pool).await;
    pool
}

async fn postgres() -> (AnyPool, String) {
    sqlx::any::install_default_drivers();
    let base = std::env::var("POSTGRES_TEST_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let url = format!("{base}/bazaar_saga_{}", uuid());
    <sqlx::Any as sqlx::migrate::MigrateDatabase>::create_database(&url)
        .await
        .unwrap();
    let pool = AnyPool::connect(&url).await.unwrap();
    install(&pool).await;
    (pool, url)
}

fn uuid() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// The commands of saga `id` in the outbox, oldest first: (type, key).
async fn sent(pool: &AnyPool, id: &str) -> Vec<(String, String)> {
    sqlx::query("SELECT payload, event_key FROM messaging_outbox WHERE event_key = $1 ORDER BY seq")
        .bind(id)
        .fetch_all(pool)
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let event: Value = serde_json::from_str(&r.get::<String, _>(0)).unwrap();
            (event["type"].as_str().unwrap().to_owned(), r.get(1))
        })
        .collect()
}

async fn outcome(pool: &AnyPool, id: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT outcome FROM outcomes WHERE saga_id = $1")
        .bind(id)
        .fetch_all(pool)
        .await
        .unwrap()
}

fn at(seconds: u64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap() + Duration::from_secs(seconds)
}

async fn reply(
    o: &Orchestrator,
    pool: &AnyPool,
    id: &str,
    step: usize,
    direction: Direction,
    reply: Reply,
    now: OffsetDateTime,
) -> bool {
    let mut tx = pool.begin().await.unwrap();
    let changed = o
        .apply(
            &mut tx,
            id,
            Input::Reply {
                step,
                direction,
                reply,
            },
            now,
            &mut Vec::new(),
        )
        .await
        .unwrap()
        .is_some();
    tx.commit().await.unwrap();
    changed
}

async fn a_saga_runs_to_completion_once_whatever_is_replied_twice(pool: AnyPool) {
    let o = orchestrator();
    let mut tx = pool.begin().await.unwrap();
    o.start(
        &mut tx,
        "o-1",
        json!({"order": "o-1"}),
        at(0),
        &mut Vec::new(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        sent(&pool, "o-1").await,
        [("test.reserve".to_owned(), "o-1".to_owned())]
    );
    assert!(
        reply(
            &o,
            &pool,
            "o-1",
            0,
            Direction::Do,
            Reply::Done(json!({"reservation": "r-1"})),
            at(1)
        )
        .await
    );
    assert!(
        !reply(
            &o,
            &pool,
            "o-1",
            0,
            Direction::Do,
            Reply::Done(json!({})),
            at(1)
        )
        .await,
        "a duplicate changes nothing"
    );
    assert!(
        reply(
            &o,
            &pool,
            "o-1",
            1,
            Direction::Do,
            Reply::Done(json!({"charge": "c-1"})),
            at(1)
        )
        .await
    );
    let mut conn = pool.acquire().await.unwrap();
    let (saga, history) = o.load(&mut conn, "o-1").await.unwrap().unwrap();
    assert_eq!(saga.phase, Phase::Completed);
    assert_eq!(
        saga.data,
        json!({"order": "o-1", "reservation": "r-1", "charge": "c-1"})
    );
    let lines: Vec<String> = history
        .iter()
        .map(|h| format!("{} {}", h.step, h.what))
        .collect();
    assert_eq!(
        lines,
        [
            "reserve sent",
            "reserve done",
            "charge sent",
            "charge done",
            "- completed"
        ]
    );
    assert_eq!(outcome(&pool, "o-1").await, ["completed"]);
    // The charge command carried what the reservation returned.
    let types: Vec<String> = sent(&pool, "o-1")
        .await
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(types, ["test.reserve", "test.charge"]);
}

async fn a_rolled_back_start_leaves_neither_saga_nor_command(pool: AnyPool) {
    let o = orchestrator();
    let mut tx = pool.begin().await.unwrap();
    o.start(&mut tx, "o-2", json!({}), at(0), &mut Vec::new())
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    assert!(o.load(&mut conn, "o-2").await.unwrap().is_none());
    assert!(sent(&pool, "o-2").await.is_empty());
}

async fn the_timer_retries_then_compensates_and_the_host_hears_once(pool: AnyPool) {
    let o = orchestrator();
    let mut tx = pool.begin().await.unwrap();
    o.start(&mut tx, "o-3", json!({}), at(0), &mut Vec::new())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    reply(
        &o,
        &pool,
        "o-3",
        0,
        Direction::Do,
        Reply::Done(json!({})),
        at(0),
    )
    .await;
    assert_eq!(o.tick(&pool, at(1)).await.unwrap(), 0, "not due yet");
    assert_eq!(o.tick(&pool, at(2)).await.unwrap(), 1, "charge sent again");
    assert_eq!(
        o.tick(&pool, at(4)).await.unwrap(),
        0,
        "the second attempt waits twice as long"
    );
    assert_eq!(
        o.tick(&pool, at(6)).await.unwrap(),
        1,
        "charge given up: refund"
    );
    let types: Vec<String> = sent(&pool, "o-3")
        .await
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(
        types,
        [
            "test.reserve",
            "test.charge",
            "test.charge",
            "test.undo_charge"
        ]
    );
    reply(
        &o,
        &pool,
        "o-3",
        1,
        Direction::Undo,
        Reply::Done(json!({})),
        at(7),
    )
    .await;
    reply(
        &o,
        &pool,
        "o-3",
        0,
        Direction::Undo,
        Reply::Done(json!({})),
        at(7),
    )
    .await;
    reply(
        &o,
        &pool,
        "o-3",
        0,
        Direction::Undo,
        Reply::Done(json!({})),
        at(7),
    )
    .await;
    let mut conn = pool.acquire().await.unwrap();
    let (saga, _) = o.load(&mut conn, "o-3").await.unwrap().unwrap();
    assert_eq!(
        (saga.phase, saga.reason.as_deref()),
        (Phase::Compensated, Some("timeout"))
    );
    assert_eq!(outcome(&pool, "o-3").await, ["compensated"]);
    assert_eq!(
        o.tick(&pool, at(1000)).await.unwrap(),
        0,
        "an ended saga is never due"
    );
}

async fn a_late_reply_is_ignored(pool: AnyPool) {
    let o = orchestrator();
    let mut tx = pool.begin().await.unwrap();
    o.start(&mut tx, "o-4", json!({}), at(0), &mut Vec::new())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(
        reply(
            &o,
            &pool,
            "o-4",
            0,
            Direction::Do,
            Reply::Failed("out_of_stock".into()),
            at(1)
        )
        .await
    );
    assert!(
        !reply(
            &o,
            &pool,
            "o-4",
            0,
            Direction::Do,
            Reply::Done(json!({})),
            at(1)
        )
        .await,
        "the saga is past that step"
    );
    let mut conn = pool.acquire().await.unwrap();
    let (saga, _) = o.load(&mut conn, "o-4").await.unwrap().unwrap();
    assert_eq!(
        (saga.phase, saga.reason.as_deref()),
        (Phase::Compensated, Some("out_of_stock"))
    );
    assert_eq!(outcome(&pool, "o-4").await, ["compensated"]);
}

/// Two replies of one saga handled at once (two consumer instances): the second to
/// write finds the version moved and is told, instead of overwriting the first.
async fn concurrent_transitions_conflict(pool: AnyPool) {
    let o = orchestrator();
    let mut tx = pool.begin().await.unwrap();
    o.start(&mut tx, "o-5", json!({}), at(0), &mut Vec::new())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut first = pool.begin().await.unwrap();
    o.apply(
        &mut first,
        "o-5",
        Input::Reply {
            step: 0,
            direction: Direction::Do,
            reply: Reply::Done(json!({})),
        },
        at(1),
        &mut Vec::new(),
    )
    .await
    .unwrap()
    .unwrap();
    let second = {
        let (o, pool) = (o.clone(), pool.clone());
        tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            o.apply(&mut tx, "o-5", Input::Tick, at(10), &mut Vec::new())
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.commit().await.unwrap();
    match second.await.unwrap() {
        Err(SagaError::Conflict(id)) => assert_eq!(id, "o-5"),
        other => panic!("expected a conflict, got {other:?}"),
    }
}

#[tokio::test]
async fn sqlite_a_saga_runs_to_completion_once() {
    a_saga_runs_to_completion_once_whatever_is_replied_twice(sqlite().await).await;
}

#[tokio::test]
async fn sqlite_a_rolled_back_start_leaves_nothing() {
    a_rolled_back_start_leaves_neither_saga_nor_command(sqlite().await).await;
}

#[tokio::test]
async fn sqlite_the_timer_retries_then_compensates() {
    the_timer_retries_then_compensates_and_the_host_hears_once(sqlite().await).await;
}

#[tokio::test]
async fn sqlite_a_late_reply_is_ignored() {
    a_late_reply_is_ignored(sqlite().await).await;
}

#[tokio::test]
async fn postgres_the_same_and_concurrent_transitions_conflict() {
    let (pool, url) = postgres().await;
    a_saga_runs_to_completion_once_whatever_is_replied_twice(pool.clone()).await;
    a_rolled_back_start_leaves_neither_saga_nor_command(pool.clone()).await;
    the_timer_retries_then_compensates_and_the_host_hears_once(pool.clone()).await;
    a_late_reply_is_ignored(pool.clone()).await;
    concurrent_transitions_conflict(pool.clone()).await;
    pool.close().await;
    let _ = <sqlx::Any as sqlx::migrate::MigrateDatabase>::force_drop_database(&url).await;
}
