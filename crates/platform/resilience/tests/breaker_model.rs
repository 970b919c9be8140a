//! The breaker's state machine against a small reference model, under random call
//! outcomes, durations, concurrency, clock steps and operator overrides.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use proptest::prelude::*;
use resilience::circuit_breaker::{Config, Core, Outcome, State, Window};
use tokio::time::Instant;

/// The model keeps every recorded call and recomputes rates from scratch.
struct Model {
    cfg: Config,
    state: State,
    history: Vec<(Duration, bool, bool)>, // (time since origin, failed, slow)
    open_until: Option<Duration>,
    openings: u32,
    trial_admitted: u32,
    trials: Vec<(bool, bool)>,
    epoch: u64,
}

impl Model {
    fn new(cfg: Config) -> Self {
        Self {
            cfg,
            state: State::Closed,
            history: Vec::new(),
            open_until: None,
            openings: 0,
            trial_admitted: 0,
            trials: Vec::new(),
            epoch: 0,
        }
    }

    fn window(&self, now: Duration) -> Vec<(bool, bool)> {
        match self.cfg.window {
            Window::Count(n) => self
                .history
                .iter()
                .rev()
                .take(n as usize)
                .map(|h| (h.1, h.2))
                .collect(),
            Window::Time(span) => {
                let second = now.as_secs();
                self.history
                    .iter()
                    .filter(|h| h.0.as_secs() + span.as_secs() > second)
                    .map(|h| (h.1, h.2))
                    .collect()
            }
        }
    }

    fn rates(calls: &[(bool, bool)]) -> (f64, f64) {
        let n = calls.len() as f64;
        if calls.is_empty() {
            return (0.0, 0.0);
        }
        let f = calls.iter().filter(|c| c.0).count() as f64;
        let s = calls.iter().filter(|c| c.1).count() as f64;
        (f * 100.0 / n, s * 100.0 / n)
    }

    fn trips(&self, calls: &[(bool, bool)]) -> bool {
        let (f, s) = Self::rates(calls);
        f >= self.cfg.failure_rate_threshold || s >= self.cfg.slow_call_rate_threshold
    }

    fn go(&mut self, to: State, now: Duration) {
        self.state = to;
        self.epoch += 1;
        self.trial_admitted = 0;
        self.trials.clear();
        match to {
            State::Open => {
                self.openings += 1;
                let wait = self.cfg.wait_in_open.as_secs_f64()
                    * self.cfg.wait_multiplier.powi(self.openings as i32 - 1);
                self.open_until = Some(
                    now + Duration::from_secs_f64(
                        wait.min(self.cfg.max_wait_in_open.as_secs_f64()),
                    ),
                );
            }
            State::Closed => {
                self.openings = 0;
                self.history.clear();
                self.open_until = None;
            }
            State::HalfOpen => self.open_until = None,
            State::ForcedOpen | State::Disabled => {
                self.history.clear();
                self.open_until = None;
            }
        }
    }

    /// Returns whether the call is admitted.
    fn acquire(&mut self, now: Duration) -> bool {
        if self.state == State::Open && self.open_until.is_some_and(|t| now >= t) {
            self.go(State::HalfOpen, now);
        }
        match self.state {
            State::Closed | State::Disabled => true,
            State::HalfOpen if self.trial_admitted < self.cfg.permitted_in_half_open => {
                self.trial_admitted += 1;
                true
            }
            _ => false,
        }
    }

    fn record(&mut self, outcome: Outcome, duration: Duration, now: Duration) {
        let slow = duration >= self.cfg.slow_call_duration;
        let failed = outcome == Outcome::Failure;
        match (self.state, outcome) {
            (State::HalfOpen, Outcome::Ignored) => self.trial_admitted -= 1,
            (_, Outcome::Ignored) => {}
            (State::Closed, _) => {
                self.history.push((now, failed, slow));
                let window = self.window(now);
                if window.len() as u32 >= self.cfg.minimum_calls && self.trips(&window) {
                    self.go(State::Open, now);
                }
            }
            (State::HalfOpen, _) => {
                self.trials.push((failed, slow));
                if self.trials.len() as u32 == self.cfg.permitted_in_half_open {
                    let trials = self.trials.clone();
                    let to = if self.trips(&trials) {
                        State::Open
                    } else {
                        State::Closed
                    };
                    self.go(to, now);
                }
            }
            _ => {}
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// Several concurrent calls: all acquire, then all finish in order.
    Calls(Vec<(u8, u16)>),
    Advance(u16),
    Force(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => prop::collection::vec((0u8..10, 0u16..400), 1..4).prop_map(Op::Calls),
        3 => (0u16..3000).prop_map(Op::Advance),
        1 => (0u8..3).prop_map(Op::Force),
    ]
}

fn config() -> impl Strategy<Value = Config> {
    (
        prop_oneof![
            (1u32..12).prop_map(Window::Count),
            (1u64..5).prop_map(|s| Window::Time(Duration::from_secs(s)))
        ],
        prop_oneof![Just(25.0), Just(50.0), Just(100.0)],
        prop_oneof![Just(50.0), Just(100.0)],
        1u32..6,
        1u32..4,
        1.0f64..3.0,
    )
        .prop_map(|(window, failure, slow, min, trials, mult)| Config {
            window,
            failure_rate_threshold: failure,
            slow_call_rate_threshold: slow,
            slow_call_duration: Duration::from_millis(250),
            minimum_calls: min,
            permitted_in_half_open: trials,
            wait_in_open: Duration::from_millis(1000),
            wait_multiplier: mult,
            max_wait_in_open: Duration::from_millis(5000),
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn breaker_matches_the_reference_model(cfg in config(), ops in prop::collection::vec(op(), 1..80)) {
        let origin = Instant::now();
        let mut core = Core::new(cfg.clone(), origin);
        let mut model = Model::new(cfg);
        let mut now = Duration::ZERO;
        for op in ops {
            match op {
                Op::Advance(ms) => now += Duration::from_millis(u64::from(ms)),
                Op::Force(which) => {
                    let to = [State::ForcedOpen, State::Closed, State::Disabled][which as usize];
                    core.force(to, origin + now);
                    if to != model.state || to == State::Closed {
                        model.go(to, now);
                    }
                }
                Op::Calls(calls) => {
                    let mut permits = Vec::new();
                    for (kind, ms) in calls {
                        let (result, _) = core.acquire(origin + now);
                        let admitted = model.acquire(now);
                        prop_assert_eq!(result.is_ok(), admitted, "admission differs in {:?}", model.state);
                        if let Ok(p) = result {
                            permits.push((p, model.epoch, kind, ms));
                        }
                    }
                    for (permit, epoch, kind, ms) in permits {
                        let outcome = match kind { 0..=5 => Outcome::Success, 6..=8 => Outcome::Failure, _ => Outcome::Ignored };
                        let duration = Duration::from_millis(u64::from(ms));
                        now += duration / 4;
                        core.record(permit, outcome, duration, origin + now);
                        // Outcomes of calls admitted before a transition count for nothing.
                        if model.epoch == epoch {
                            model.record(outcome, duration, now);
                        }
                    }
                }
            }
            prop_assert_eq!(core.state(), model.state);
        }
    }
}
