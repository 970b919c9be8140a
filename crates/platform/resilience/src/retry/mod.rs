//! Retries that cannot amplify an outage: a bounded number of attempts, exponential
//! backoff with full jitter (so retrying clients do not synchronize), `Retry-After`
//! honoured, idempotent requests only, never past the request's deadline, and a
//! retry budget (tower's token bucket: retries at most a fixed share of requests).
//!
//! [`RetryPolicy`] is the decision; [`HttpRetry`] plugs it into `tower::retry` for
//! HTTP requests whose body can be cloned; the chassis client uses the policy directly.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method, StatusCode};
use rand::Rng;
use tower::retry::budget::{Budget, TpsBudget};

/// Retry decisions and the budget they draw on. Share one per downstream.
#[derive(Debug)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Retry only idempotent methods (the default); turn off only for a downstream
    /// whose non-idempotent endpoints deduplicate (idempotency keys).
    pub idempotent_only: bool,
    budget: TpsBudget,
}

/// How long deposits count towards the budget.
const BUDGET_TTL: Duration = Duration::from_secs(10);
/// Retries always allowed per second, so a quiet client can still retry.
const BUDGET_MIN_PER_SEC: u32 = 10;

impl RetryPolicy {
    /// `budget_ratio`: retries allowed per request, e.g. 0.2 = at most 20% extra load.
    pub fn new(
        max_attempts: u32,
        base_delay: Duration,
        max_delay: Duration,
        budget_ratio: f32,
    ) -> Arc<Self> {
        Arc::new(Self {
            max_attempts: max_attempts.max(1),
            base_delay,
            max_delay,
            idempotent_only: true,
            budget: TpsBudget::new(BUDGET_TTL, BUDGET_MIN_PER_SEC, budget_ratio),
        })
    }

    /// Allows retrying non-idempotent requests too (see `idempotent_only`).
    pub fn retrying_non_idempotent(self: Arc<Self>) -> Arc<Self> {
        match Arc::try_unwrap(self) {
            Ok(mut p) => {
                p.idempotent_only = false;
                Arc::new(p)
            }
            Err(shared) => shared,
        }
    }

    /// Counts a first attempt towards the budget.
    pub fn on_request(&self) {
        self.budget.deposit();
    }

    /// Takes one retry from the budget, for callers that count attempts themselves
    /// (a gateway whose routes override the attempts); `false` when it is spent.
    pub fn withdraw(&self) -> bool {
        self.budget.withdraw()
    }

    /// After attempt number `attempt` (1-based) failed retryably: the delay before the
    /// next one, or `None` when attempts, deadline or budget say stop.
    pub fn next_delay(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        time_left: Option<Duration>,
    ) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let delay =
            retry_after.unwrap_or_else(|| full_jitter(self.base_delay, self.max_delay, attempt));
        // A retry that cannot finish before the deadline is wasted load.
        if time_left.is_some_and(|left| delay >= left) {
            return None;
        }
        self.budget.withdraw().then_some(delay)
    }
}

/// A random delay in `[0, min(max, base * 2^(attempt-1))]` (AWS's "full jitter").
pub fn full_jitter(base: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(
        1u32.checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX),
    );
    let ceiling = exp.min(max);
    let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::thread_rng().gen_range(0..=ms))
}

/// Methods whose repetition has the same effect as one call (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Statuses worth retrying: the server says it could not serve this time.
pub fn is_retryable_status(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
            | StatusCode::TOO_MANY_REQUESTS
    )
}

/// `Retry-After` as delta-seconds (the form Bazaar's services send).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

mod layer;
pub use layer::HttpRetry;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_under_the_exponential_ceiling_and_the_cap() {
        for attempt in 1..8 {
            for _ in 0..200 {
                let d = full_jitter(
                    Duration::from_millis(10),
                    Duration::from_millis(200),
                    attempt,
                );
                let ceiling = (10u64 << (attempt - 1)).min(200);
                assert!(d <= Duration::from_millis(ceiling), "{attempt}: {d:?}");
            }
        }
        assert!(
            full_jitter(Duration::from_millis(10), Duration::from_secs(1), 200)
                <= Duration::from_secs(1)
        );
    }

    #[test]
    fn attempts_deadline_and_retry_after_bound_retries() {
        let p = RetryPolicy::new(
            3,
            Duration::from_millis(10),
            Duration::from_millis(100),
            0.2,
        );
        assert!(p.next_delay(1, None, None).is_some());
        assert!(p.next_delay(3, None, None).is_none(), "three attempts made");
        assert_eq!(
            p.next_delay(1, Some(Duration::from_secs(2)), None),
            Some(Duration::from_secs(2))
        );
        assert!(
            p.next_delay(
                1,
                Some(Duration::from_secs(2)),
                Some(Duration::from_secs(1))
            )
            .is_none()
        );
    }

    #[test]
    fn the_budget_caps_retries_to_a_share_of_requests() {
        let p = RetryPolicy::new(10, Duration::ZERO, Duration::ZERO, 0.2);
        for _ in 0..1000 {
            p.on_request();
        }
        let granted = (0..1000)
            .filter(|_| p.next_delay(1, None, None).is_some())
            .count();
        // 20% of 1000 requests plus the per-second reserve (10/s over a 10 s TTL).
        assert!((200..=300).contains(&granted), "{granted} retries granted");
    }
}
