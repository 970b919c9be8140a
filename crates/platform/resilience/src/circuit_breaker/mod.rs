//! A circuit breaker as a tower layer: count- or time-based sliding windows,
//! failure-rate and slow-call-rate thresholds, a minimum number of calls, limited
//! trial calls in half-open, a growing wait in open, operator overrides
//! (FORCED_OPEN, DISABLED), state-change listeners and Prometheus metrics.
//!
//! ```
//! use resilience::circuit_breaker::{Breaker, CircuitBreakerLayer, Config, ErrorsFail};
//! let breaker = Breaker::new("products", Config::default()).unwrap();
//! let layer = CircuitBreakerLayer::new(breaker.clone(), ErrorsFail);
//! # let _ = layer;
//! ```

mod config;
mod core;
pub mod error;
mod future;
mod layer;
mod metrics;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

pub use self::config::{Config, InvalidConfig, Window};
pub use self::core::{Core, Outcome, Permit, Rejected, State, Transition};
pub use self::future::ResponseFuture;
pub use self::layer::{CircuitBreaker, CircuitBreakerLayer};
pub use self::metrics::BreakerMetrics;

type Listener = Box<dyn Fn(&str, Transition) + Send + Sync>;

/// One breaker, shared by every clone of the services it guards.
pub struct Breaker {
    name: Arc<str>,
    core: Mutex<Core>,
    listeners: Vec<Listener>,
    metrics: Option<BreakerMetrics>,
}

/// A breaker's state and window, for admin endpoints.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Snapshot {
    pub name: String,
    pub state: State,
    pub failure_rate: f64,
    pub slow_call_rate: f64,
    pub calls_in_window: u32,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("name", &self.name)
            .field("state", &self.state())
            .finish()
    }
}

impl Breaker {
    /// A closed breaker; every invalid setting is reported.
    pub fn new(name: &str, config: Config) -> Result<Arc<Self>, Vec<InvalidConfig>> {
        Self::builder(name, config).map(|b| Arc::new(b.build()))
    }

    /// For listeners and metrics before sharing.
    pub fn builder(name: &str, config: Config) -> Result<BreakerBuilder, Vec<InvalidConfig>> {
        let errors = config.validate();
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(BreakerBuilder(Breaker {
            name: Arc::from(name),
            core: Mutex::new(Core::new(config, Instant::now())),
            listeners: Vec::new(),
            metrics: None,
        }))
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    fn core(&self) -> std::sync::MutexGuard<'_, Core> {
        // The core has no invariant a panicking holder could break half-way.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> State {
        self.core().state()
    }

    /// Leave for one call now.
    pub fn try_acquire(&self) -> Result<Permit, Rejected> {
        self.try_acquire_at(Instant::now())
    }

    /// [`try_acquire`](Self::try_acquire) with a clock reading the caller already has.
    pub fn try_acquire_at(&self, now: Instant) -> Result<Permit, Rejected> {
        let (result, transition) = self.core().acquire(now);
        self.after(transition);
        if result.is_err()
            && let Some(m) = &self.metrics
        {
            m.rejected(&self.name);
        }
        result
    }

    /// Records how a permitted call ended.
    pub fn record(&self, permit: Permit, outcome: Outcome, duration: Duration) {
        let transition = self
            .core()
            .record(permit, outcome, duration, Instant::now());
        if let Some(m) = &self.metrics {
            m.outcome(&self.name, outcome);
        }
        self.after(transition);
    }

    /// Rejects every call until [`force_closed`](Self::force_closed).
    pub fn force_open(&self) {
        let t = self.core().force(State::ForcedOpen, Instant::now());
        self.after(t);
    }

    /// Back to a fresh CLOSED (window emptied), from any state.
    pub fn force_closed(&self) {
        let t = self.core().force(State::Closed, Instant::now());
        self.after(t);
    }

    /// Lets every call through and records nothing.
    pub fn disable(&self) {
        let t = self.core().force(State::Disabled, Instant::now());
        self.after(t);
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut core = self.core();
        let (failure_rate, slow_call_rate, calls_in_window) = core.metrics(Instant::now());
        Snapshot {
            name: self.name.to_string(),
            state: core.state(),
            failure_rate,
            slow_call_rate,
            calls_in_window,
        }
    }

    fn after(&self, transition: Option<Transition>) {
        let Some(t) = transition else { return };
        tracing::warn!(breaker = %self.name, from = ?t.from, to = ?t.to, "circuit breaker state changed");
        if let Some(m) = &self.metrics {
            m.state(&self.name, t.to);
        }
        for listener in &self.listeners {
            listener(&self.name, t);
        }
    }
}

/// Adds listeners and metrics to a breaker before it is shared.
pub struct BreakerBuilder(Breaker);

impl BreakerBuilder {
    /// Called on every state change (after the change).
    pub fn on_transition(mut self, f: impl Fn(&str, Transition) + Send + Sync + 'static) -> Self {
        self.0.listeners.push(Box::new(f));
        self
    }

    pub fn metrics(mut self, metrics: BreakerMetrics) -> Self {
        metrics.state(&self.0.name, State::Closed);
        self.0.metrics = Some(metrics);
        self
    }

    pub fn build(self) -> Breaker {
        self.0
    }
}

/// Decides what a call's result means to the breaker.
pub trait Classify<T, E> {
    fn classify(&self, result: Result<&T, &E>) -> Outcome;
}

/// Errors are failures, responses successes.
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorsFail;

impl<T, E> Classify<T, E> for ErrorsFail {
    fn classify(&self, result: Result<&T, &E>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        }
    }
}

/// For HTTP: errors and 5xx responses are failures; 4xx are the caller's mistakes
/// and count as successes of the dependency.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerErrorsFail;

impl<B, E> Classify<http::Response<B>, E> for ServerErrorsFail {
    fn classify(&self, result: Result<&http::Response<B>, &E>) -> Outcome {
        match result {
            Ok(r) if r.status().is_server_error() => Outcome::Failure,
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        }
    }
}

impl<F, T, E> Classify<T, E> for F
where
    F: Fn(Result<&T, &E>) -> Outcome,
{
    fn classify(&self, result: Result<&T, &E>) -> Outcome {
        self(result)
    }
}
