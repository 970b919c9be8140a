//! Breaker settings, with Resilience4j's defaults where they are sound.

use std::time::Duration;

/// The sliding window over which rates are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// The last N calls.
    Count(u32),
    /// The calls of the last span, in one-second buckets.
    Time(Duration),
}

/// A configuration error, naming the field.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("circuit breaker `{field}`: {problem}")]
pub struct InvalidConfig {
    pub field: &'static str,
    pub problem: &'static str,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub window: Window,
    /// Percent of failed calls (0-100] at or above which the breaker opens.
    pub failure_rate_threshold: f64,
    /// Percent of slow calls at or above which the breaker opens; 100 with no slow
    /// calls configured never trips.
    pub slow_call_rate_threshold: f64,
    /// A call lasting this long or more is slow.
    pub slow_call_duration: Duration,
    /// Calls needed in the window before rates are judged: a single failure out of
    /// one call is not a 100% failure rate worth opening for.
    pub minimum_calls: u32,
    /// Trial calls let through in half-open.
    pub permitted_in_half_open: u32,
    /// First wait in open state.
    pub wait_in_open: Duration,
    /// Each consecutive opening multiplies the wait (1.0 = constant).
    pub wait_multiplier: f64,
    pub max_wait_in_open: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            // 100 calls: enough for a rate to mean something at shop traffic.
            window: Window::Count(100),
            failure_rate_threshold: 50.0,
            slow_call_rate_threshold: 100.0,
            // Past the chassis's 5 s client deadline a call is certainly slow.
            slow_call_duration: Duration::from_secs(5),
            minimum_calls: 20,
            permitted_in_half_open: 5,
            wait_in_open: Duration::from_secs(5),
            wait_multiplier: 2.0,
            max_wait_in_open: Duration::from_secs(60),
        }
    }
}

impl Config {
    /// Every problem, so that config loading can report them together.
    pub fn validate(&self) -> Vec<InvalidConfig> {
        let mut errors = Vec::new();
        let mut check = |ok: bool, field, problem| {
            if !ok {
                errors.push(InvalidConfig { field, problem });
            }
        };
        match self.window {
            Window::Count(n) => check(n > 0, "window", "a count window needs at least 1 call"),
            Window::Time(d) => check(
                d >= Duration::from_secs(1),
                "window",
                "a time window needs at least 1s",
            ),
        }
        check(
            self.failure_rate_threshold > 0.0 && self.failure_rate_threshold <= 100.0,
            "failure_rate_threshold",
            "must be in (0, 100]",
        );
        check(
            self.slow_call_rate_threshold > 0.0 && self.slow_call_rate_threshold <= 100.0,
            "slow_call_rate_threshold",
            "must be in (0, 100]",
        );
        check(
            self.minimum_calls > 0,
            "minimum_calls",
            "must be at least 1",
        );
        check(
            self.permitted_in_half_open > 0,
            "permitted_in_half_open",
            "must be at least 1",
        );
        check(
            self.wait_multiplier >= 1.0,
            "wait_multiplier",
            "must be at least 1.0",
        );
        check(
            self.max_wait_in_open >= self.wait_in_open,
            "max_wait_in_open",
            "must be at least wait_in_open",
        );
        errors
    }
}
