//! A client-side rate limiter (GCRA, the "generic cell rate algorithm"): a steady
//! rate with a burst, one timestamp of state. A call over the rate waits for its turn
//! when that comes within `max_wait`, and is rejected with the time to wait otherwise.

pub mod error;
mod layer;

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub use self::layer::{RateLimit, RateLimitLayer, ResponseFuture};

/// A rate (`per_second`, > 0) with a burst (calls allowed at once, >= 1).
#[derive(Debug)]
pub struct Limiter {
    name: std::sync::Arc<str>,
    interval: Duration,
    tolerance: Duration,
    max_wait: Duration,
    /// The theoretical arrival time of the next call.
    tat: Mutex<Option<Instant>>,
}

impl Limiter {
    pub fn new(
        name: &str,
        per_second: f64,
        burst: u32,
        max_wait: Duration,
    ) -> Option<std::sync::Arc<Self>> {
        if !per_second.is_finite() || per_second <= 0.0 || burst == 0 {
            return None;
        }
        let interval = Duration::from_secs_f64(1.0 / per_second);
        Some(std::sync::Arc::new(Self {
            name: std::sync::Arc::from(name),
            interval,
            tolerance: interval * (burst - 1),
            max_wait,
            tat: Mutex::new(None),
        }))
    }

    /// Reserves a slot at `now`: `Ok(delay)` to wait before calling (zero when under
    /// the rate), or `Err(retry_after)` when the wait would exceed `max_wait`.
    pub fn reserve(&self, now: Instant) -> Result<Duration, Duration> {
        let mut tat = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        let next = tat.map_or(now, |t| t.max(now));
        let allowed_at = next.checked_sub(self.tolerance).unwrap_or(now);
        let delay = allowed_at.saturating_duration_since(now);
        if delay > self.max_wait {
            return Err(delay);
        }
        *tat = Some(next + self.interval);
        Ok(delay)
    }

    pub fn name(&self) -> &std::sync::Arc<str> {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bursts_then_paces_then_rejects_beyond_the_wait() {
        let limiter = Limiter::new("x", 10.0, 2, Duration::from_millis(150)).unwrap();
        let now = Instant::now();
        assert_eq!(limiter.reserve(now), Ok(Duration::ZERO));
        assert_eq!(limiter.reserve(now), Ok(Duration::ZERO), "the burst");
        assert_eq!(
            limiter.reserve(now),
            Ok(Duration::from_millis(100)),
            "paced at 10/s"
        );
        assert_eq!(
            limiter.reserve(now),
            Err(Duration::from_millis(200)),
            "beyond max_wait"
        );
        // A rejection reserves nothing: after a pause, the rate is available again.
        let later = now + Duration::from_secs(1);
        assert_eq!(limiter.reserve(later), Ok(Duration::ZERO));
        assert!(Limiter::new("x", 0.0, 1, Duration::ZERO).is_none());
        assert!(Limiter::new("x", f64::NAN, 1, Duration::ZERO).is_none());
    }
}
