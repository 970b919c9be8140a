//! Resilience for calls between services, as tower layers (what Resilience4j and
//! Polly are to the JVM and .NET). Each layer is its own module with tower's shape:
//! `Xxx<S>`, `XxxLayer`, a response future, an error type.
//!
//! - [`circuit_breaker`]: sliding-window breaker with half-open trials, operator
//!   overrides, listeners and metrics.
//! - [`bulkhead`]: bounded concurrency with a bounded queue wait.
//! - [`retry`]: attempts, full-jitter backoff, `Retry-After`, idempotency, budget.
//! - [`rate_limit`]: a client-side GCRA rate limiter that paces or rejects.
//! - [`fallback`]: a typed fallback whose answers are marked degraded.
//! - [`timeout`]: a per-call deadline within the request's own, told to the callee.
#![forbid(unsafe_code)]

pub mod bulkhead;
pub mod circuit_breaker;
pub mod fallback;
pub mod rate_limit;
pub mod retry;
pub mod timeout;

/// The error a rejecting future was built with; a second poll (a contract breach by
/// the caller) gets an error rather than a panic.
pub(crate) fn take_error<E: Into<tower::BoxError>>(slot: &mut Option<E>) -> tower::BoxError {
    slot.take()
        .map(Into::into)
        .unwrap_or_else(|| "polled after completion".into())
}
