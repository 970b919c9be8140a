//! The database pool against the machine's PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chassis::db::Database;
use chassis::testing::{Engine, TestDb};
use sqlx::migrate::Migrator;

/// No migrations: the pool is what is under test.
static NONE: Migrator = Migrator::DEFAULT;

/// A pooled connection whose server side went away while it sat idle (a server
/// restart, an administrator's `pg_terminate_backend`) is never handed out: a
/// connection idle for more than a second is checked first and replaced.
#[tokio::test]
async fn a_postgres_connection_that_died_while_idle_is_not_handed_out() {
    let db = TestDb::new(Engine::Postgres);
    let database = Database::connect(&db.url, &NONE).await.unwrap();
    let pool = database.pool();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(pool)
        .await
        .unwrap();
    // Another session ends that connection's server process.
    let admin = sqlx::AnyPool::connect(&db.url).await.unwrap();
    let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert!(ended);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The pool's only idle connection is the dead one: it must not be used.
    let answer: i32 = sqlx::query_scalar("SELECT 7")
        .fetch_one(pool)
        .await
        .expect("a dead connection was handed out");
    assert_eq!(answer, 7);
    let now: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_ne!(now, pid);
    admin.close().await;
    database.pool().close().await;
}
