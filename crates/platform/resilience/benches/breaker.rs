//! Overhead of the breaker on the success path and cost of a rejection, beside the
//! `failsafe` crate's breaker, in one run:
//! `cargo bench -p resilience --bench breaker`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use failsafe::CircuitBreaker as _;
use resilience::circuit_breaker::{Breaker, CircuitBreakerLayer, Config, ErrorsFail, Outcome};
use tower::{Service, ServiceBuilder, ServiceExt};

fn ready_service() -> impl Service<
    u64,
    Response = u64,
    Error = Infallible,
    Future = std::future::Ready<Result<u64, Infallible>>,
> + Clone {
    tower::service_fn(|x: u64| std::future::ready(Ok::<_, Infallible>(x)))
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("success path");

    let mut bare = ready_service();
    group.bench_function("tower service, bare", |b| {
        b.to_async(&rt).iter(|| {
            let fut = bare.call(black_box(1));
            async move { fut.await.unwrap() }
        })
    });
    let breaker = Breaker::new("bench", Config::default()).unwrap();
    let mut guarded = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(breaker.clone(), ErrorsFail))
        .service(ready_service());
    group.bench_function("tower service + bazaar breaker", |b| {
        b.to_async(&rt).iter(|| {
            let fut = guarded.call(black_box(1));
            async move { fut.await.unwrap() }
        })
    });
    group.bench_function("bazaar breaker, acquire + record", |b| {
        b.iter(|| {
            let permit = breaker.try_acquire().unwrap();
            breaker.record(permit, Outcome::Success, Duration::from_micros(1));
        })
    });
    let peer = failsafe::Config::new().build();
    group.bench_function("failsafe breaker, call", |b| {
        b.iter(|| peer.call(|| Ok::<u64, ()>(black_box(1))).unwrap())
    });
    group.finish();

    // The whole pipeline in Polly's order, on an HTTP request, over a bare service.
    let mut group = c.benchmark_group("pipeline");
    let http_service = || {
        tower::service_fn(|_req: http::Request<()>| {
            std::future::ready(Ok::<_, Infallible>(http::Response::new(())))
        })
    };
    let mut bare_http = http_service();
    group.bench_function("http service, bare", |b| {
        b.to_async(&rt).iter(|| {
            let fut = bare_http.call(http::Request::new(()));
            async move { fut.await.unwrap() }
        })
    });
    let limiter =
        resilience::rate_limit::Limiter::new("bench", 1e9, 1_000_000, Duration::ZERO).unwrap();
    let policy = resilience::retry::RetryPolicy::new(
        3,
        Duration::from_millis(10),
        Duration::from_millis(100),
        0.2,
    );
    let compartment =
        resilience::bulkhead::Compartment::new("bench", 1024, Duration::from_millis(10));
    let pipeline_breaker = Breaker::new("pipeline", Config::default()).unwrap();
    let mut pipeline = ServiceBuilder::new()
        .layer(resilience::rate_limit::RateLimitLayer::new(limiter))
        .layer(resilience::timeout::DeadlineLayer::new(
            Duration::from_secs(5),
        ))
        .layer(tower::retry::RetryLayer::new(
            resilience::retry::HttpRetry::new(policy),
        ))
        .layer(resilience::bulkhead::BulkheadLayer::new(compartment))
        .layer(CircuitBreakerLayer::new(
            pipeline_breaker,
            resilience::circuit_breaker::ServerErrorsFail,
        ))
        .service(http_service());
    // Every layer here is always ready once its inner service is.
    rt.block_on(async { pipeline.ready().await.map(|_| ()) })
        .unwrap();
    group.bench_function("http service + full pipeline", |b| {
        b.to_async(&rt).iter(|| {
            let fut = pipeline.call(http::Request::new(()));
            async move { fut.await.unwrap() }
        })
    });
    group.finish();

    let mut group = c.benchmark_group("rejection");
    let open = Breaker::new("open", Config::default()).unwrap();
    open.force_open();
    let mut rejected = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(open.clone(), ErrorsFail))
        .service(ready_service());
    group.bench_function("tower service + bazaar breaker, open", |b| {
        b.to_async(&rt).iter(|| {
            let fut = rejected.call(black_box(1));
            async move { fut.await.unwrap_err() }
        })
    });
    group.bench_function("bazaar breaker, try_acquire when open", |b| {
        b.iter(|| open.try_acquire().unwrap_err())
    });
    let peer = failsafe::Config::new()
        .failure_policy(failsafe::failure_policy::consecutive_failures(
            1,
            failsafe::backoff::constant(Duration::from_secs(3600)),
        ))
        .build();
    let _ = peer.call(|| Err::<(), ()>(()));
    group.bench_function("failsafe breaker, call when open", |b| {
        b.iter(|| peer.call(|| Ok::<u64, ()>(black_box(1))).unwrap_err())
    });
    group.finish();
    // Keep the services alive (and ready) for the whole run.
    let _ = rt.block_on(async { bare.ready().await.map(|_| ()) });
}

criterion_group!(breaker, benches);
criterion_main!(breaker);
