//! The breaker's state machine, free of I/O and of the clock: every operation takes
//! `now`, so tests (and the property test's reference model) drive time themselves.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::config::{Config, Window};

/// The states of a breaker (Resilience4j's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    /// Calls pass; outcomes are recorded.
    Closed,
    /// Calls are rejected until the wait is over.
    Open,
    /// A few trial calls pass; their outcomes decide between closed and open.
    HalfOpen,
    /// Calls are rejected until an operator releases the breaker.
    ForcedOpen,
    /// Calls pass and nothing is recorded.
    Disabled,
}

impl State {
    /// The value of the `bazaar_circuit_state` gauge.
    pub fn as_gauge(self) -> i64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
            State::ForcedOpen => 3,
            State::Disabled => 4,
        }
    }
}

/// How a call ended, as the classifier saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// Neither: it releases a half-open slot and counts for nothing.
    Ignored,
}

/// Leave to make one call, tied to the state it was given in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permit {
    epoch: u64,
}

/// A rejected call, with how long until the breaker will try again (if it knows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub state: State,
    pub retry_after: Option<Duration>,
}

/// A state change, for events and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
}

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    failed: bool,
    slow: bool,
}

/// Outcomes in the sliding window, with running totals.
#[derive(Debug)]
struct Recorder {
    window: Window,
    /// Count window: one entry per call. Time window: one entry per second,
    /// `(second, calls, failures, slow)`.
    count: VecDeque<Sample>,
    buckets: VecDeque<(u64, u32, u32, u32)>,
    calls: u32,
    failures: u32,
    slow: u32,
}

impl Recorder {
    fn new(window: Window) -> Self {
        Self {
            window,
            count: VecDeque::new(),
            buckets: VecDeque::new(),
            calls: 0,
            failures: 0,
            slow: 0,
        }
    }

    fn reset(&mut self) {
        *self = Self::new(self.window);
    }

    fn record(&mut self, origin: Instant, now: Instant, sample: Sample) {
        match self.window {
            Window::Count(size) => {
                if self.count.len() == size as usize
                    && let Some(old) = self.count.pop_front()
                {
                    self.subtract(1, u32::from(old.failed), u32::from(old.slow));
                }
                self.count.push_back(sample);
            }
            Window::Time(_) => {
                self.expire(origin, now);
                let second = now.saturating_duration_since(origin).as_secs();
                match self.buckets.back_mut() {
                    Some(b) if b.0 == second => {
                        b.1 += 1;
                        b.2 += u32::from(sample.failed);
                        b.3 += u32::from(sample.slow);
                    }
                    _ => self.buckets.push_back((
                        second,
                        1,
                        u32::from(sample.failed),
                        u32::from(sample.slow),
                    )),
                }
            }
        }
        self.calls += 1;
        self.failures += u32::from(sample.failed);
        self.slow += u32::from(sample.slow);
    }

    /// Drops the seconds that left a time window.
    fn expire(&mut self, origin: Instant, now: Instant) {
        let Window::Time(span) = self.window else {
            return;
        };
        let second = now.saturating_duration_since(origin).as_secs();
        let span = span.as_secs().max(1);
        while let Some(&(s, calls, failures, slow)) = self.buckets.front() {
            if s + span > second {
                break;
            }
            self.buckets.pop_front();
            self.subtract(calls, failures, slow);
        }
    }

    fn subtract(&mut self, calls: u32, failures: u32, slow: u32) {
        self.calls -= calls;
        self.failures -= failures;
        self.slow -= slow;
    }
}

fn rate(part: u32, whole: u32) -> f64 {
    if whole == 0 {
        0.0
    } else {
        f64::from(part) * 100.0 / f64::from(whole)
    }
}

/// The breaker state machine. Not synchronized: the layer wraps it in a mutex.
#[derive(Debug)]
pub struct Core {
    config: Config,
    state: State,
    /// Bumped on every transition; outcomes of calls admitted in an older state
    /// are dropped, so a slow call from before an opening cannot close it again.
    epoch: u64,
    recorder: Recorder,
    origin: Instant,
    open_until: Option<Instant>,
    /// Consecutive openings without a close in between, for a growing wait.
    openings: u32,
    half_open_admitted: u32,
    half_open_done: u32,
    half_open_failures: u32,
    half_open_slow: u32,
}

impl Core {
    pub fn new(config: Config, now: Instant) -> Self {
        Self {
            recorder: Recorder::new(config.window),
            config,
            state: State::Closed,
            epoch: 0,
            origin: now,
            open_until: None,
            openings: 0,
            half_open_admitted: 0,
            half_open_done: 0,
            half_open_failures: 0,
            half_open_slow: 0,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Failure and slow-call rates (percent) and calls in the current window.
    pub fn metrics(&mut self, now: Instant) -> (f64, f64, u32) {
        self.recorder.expire(self.origin, now);
        let r = &self.recorder;
        (rate(r.failures, r.calls), rate(r.slow, r.calls), r.calls)
    }

    fn transition(&mut self, to: State, now: Instant) -> Transition {
        let from = self.state;
        self.state = to;
        self.epoch += 1;
        self.half_open_admitted = 0;
        self.half_open_done = 0;
        self.half_open_failures = 0;
        self.half_open_slow = 0;
        match to {
            State::Open => {
                self.openings += 1;
                self.open_until = Some(now + self.wait());
            }
            State::Closed => {
                self.openings = 0;
                self.open_until = None;
                self.recorder.reset();
            }
            State::HalfOpen => self.open_until = None,
            State::ForcedOpen | State::Disabled => {
                self.open_until = None;
                self.recorder.reset();
            }
        }
        Transition { from, to }
    }

    /// The wait in open state: grows by the multiplier with each consecutive opening,
    /// up to the cap.
    fn wait(&self) -> Duration {
        let base = self.config.wait_in_open.as_secs_f64();
        let exponent = i32::try_from(self.openings.saturating_sub(1)).unwrap_or(i32::MAX);
        let grown = base * self.config.wait_multiplier.powi(exponent);
        Duration::from_secs_f64(grown.min(self.config.max_wait_in_open.as_secs_f64()))
    }

    /// Asks leave for one call at `now`. May move OPEN -> HALF_OPEN.
    pub fn acquire(&mut self, now: Instant) -> (Result<Permit, Rejected>, Option<Transition>) {
        let mut transition = None;
        if self.state == State::Open && self.open_until.is_some_and(|t| now >= t) {
            transition = Some(self.transition(State::HalfOpen, now));
        }
        let result = match self.state {
            State::Closed | State::Disabled => Ok(Permit { epoch: self.epoch }),
            State::HalfOpen if self.half_open_admitted < self.config.permitted_in_half_open => {
                self.half_open_admitted += 1;
                Ok(Permit { epoch: self.epoch })
            }
            State::HalfOpen => Err(Rejected {
                state: State::HalfOpen,
                retry_after: None,
            }),
            State::Open => Err(Rejected {
                state: State::Open,
                retry_after: self.open_until.map(|t| t.saturating_duration_since(now)),
            }),
            State::ForcedOpen => Err(Rejected {
                state: State::ForcedOpen,
                retry_after: None,
            }),
        };
        (result, transition)
    }

    /// Records how a permitted call ended. May move CLOSED -> OPEN or
    /// HALF_OPEN -> CLOSED/OPEN.
    pub fn record(
        &mut self,
        permit: Permit,
        outcome: Outcome,
        duration: Duration,
        now: Instant,
    ) -> Option<Transition> {
        if permit.epoch != self.epoch {
            return None;
        }
        let slow = duration >= self.config.slow_call_duration;
        match (self.state, outcome) {
            (State::Disabled | State::Open | State::ForcedOpen, _) => None,
            (State::HalfOpen, Outcome::Ignored) => {
                self.half_open_admitted = self.half_open_admitted.saturating_sub(1);
                None
            }
            (_, Outcome::Ignored) => None,
            (State::Closed, outcome) => {
                let sample = Sample {
                    failed: outcome == Outcome::Failure,
                    slow,
                };
                self.recorder.record(self.origin, now, sample);
                let (failure_rate, slow_rate, calls) = self.metrics(now);
                (calls >= self.config.minimum_calls && self.exceeds(failure_rate, slow_rate))
                    .then(|| self.transition(State::Open, now))
            }
            (State::HalfOpen, outcome) => {
                self.half_open_done += 1;
                self.half_open_failures += u32::from(outcome == Outcome::Failure);
                self.half_open_slow += u32::from(slow);
                if self.half_open_done < self.config.permitted_in_half_open {
                    return None;
                }
                let failure_rate = rate(self.half_open_failures, self.half_open_done);
                let slow_rate = rate(self.half_open_slow, self.half_open_done);
                let to = if self.exceeds(failure_rate, slow_rate) {
                    State::Open
                } else {
                    State::Closed
                };
                Some(self.transition(to, now))
            }
        }
    }

    fn exceeds(&self, failure_rate: f64, slow_rate: f64) -> bool {
        failure_rate >= self.config.failure_rate_threshold
            || slow_rate >= self.config.slow_call_rate_threshold
    }

    /// Operator controls: FORCED_OPEN, DISABLED, or back to a fresh CLOSED.
    pub fn force(&mut self, to: State, now: Instant) -> Option<Transition> {
        if to == self.state && to != State::Closed {
            return None;
        }
        Some(self.transition(to, now))
    }
}
