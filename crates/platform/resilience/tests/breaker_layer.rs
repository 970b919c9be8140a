//! The breaker as a tower layer, on a paused clock: every timing rule is exact.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use resilience::circuit_breaker::error::Open;
use resilience::circuit_breaker::{
    Breaker, BreakerMetrics, CircuitBreakerLayer, Config, ErrorsFail, State, Window,
};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

/// A dependency whose behaviour the test sets: fail or not, and how long to take.
#[derive(Clone, Default)]
struct Dependency {
    fail: Arc<std::sync::atomic::AtomicBool>,
    delay_ms: Arc<AtomicU32>,
    calls: Arc<AtomicU32>,
}

impl Service<()> for Dependency {
    type Response = ();
    type Error = BoxError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ()) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let fail = self.fail.load(Ordering::SeqCst);
        let delay = Duration::from_millis(u64::from(self.delay_ms.load(Ordering::SeqCst)));
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            if fail { Err("down".into()) } else { Ok(()) }
        })
    }
}

fn config() -> Config {
    Config {
        window: Window::Count(4),
        failure_rate_threshold: 50.0,
        slow_call_rate_threshold: 100.0,
        slow_call_duration: Duration::from_millis(100),
        minimum_calls: 4,
        permitted_in_half_open: 2,
        wait_in_open: Duration::from_secs(10),
        wait_multiplier: 2.0,
        max_wait_in_open: Duration::from_secs(30),
    }
}

async fn call<S>(svc: &mut S) -> Result<(), BoxError>
where
    S: Service<(), Response = (), Error = BoxError>,
{
    svc.ready().await?.call(()).await
}

fn is_open(e: &BoxError) -> Option<&Open> {
    e.downcast_ref::<Open>()
}

#[tokio::test(start_paused = true)]
async fn opens_on_failure_rate_waits_then_closes_after_good_trials() {
    let dep = Dependency::default();
    let transitions = Arc::new(Mutex::new(Vec::new()));
    let seen = transitions.clone();
    let breaker = Arc::new(
        Breaker::builder("dep", config())
            .unwrap()
            .on_transition(move |_, t| seen.lock().unwrap().push((t.from, t.to)))
            .build(),
    );
    let mut svc = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(breaker.clone(), ErrorsFail))
        .service(dep.clone());

    // Three calls are under the minimum: no judgement yet.
    call(&mut svc).await.unwrap();
    dep.fail.store(true, Ordering::SeqCst);
    assert!(call(&mut svc).await.is_err());
    assert!(call(&mut svc).await.is_err());
    assert_eq!(breaker.state(), State::Closed);
    // The fourth makes 3 failures of 4: 75% >= 50%.
    assert!(call(&mut svc).await.is_err());
    assert_eq!(breaker.state(), State::Open);

    // Open: rejected without calling the dependency, with the time left.
    let calls = dep.calls.load(Ordering::SeqCst);
    let err = call(&mut svc).await.unwrap_err();
    let open = is_open(&err).expect("an Open error");
    assert_eq!(open.retry_after, Some(Duration::from_secs(10)));
    assert_eq!(dep.calls.load(Ordering::SeqCst), calls);

    tokio::time::advance(Duration::from_millis(9_999)).await;
    assert!(is_open(&call(&mut svc).await.unwrap_err()).is_some());
    tokio::time::advance(Duration::from_millis(1)).await;

    // Half-open: two trials pass, and both succeeding closes the breaker.
    dep.fail.store(false, Ordering::SeqCst);
    call(&mut svc).await.unwrap();
    assert_eq!(breaker.state(), State::HalfOpen);
    call(&mut svc).await.unwrap();
    assert_eq!(breaker.state(), State::Closed);
    assert_eq!(
        *transitions.lock().unwrap(),
        [
            (State::Closed, State::Open),
            (State::Open, State::HalfOpen),
            (State::HalfOpen, State::Closed)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn failed_trials_reopen_with_a_growing_wait_capped() {
    let dep = Dependency::default();
    let breaker = Breaker::new("dep", config()).unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(breaker.clone(), ErrorsFail))
        .service(dep.clone());
    dep.fail.store(true, Ordering::SeqCst);
    for _ in 0..4 {
        let _ = call(&mut svc).await;
    }
    let retry_after = |e: BoxError| {
        is_open(&e)
            .and_then(|o| o.retry_after)
            .expect("open with a wait")
    };
    let mut wait = retry_after(call(&mut svc).await.unwrap_err());
    assert_eq!(wait, Duration::from_secs(10));
    for expected in [20, 30, 30] {
        tokio::time::advance(wait).await;
        // Two failing trials: open again, for longer, up to the cap.
        let _ = call(&mut svc).await;
        let _ = call(&mut svc).await;
        assert_eq!(breaker.state(), State::Open);
        wait = retry_after(call(&mut svc).await.unwrap_err());
        assert_eq!(wait, Duration::from_secs(expected));
    }
}

#[tokio::test(start_paused = true)]
async fn slow_calls_open_the_breaker() {
    let dep = Dependency::default();
    let breaker = Breaker::new(
        "dep",
        Config {
            slow_call_rate_threshold: 50.0,
            ..config()
        },
    )
    .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(breaker.clone(), ErrorsFail))
        .service(dep.clone());
    dep.delay_ms.store(99, Ordering::SeqCst);
    for _ in 0..4 {
        call(&mut svc).await.unwrap();
    }
    assert_eq!(
        breaker.state(),
        State::Closed,
        "just under the slow-call duration"
    );
    dep.delay_ms.store(100, Ordering::SeqCst);
    for _ in 0..2 {
        call(&mut svc).await.unwrap();
    }
    assert_eq!(breaker.state(), State::Open, "2 slow of the last 4 is 50%");
}

#[tokio::test(start_paused = true)]
async fn a_call_cancelled_by_an_outer_timeout_is_a_failure_and_frees_its_trial_slot() {
    let dep = Dependency::default();
    let breaker = Breaker::new(
        "dep",
        Config {
            minimum_calls: 1,
            window: Window::Count(1),
            permitted_in_half_open: 1,
            ..config()
        },
    )
    .unwrap();
    let mut svc = ServiceBuilder::new()
        .timeout(Duration::from_millis(50))
        .layer(CircuitBreakerLayer::new(breaker.clone(), ErrorsFail))
        .service(dep.clone());
    dep.delay_ms.store(1_000, Ordering::SeqCst);
    assert!(call(&mut svc).await.is_err());
    assert_eq!(
        breaker.state(),
        State::Open,
        "the dropped call counted as a failure"
    );
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(call(&mut svc).await.is_err(), "the trial times out too");
    assert_eq!(
        breaker.state(),
        State::Open,
        "and the slot is not left taken"
    );
    tokio::time::advance(Duration::from_secs(20)).await;
    dep.delay_ms.store(0, Ordering::SeqCst);
    call(&mut svc).await.unwrap();
    assert_eq!(breaker.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn operators_can_force_open_close_and_disable() {
    let dep = Dependency::default();
    let metrics = BreakerMetrics::default();
    let registry = telemetry::metrics::Metrics::new("test");
    metrics.register(&registry);
    let breaker = Arc::new(
        Breaker::builder("dep", config())
            .unwrap()
            .metrics(metrics)
            .build(),
    );
    let mut svc = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(breaker.clone(), ErrorsFail))
        .service(dep.clone());

    breaker.force_open();
    let err = call(&mut svc).await.unwrap_err();
    assert_eq!(is_open(&err).unwrap().state, State::ForcedOpen);
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert!(
        call(&mut svc).await.is_err(),
        "forced open does not time out"
    );
    let text = registry.encode();
    assert!(
        text.contains(r#"bazaar_circuit_state{service="test",breaker="dep"} 3"#),
        "{text}"
    );
    assert!(text.contains(r#"outcome="rejected""#));

    breaker.disable();
    dep.fail.store(true, Ordering::SeqCst);
    for _ in 0..10 {
        assert!(call(&mut svc).await.is_err());
    }
    assert_eq!(breaker.state(), State::Disabled, "disabled records nothing");

    breaker.force_closed();
    assert_eq!(breaker.snapshot().calls_in_window, 0);
    assert_eq!(breaker.state(), State::Closed);
}

#[test]
fn invalid_configs_name_every_field() {
    let errors = Breaker::new(
        "x",
        Config {
            failure_rate_threshold: 0.0,
            minimum_calls: 0,
            window: Window::Count(0),
            ..Config::default()
        },
    )
    .unwrap_err();
    let fields: Vec<&str> = errors.iter().map(|e| e.field).collect();
    assert_eq!(
        fields,
        ["window", "failure_rate_threshold", "minimum_calls"]
    );
}
