//! The conformance suite against the embedded broker, served over real HTTP on a
//! free port from a fresh data directory.
#![allow(clippy::unwrap_used)]

mod conformance;

use std::sync::Arc;

use messaging::embedded::client::EmbeddedBus;
use messaging::embedded::store::LogConfig;
use messaging::embedded::{Broker, server};

/// A broker of its own with `partitions` per topic, from a fresh data directory: its
/// address.
async fn serve(partitions: u32) -> std::net::SocketAddr {
    let dir = std::env::temp_dir().join(format!("bazaar-log-{}", uuid::Uuid::new_v4().simple()));
    let mut config = LogConfig::new(dir);
    config.partitions = partitions;
    let broker = Broker::open(config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, server::router(broker)).await });
    addr
}

/// A bus on a broker of its own.
async fn own_bus(partitions: u32) -> conformance::Bus {
    Arc::new(EmbeddedBus::new(&format!(
        "http://{}",
        serve(partitions).await
    )))
}

/// A fresh SQLite database with the inbox and the `seen` table the consumer tests'
/// handlers write: a pool and its URL.
async fn seen_db() -> (sqlx::AnyPool, String) {
    sqlx::any::install_default_drivers();
    let path = std::env::temp_dir().join(format!("bazaar-seen-{}.db", uuid::Uuid::new_v4()));
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    messaging::inbox::Inbox::install(&pool).await.unwrap();
    sqlx::query("CREATE TABLE seen (k TEXT NOT NULL, n BIGINT NOT NULL, shared BIGINT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    (pool, url)
}

/// Runs `handler` over `config`'s topic as a transactional consumer writing `pool`
/// (inbox `g`): the token that stops it and its task.
fn consume<H: messaging::consumer::Transactional>(
    bus: &conformance::Bus,
    config: messaging::consumer::ConsumerConfig,
    pool: &sqlx::AnyPool,
    handler: Arc<H>,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let stop = tokio_util::sync::CancellationToken::new();
    let store = messaging::consumer::Store {
        pool: pool.clone(),
        inbox: messaging::inbox::Inbox::new("g"),
    };
    let task = tokio::spawn(messaging::consumer::run_transactional(
        bus.clone(),
        config,
        store,
        stop.clone(),
        handler,
    ));
    (stop, task)
}

async fn bus() -> (conformance::Bus, impl std::future::Future<Output = ()>) {
    (own_bus(4).await, async {})
}

async fn behind_proxy() -> (
    conformance::Bus,
    conformance::Proxy,
    impl std::future::Future<Output = ()>,
) {
    let proxy = conformance::Proxy::bind().await;
    proxy.forward_to(serve(4).await);
    let bus: conformance::Bus = Arc::new(EmbeddedBus::new(&format!("http://{}", proxy.addr)));
    (bus, proxy, async {})
}

conformance::suite!(bus, behind_proxy, conformance::ALL);

/// The consumer runner handles different keys of one partition side by side (a slow
/// key does not hold up the others) while each key's events stay in order.
#[tokio::test]
async fn keys_of_one_partition_run_side_by_side_each_in_order() {
    use messaging::CloudEvent;
    use messaging::consumer::{self, ConsumerConfig};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    let bus = own_bus(1).await;
    let event = |key: &str, n: u64| {
        CloudEvent::new(
            "/t",
            "thing.happened",
            Some(key),
            serde_json::json!({"n": n}),
        )
    };
    bus.publish("work", "slow", &event("slow", 0))
        .await
        .unwrap();
    for n in 0..20 {
        let key = format!("k{}", n % 4);
        bus.publish("work", &key, &event(&key, n)).await.unwrap();
    }
    let seen = Arc::new(Mutex::new(Vec::<(String, u64, Instant)>::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let task = {
        let seen = seen.clone();
        tokio::spawn(consumer::run(
            bus,
            ConsumerConfig::new("work", "g"),
            stop.clone(),
            move |e, meta| {
                let seen = seen.clone();
                async move {
                    if meta.key == "slow" {
                        tokio::time::sleep(Duration::from_millis(800)).await;
                    }
                    let n = e.data["n"].as_u64().unwrap();
                    seen.lock().unwrap().push((meta.key, n, Instant::now()));
                    Ok(())
                }
            },
        ))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().len() < 21 {
        assert!(Instant::now() < deadline, "{:?}", seen.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    task.await.unwrap();
    let seen = seen.lock().unwrap();
    let slow_done = seen.iter().find(|s| s.0 == "slow").unwrap().2;
    let others_done = seen
        .iter()
        .filter(|s| s.0 != "slow")
        .map(|s| s.2)
        .max()
        .unwrap();
    assert!(
        others_done < slow_done && others_done - started < Duration::from_millis(700),
        "the slow key held the others up"
    );
    for key in ["k0", "k1", "k2", "k3"] {
        let ns: Vec<u64> = seen.iter().filter(|s| s.0 == key).map(|s| s.1).collect();
        let mut sorted = ns.clone();
        sorted.sort_unstable();
        assert_eq!(ns, sorted, "{key} out of order");
        assert_eq!(ns.len(), 5);
    }
}

/// What the transactional test's handler does: records each event, fails event 7 on
/// its first delivery and rejects event 13, and notes whether rows written earlier in
/// its transaction are not yet visible outside it (so it shares a window's commit).
struct Recorder {
    outside: sqlx::AnyPool,
}

impl messaging::consumer::Transactional for Recorder {
    fn handle<'a>(
        &'a self,
        tx: &'a mut sqlx::AnyConnection,
        event: &'a messaging::CloudEvent,
        meta: &'a messaging::consumer::Meta,
        _prepared: messaging::consumer::Prepared,
        after: &'a mut messaging::consumer::AfterCommit,
    ) -> messaging::BoxFuture<'a, Result<(), messaging::consumer::HandlerError>> {
        use messaging::consumer::HandlerError;
        Box::pin(async move {
            let n = event.data["n"].as_i64().unwrap();
            let inside: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM seen")
                .fetch_one(&mut *tx)
                .await?;
            let outside: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM seen")
                .fetch_one(&self.outside)
                .await?;
            sqlx::query("INSERT INTO seen (k, n, shared) VALUES ($1, $2, $3)")
                .bind(&meta.key)
                .bind(n)
                .bind(i64::from(inside > outside))
                .execute(&mut *tx)
                .await?;
            match n {
                7 if meta.attempt == 1 => Err(HandlerError::Retry("not yet".into())),
                13 => Err(HandlerError::Reject("never".into())),
                _ => {
                    after.then(|| {});
                    Ok(())
                }
            }
        })
    }
}

/// A window of waiting events is handled in one transaction; an event that fails
/// rolls its window back, the window is handled again one event per transaction,
/// and only the failing event is retried or dead-lettered: every other event is
/// written exactly once, each key's in order.
#[tokio::test]
async fn a_window_commits_together_and_a_failing_event_is_settled_alone() {
    use messaging::consumer::ConsumerConfig;
    use messaging::{CloudEvent, SubscribeOptions};
    use std::time::{Duration, Instant};

    let bus = own_bus(2).await;

    let (pool, url_db) = seen_db().await;
    let outside = sqlx::AnyPool::connect(&url_db).await.unwrap();

    for n in 0..40 {
        let key = format!("k{}", n % 3);
        let e = CloudEvent::new(
            "/t",
            "thing.happened",
            Some(&key),
            serde_json::json!({"n": n}),
        );
        bus.publish("work", &key, &e).await.unwrap();
    }
    let mut config = ConsumerConfig::new("work", "g");
    config.base_backoff = Duration::from_millis(50);
    let (stop, task) = consume(&bus, config, &pool, Arc::new(Recorder { outside }));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM seen")
            .fetch_one(&pool)
            .await
            .unwrap();
        if count >= 39 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {count} of 39 events handled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The dead letter of event 13.
    let mut letters = bus
        .subscribe("work.dlq", "check", SubscribeOptions::default())
        .await
        .unwrap();
    let letter = tokio::time::timeout(Duration::from_secs(10), letters.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        letter.event.as_ref().unwrap().data["event"]["data"]["n"],
        13
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    task.await.unwrap();

    let rows: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT k, n, shared FROM seen ORDER BY rowid")
            .fetch_all(&pool)
            .await
            .unwrap();
    let mut ns: Vec<i64> = rows.iter().map(|r| r.1).collect();
    for key in ["k0", "k1", "k2"] {
        let of_key: Vec<i64> = rows.iter().filter(|r| r.0 == key).map(|r| r.1).collect();
        let mut sorted = of_key.clone();
        sorted.sort_unstable();
        assert_eq!(of_key, sorted, "{key} out of order");
    }
    ns.sort_unstable();
    let expected: Vec<i64> = (0..40).filter(|n| *n != 13).collect();
    assert_eq!(
        ns, expected,
        "each event but the rejected one, exactly once"
    );
    assert!(
        rows.iter().any(|r| r.2 == 1),
        "no event shared a transaction with the one before it"
    );
}

/// Prepares event 0 until event 1's preparation has started (or 5 s have passed),
/// noting which; writes each event it handles.
struct Overlapping {
    started: tokio::sync::watch::Sender<bool>,
    overlapped: std::sync::atomic::AtomicBool,
}

impl messaging::consumer::Transactional for Overlapping {
    fn prepare<'a>(
        &'a self,
        event: &'a messaging::CloudEvent,
        _meta: &'a messaging::consumer::Meta,
    ) -> messaging::BoxFuture<
        'a,
        Result<messaging::consumer::Prepared, messaging::consumer::HandlerError>,
    > {
        Box::pin(async move {
            if event.data["n"] == 1 {
                self.started.send_replace(true);
            } else {
                let mut started = self.started.subscribe();
                let waited = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    started.wait_for(|s| *s),
                )
                .await;
                self.overlapped.store(
                    waited.is_ok_and(|r| r.is_ok()),
                    std::sync::atomic::Ordering::SeqCst,
                );
            }
            Ok(None)
        })
    }

    fn handle<'a>(
        &'a self,
        tx: &'a mut sqlx::AnyConnection,
        event: &'a messaging::CloudEvent,
        meta: &'a messaging::consumer::Meta,
        _prepared: messaging::consumer::Prepared,
        _after: &'a mut messaging::consumer::AfterCommit,
    ) -> messaging::BoxFuture<'a, Result<(), messaging::consumer::HandlerError>> {
        Box::pin(async move {
            sqlx::query("INSERT INTO seen (k, n, shared) VALUES ($1, $2, 0)")
                .bind(&meta.key)
                .bind(event.data["n"].as_i64().unwrap())
                .execute(&mut *tx)
                .await?;
            Ok(())
        })
    }
}

/// A delivery is prepared as it arrives, while an earlier one of its partition is
/// still being prepared (a slow call elsewhere holds up only its own commit), and
/// the two still commit in the partition's order.
#[tokio::test]
async fn a_delivery_is_prepared_while_an_earlier_one_still_is() {
    use messaging::CloudEvent;
    use messaging::consumer::ConsumerConfig;
    use std::time::{Duration, Instant};

    let bus = own_bus(1).await;

    let (pool, _) = seen_db().await;
    let handler = Arc::new(Overlapping {
        started: tokio::sync::watch::channel(false).0,
        overlapped: std::sync::atomic::AtomicBool::new(false),
    });
    let (stop, task) = consume(
        &bus,
        ConsumerConfig::new("work", "g"),
        &pool,
        handler.clone(),
    );
    let publish = |n: i64| {
        let bus = bus.clone();
        async move {
            let e = CloudEvent::new(
                "/t",
                "thing.happened",
                Some("k"),
                serde_json::json!({"n": n}),
            );
            bus.publish("work", "k", &e).await.unwrap();
        }
    };
    publish(0).await;
    // Event 1 comes once event 0 is being prepared: in a window of its own.
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish(1).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let rows: Vec<i64> = loop {
        let rows: Vec<i64> = sqlx::query_scalar("SELECT n FROM seen ORDER BY rowid")
            .fetch_all(&pool)
            .await
            .unwrap();
        if rows.len() >= 2 {
            break rows;
        }
        assert!(Instant::now() < deadline, "handled only {rows:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stop.cancel();
    task.await.unwrap();
    assert_eq!(rows, [0, 1], "committed out of the partition's order");
    assert!(
        handler.overlapped.load(std::sync::atomic::Ordering::SeqCst),
        "event 1 was not prepared until event 0's preparation had ended"
    );
}

/// Writes each event; the first time it handles event 3 it leaves a callback that
/// panics after the commit.
struct PanicsAfterCommit {
    panicked: std::sync::atomic::AtomicBool,
}

impl messaging::consumer::Transactional for PanicsAfterCommit {
    fn handle<'a>(
        &'a self,
        tx: &'a mut sqlx::AnyConnection,
        event: &'a messaging::CloudEvent,
        meta: &'a messaging::consumer::Meta,
        _prepared: messaging::consumer::Prepared,
        after: &'a mut messaging::consumer::AfterCommit,
    ) -> messaging::BoxFuture<'a, Result<(), messaging::consumer::HandlerError>> {
        Box::pin(async move {
            let n = event.data["n"].as_i64().unwrap();
            sqlx::query("INSERT INTO seen (k, n, shared) VALUES ($1, $2, 0)")
                .bind(&meta.key)
                .bind(n)
                .execute(&mut *tx)
                .await?;
            if n == 3
                && !self
                    .panicked
                    .swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                after.then(|| panic!("a callback after the commit panicked"));
            }
            Ok(())
        })
    }
}

/// A panic in what a handler left for after a window's commit does not stop the
/// consumer: the window's events stay handled once, and later events still are.
#[tokio::test]
async fn a_panic_after_a_commit_does_not_stop_the_consumer() {
    use messaging::CloudEvent;
    use messaging::consumer::ConsumerConfig;
    use std::time::{Duration, Instant};

    let bus = own_bus(1).await;
    let (pool, _) = seen_db().await;
    let publish = |n: i64| {
        let bus = bus.clone();
        async move {
            let e = CloudEvent::new(
                "/t",
                "thing.happened",
                Some("k"),
                serde_json::json!({"n": n}),
            );
            bus.publish("work", "k", &e).await.unwrap();
        }
    };
    // Waiting together: one window, committed in one transaction.
    for n in 0..10 {
        publish(n).await;
    }
    let (stop, task) = consume(
        &bus,
        ConsumerConfig::new("work", "g"),
        &pool,
        Arc::new(PanicsAfterCommit {
            panicked: std::sync::atomic::AtomicBool::new(false),
        }),
    );
    let rows = || async {
        sqlx::query_scalar::<_, i64>("SELECT n FROM seen ORDER BY rowid")
            .fetch_all(&pool)
            .await
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while rows().await.len() < 10 {
        assert!(Instant::now() < deadline, "handled only {:?}", rows().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in 10..15 {
        publish(n).await;
    }
    while rows().await.len() < 15 {
        assert!(
            Instant::now() < deadline,
            "the consumer stopped after the panic: {:?}",
            rows().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    task.await.unwrap();
    assert_eq!(
        rows().await,
        (0..15).collect::<Vec<_>>(),
        "each event once, in order"
    );
}

/// `POST /v1/log/settle` settles items of several topics and groups in one call,
/// each item answered on its own: a bad one fails itself, not its neighbours.
#[tokio::test]
async fn one_settle_call_serves_every_group_and_answers_per_item() {
    let base = format!("http://{}", serve(2).await);
    let http = reqwest::Client::new();
    let publish = |topic: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let answer = http
                .post(format!("{base}/v1/log/topics/{topic}/records"))
                .header("bazaar-key", "k")
                .body("{}")
                .send()
                .await
                .unwrap();
            assert!(answer.status().is_success(), "{}", answer.status());
        }
    };
    let fetch = |topic: &'static str, group: &'static str, wait_ms: u64| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            http.post(format!("{base}/v1/log/topics/{topic}/groups/{group}/fetch"))
                .json(&serde_json::json!({"member": "m", "max": 8, "wait_ms": wait_ms}))
                .send()
                .await
                .unwrap()
                .json::<Vec<serde_json::Value>>()
                .await
                .unwrap()
        }
    };
    publish("orders").await;
    publish("payments").await;
    let order = fetch("orders", "billing", 2_000).await.remove(0);
    let payment = fetch("payments", "emails", 2_000).await.remove(0);
    let answer: serde_json::Value = http
        .post(format!("{base}/v1/log/settle"))
        .json(&serde_json::json!([
            {"topic": "orders", "group": "billing", "offset": order["offset"], "token": order["token"]},
            {"topic": "payments", "group": "emails", "offset": payment["offset"],
             "token": payment["token"], "delay_ms": 0},
            {"topic": "orders", "group": "no such group!", "offset": 0, "token": 0},
            {"topic": "payments", "group": "emails", "offset": payment["offset"], "token": 999_999},
        ]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 4, "{answer}");
    assert!(results[0].is_null() && results[1].is_null(), "{answer}");
    assert!(
        results[2].as_str().unwrap().contains("no such group!"),
        "{answer}"
    );
    assert!(results[3].is_string(), "a stale token is refused: {answer}");
    // The ack took the order away; the nack brought the payment back.
    assert!(fetch("orders", "billing", 300).await.is_empty());
    let again = fetch("payments", "emails", 2_000).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0]["offset"], payment["offset"]);
    assert_eq!(again[0]["attempt"], 2);
    // A body that is not a list of items is the client's mistake.
    let bad = http
        .post(format!("{base}/v1/log/settle"))
        .json(&serde_json::json!({"offset": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), reqwest::StatusCode::BAD_REQUEST);
    assert_eq!(bad.headers()["content-type"], "application/problem+json");
}

/// A client newer than its broker (a rolling upgrade): the broker has no
/// `/v1/log/settle`, and acks and nacks still land, through the per-group call.
#[tokio::test]
async fn acks_reach_a_broker_without_the_shared_settle_call() {
    let dir = std::env::temp_dir().join(format!("bazaar-log-{}", uuid::Uuid::new_v4().simple()));
    let broker = Broker::open(LogConfig::new(dir)).unwrap();
    let older = server::router(broker).layer(axum::middleware::from_fn(
        |request: axum::extract::Request, next: axum::middleware::Next| async move {
            if request.uri().path() == "/v1/log/settle" {
                return axum::response::IntoResponse::into_response(
                    axum::http::StatusCode::NOT_FOUND,
                );
            }
            next.run(request).await
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, older).await });
    let bus: conformance::Bus = Arc::new(EmbeddedBus::new(&format!("http://{addr}")));
    conformance::a_nack_brings_the_message_back_after_the_delay_before_later_ones(
        bus.clone(),
        &conformance::ALL,
    )
    .await;
    conformance::every_group_gets_every_event(bus, &conformance::ALL).await;
}

/// Fails each event with a passing error until its eighth delivery.
struct Stubborn;

impl messaging::consumer::Transactional for Stubborn {
    fn handle<'a>(
        &'a self,
        tx: &'a mut sqlx::AnyConnection,
        event: &'a messaging::CloudEvent,
        meta: &'a messaging::consumer::Meta,
        _prepared: messaging::consumer::Prepared,
        _after: &'a mut messaging::consumer::AfterCommit,
    ) -> messaging::BoxFuture<'a, Result<(), messaging::consumer::HandlerError>> {
        Box::pin(async move {
            if meta.attempt < 8 {
                return Err(messaging::consumer::HandlerError::Retry("not yet".into()));
            }
            sqlx::query("INSERT INTO seen (k, n, shared) VALUES ($1, $2, $3)")
                .bind(&meta.key)
                .bind(event.data["n"].as_i64().unwrap())
                .bind(i64::from(meta.attempt))
                .execute(&mut *tx)
                .await?;
            Ok(())
        })
    }
}

/// A consumer made `until_handled` retries an event that keeps failing for a
/// passing reason past the attempts after which another would dead-letter it, and
/// handles it once it can: nothing reaches the dead-letter topic.
#[tokio::test]
async fn an_event_retried_until_handled_is_never_dead_lettered() {
    use messaging::consumer::ConsumerConfig;
    use messaging::{CloudEvent, SubscribeOptions};
    use std::time::{Duration, Instant};

    let bus = own_bus(1).await;
    let (pool, _) = seen_db().await;
    let e = CloudEvent::new(
        "/t",
        "thing.happened",
        Some("k"),
        serde_json::json!({"n": 1}),
    );
    bus.publish("work", "k", &e).await.unwrap();
    let mut config = ConsumerConfig::new("work", "g").until_handled();
    assert!(config.max_attempts > 8);
    config.base_backoff = Duration::from_millis(10);
    config.max_backoff = Duration::from_millis(40);
    let (stop, task) = consume(&bus, config, &pool, Arc::new(Stubborn));
    let deadline = Instant::now() + Duration::from_secs(20);
    let attempt = loop {
        let row: Option<i64> = sqlx::query_scalar("SELECT shared FROM seen WHERE n = 1")
            .fetch_optional(&pool)
            .await
            .unwrap();
        if let Some(attempt) = row {
            break attempt;
        }
        assert!(Instant::now() < deadline, "never handled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(attempt, 8);
    let mut letters = bus
        .subscribe("work.dlq", "check", SubscribeOptions::default())
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), letters.next())
            .await
            .is_err(),
        "an event was dead-lettered"
    );
    stop.cancel();
    task.await.unwrap();
}
