//! Bulkhead and retry layers on a paused clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use resilience::bulkhead::error::Full;
use resilience::bulkhead::{BulkheadLayer, Compartment};
use resilience::retry::{HttpRetry, RetryPolicy};
use tower::retry::RetryLayer;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

#[tokio::test(start_paused = true)]
async fn the_bulkhead_admits_up_to_its_limit_and_rejects_after_the_queue_wait() {
    let compartment = Compartment::new("dep", 2, Duration::from_millis(50));
    let svc = ServiceBuilder::new()
        .layer(BulkheadLayer::new(compartment.clone()))
        .service_fn(|ms: u64| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, BoxError>(ms)
        });
    let call = |ms| {
        let mut svc = svc.clone();
        tokio::spawn(async move { svc.ready().await?.call(ms).await })
    };
    let a = call(100);
    let b = call(100);
    tokio::task::yield_now().await;
    assert_eq!(compartment.in_flight(), 2);
    let started = tokio::time::Instant::now();
    let rejected = call(10).await.unwrap().unwrap_err();
    assert!(rejected.downcast_ref::<Full>().is_some(), "{rejected}");
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(50),
        "rejected after the queue wait, not later"
    );
    // A call that waits less than the queue wait for a slot gets it.
    tokio::time::advance(Duration::from_millis(30)).await;
    let c = call(5);
    assert_eq!(a.await.unwrap().unwrap(), 100);
    assert_eq!(b.await.unwrap().unwrap(), 100);
    assert_eq!(c.await.unwrap().unwrap(), 5);
    assert_eq!(compartment.in_flight(), 0);
}

fn flaky(
    failures: u32,
    calls: Arc<AtomicU32>,
    retry_after: Option<&'static str>,
) -> impl Service<
    http::Request<String>,
    Response = http::Response<String>,
    Error = BoxError,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |_req: http::Request<String>| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut response = http::Response::new(String::new());
            if n < failures {
                *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                if let Some(after) = retry_after {
                    response
                        .headers_mut()
                        .insert("retry-after", after.parse().unwrap());
                }
            }
            Ok::<_, BoxError>(response)
        }
    })
}

#[tokio::test(start_paused = true)]
async fn idempotent_requests_are_retried_and_others_are_not() {
    let policy = RetryPolicy::new(
        3,
        Duration::from_millis(10),
        Duration::from_millis(100),
        0.5,
    );
    let calls = Arc::new(AtomicU32::new(0));
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new(HttpRetry::new(policy.clone())))
        .service(flaky(2, calls.clone(), None));
    let get = http::Request::get("/x").body(String::new()).unwrap();
    let response = svc.ready().await.unwrap().call(get).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 3, "two retries");

    let calls = Arc::new(AtomicU32::new(0));
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new(HttpRetry::new(policy.clone())))
        .service(flaky(5, calls.clone(), None));
    let post = http::Request::post("/x").body("order".to_owned()).unwrap();
    let response = svc.ready().await.unwrap().call(post).await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "a POST is never repeated");

    let get = http::Request::get("/x").body(String::new()).unwrap();
    let response = svc.ready().await.unwrap().call(get).await.unwrap();
    assert_eq!(response.status(), 503, "gives up after max attempts");
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured() {
    let policy = RetryPolicy::new(
        2,
        Duration::from_millis(10),
        Duration::from_millis(100),
        0.5,
    );
    let calls = Arc::new(AtomicU32::new(0));
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new(HttpRetry::new(policy)))
        .service(flaky(1, calls.clone(), Some("3")));
    let started = tokio::time::Instant::now();
    let response = svc
        .ready()
        .await
        .unwrap()
        .call(http::Request::get("/x").body(String::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(started.elapsed(), Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn the_rate_limiter_paces_within_its_wait_and_rejects_beyond() {
    use resilience::rate_limit::error::Limited;
    use resilience::rate_limit::{Limiter, RateLimitLayer};
    let limiter = Limiter::new("dep", 10.0, 1, Duration::from_millis(250)).unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(limiter))
        .service_fn(|_: ()| async { Ok::<_, BoxError>(tokio::time::Instant::now()) });
    let started = tokio::time::Instant::now();
    let mut times = Vec::new();
    for _ in 0..3 {
        times.push(svc.ready().await.unwrap().call(()).await.unwrap() - started);
    }
    assert_eq!(
        times,
        [
            Duration::ZERO,
            Duration::from_millis(100),
            Duration::from_millis(200)
        ]
    );
    // Three calls at once: the third would wait 300 ms > 250 ms.
    let now = tokio::time::Instant::now();
    let a = svc.ready().await.unwrap().call(());
    let b = svc.ready().await.unwrap().call(());
    let c = svc.ready().await.unwrap().call(());
    let err = c.await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<Limited>().unwrap().retry_after,
        Duration::from_millis(300)
    );
    assert_eq!(a.await.unwrap() - now, Duration::from_millis(100));
    assert_eq!(b.await.unwrap() - now, Duration::from_millis(200));
}

#[tokio::test]
async fn the_fallback_answers_marked_degraded() {
    use resilience::fallback::{DEGRADED_HEADER, FallbackLayer};
    let failing =
        tower::service_fn(|_: ()| async { Err::<http::Response<String>, BoxError>("down".into()) });
    let fallback = |_e: BoxError| Ok::<_, BoxError>(http::Response::new("cached".to_owned()));
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new(fallback))
        .service(failing);
    let response = svc.ready().await.unwrap().call(()).await.unwrap();
    assert_eq!(response.body(), "cached");
    assert_eq!(response.headers()[DEGRADED_HEADER], "true");

    let working = tower::service_fn(|_: ()| async {
        Ok::<_, BoxError>(http::Response::new("live".to_owned()))
    });
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new(fallback))
        .service(working);
    let response = svc.ready().await.unwrap().call(()).await.unwrap();
    assert!(!response.headers().contains_key(DEGRADED_HEADER));
}

#[tokio::test(start_paused = true)]
async fn the_deadline_layer_limits_calls_and_tells_the_callee() {
    use resilience::timeout::DeadlineLayer;
    use resilience::timeout::error::Elapsed;
    let svc = tower::service_fn(|req: http::Request<()>| async move {
        let told: u64 = req.headers()["x-bazaar-deadline"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(told / 2)).await;
        Ok::<_, BoxError>(told)
    });
    let mut svc = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_millis(300)))
        .service(svc);
    let told = svc
        .ready()
        .await
        .unwrap()
        .call(http::Request::new(()))
        .await
        .unwrap();
    assert_eq!(told, 300);
    // Within a request that has 100 ms left, the call gets (and is told) 100 ms.
    let ctx = telemetry::context::RequestContext::new_root()
        .with_deadline_within(Duration::from_millis(100));
    let told = telemetry::context::scope(ctx, async {
        svc.ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await
    })
    .await
    .unwrap();
    assert_eq!(told, 100);
    let slow = tower::service_fn(|_: http::Request<()>| async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok::<_, BoxError>(())
    });
    let mut slow = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_millis(300)))
        .service(slow);
    let err = slow
        .ready()
        .await
        .unwrap()
        .call(http::Request::new(()))
        .await
        .unwrap_err();
    assert_eq!(
        err.downcast_ref::<Elapsed>().unwrap().0,
        Duration::from_millis(300)
    );
}

#[tokio::test(start_paused = true)]
async fn non_idempotent_retries_only_when_configured() {
    let policy = RetryPolicy::new(
        3,
        Duration::from_millis(10),
        Duration::from_millis(100),
        0.5,
    )
    .retrying_non_idempotent();
    assert!(!policy.idempotent_only);
    let calls = Arc::new(AtomicU32::new(0));
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new(HttpRetry::new(policy)))
        .service(flaky(1, calls.clone(), None));
    let post = http::Request::post("/orders")
        .header("idempotency-key", "k")
        .body("order".to_owned())
        .unwrap();
    let response = svc.ready().await.unwrap().call(post).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
