//! The orchestrator's state machine.
//!
//! A saga runs its steps in order: it sends a step's command and waits for the reply.
//! A reply that the step is done moves to the next step; the last one done completes
//! the saga. A reply that the step failed (the participant did nothing: stock ran out,
//! the card was declined) turns the saga to compensation from the step before it. A
//! step unanswered within its timeout is sent again, and after its last attempt the
//! saga compensates from that step itself, as its effect is unknown (an undo of
//! something never done is a no-op for an idempotent participant). Compensation runs
//! in reverse over the steps that have an effect to undo, each retried with growing
//! backoff until it is acknowledged: an undo cannot be given up on.
//!
//! Every input is taken with `now`, and every transition says what to send and what
//! to write in the saga's history, so the host persists both in one transaction.
//! Replies may arrive twice or late: a reply to anything but the step awaited is
//! ignored.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

/// One step of a saga.
#[derive(Clone, Debug)]
pub struct StepDef {
    pub name: String,
    /// How long one attempt may wait for its reply.
    pub timeout: Duration,
    /// Attempts before an unanswered step counts as failed (`timeout`).
    pub max_attempts: u32,
    /// Whether the step has an effect a compensation must undo.
    pub compensable: bool,
}

/// The steps of a saga, in order.
#[derive(Clone, Debug)]
pub struct Definition {
    pub name: String,
    pub steps: Vec<StepDef>,
    /// The longest wait between two attempts of a compensation.
    pub max_backoff: Duration,
}

impl Definition {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            steps: Vec::new(),
            max_backoff: Duration::from_secs(30),
        }
    }

    /// Adds a step.
    pub fn step(
        mut self,
        name: &str,
        timeout: Duration,
        max_attempts: u32,
        compensable: bool,
    ) -> Self {
        self.steps.push(StepDef {
            name: name.to_owned(),
            timeout,
            max_attempts: max_attempts.max(1),
            compensable,
        });
        self
    }

    fn backoff(&self, step: usize, attempt: u32) -> Duration {
        let base = self
            .steps
            .get(step)
            .map_or(Duration::from_secs(1), |s| s.timeout);
        base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.max_backoff)
    }
}

/// Where a saga is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Steps are being done.
    Running,
    /// A step failed: the ones before it are being undone.
    Compensating,
    /// Every step was done.
    Completed,
    /// Every step with an effect was undone.
    Compensated,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Completed | Phase::Compensated)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Compensating => "compensating",
            Phase::Completed => "completed",
            Phase::Compensated => "compensated",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Phase::Running,
            Phase::Compensating,
            Phase::Completed,
            Phase::Compensated,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }
}

/// Doing a step, or undoing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Do,
    Undo,
}

/// A saga instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Saga {
    pub id: String,
    pub phase: Phase,
    /// Running: the step awaiting its reply; compensating: the step being undone.
    pub step: usize,
    pub attempt: u32,
    /// When the current attempt counts as unanswered.
    #[serde(with = "time::serde::rfc3339")]
    pub deadline: OffsetDateTime,
    /// Why it compensates: the failed step's reason, or `timeout`.
    pub reason: Option<String>,
    /// The saga's input and every step's output, merged: what commands are built from.
    pub data: Value,
}

/// A command to send: do or undo `step`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    pub step: usize,
    pub direction: Direction,
    pub attempt: u32,
}

/// A participant's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// Done; its output is merged into the saga's data.
    Done(Value),
    /// Not done, with nothing to undo; the reason becomes the saga's.
    Failed(String),
}

/// What happens to a saga.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    Reply {
        step: usize,
        direction: Direction,
        reply: Reply,
    },
    /// Time passed: an attempt past its deadline is retried or given up.
    Tick,
    /// A participant undid a done step on its own (a reservation that expired):
    /// a running saga is compensated with this reason, from the step it awaits
    /// (whose effect is unknown) down. Anywhere else it changes nothing.
    Abort(String),
}

/// A line of the saga's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub step: usize,
    pub what: String,
}

/// What a transition asks of the host: send a command, record history.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Transition {
    pub send: Option<Command>,
    pub history: Vec<Entry>,
}

impl Transition {
    /// Nothing changed (a duplicate or stale reply, a tick before the deadline).
    pub fn is_noop(&self) -> bool {
        self.send.is_none() && self.history.is_empty()
    }
}

fn merge(data: &mut Value, output: Value) {
    match (data, output) {
        (Value::Object(into), Value::Object(from)) => into.extend(from),
        (_, Value::Null) => {}
        (data, output) => *data = output,
    }
}

impl Saga {
    /// A new saga on `data`, sending its first step.
    pub fn start(
        def: &Definition,
        id: &str,
        data: Value,
        now: OffsetDateTime,
    ) -> (Saga, Transition) {
        let mut saga = Saga {
            id: id.to_owned(),
            phase: Phase::Running,
            step: 0,
            attempt: 0,
            deadline: now,
            reason: None,
            data,
        };
        let mut t = Transition::default();
        saga.begin(def, 0, now, &mut t);
        (saga, t)
    }

    /// Applies `input` at `now`.
    pub fn apply(&mut self, def: &Definition, input: Input, now: OffsetDateTime) -> Transition {
        let mut t = Transition::default();
        match (self.phase, input) {
            (
                Phase::Running,
                Input::Reply {
                    step,
                    direction: Direction::Do,
                    reply,
                },
            ) if step == self.step => {
                match reply {
                    Reply::Done(output) => {
                        merge(&mut self.data, output);
                        t.note(step, "done");
                        self.begin(def, step + 1, now, &mut t);
                    }
                    Reply::Failed(reason) => {
                        t.note(step, &format!("failed: {reason}"));
                        self.reason = Some(reason);
                        // It did nothing: undo the steps before it.
                        self.compensate(def, step.checked_sub(1), now, &mut t);
                    }
                }
            }
            (Phase::Running, Input::Abort(reason)) => {
                t.note(self.step, &format!("aborted: {reason}"));
                self.reason = Some(reason);
                self.compensate(def, Some(self.step), now, &mut t);
            }
            (Phase::Running, Input::Tick) if now >= self.deadline => {
                let max = def.steps.get(self.step).map_or(1, |s| s.max_attempts);
                if self.attempt < max {
                    t.note(self.step, &format!("no reply to attempt {}", self.attempt));
                    self.send(def, Direction::Do, self.attempt + 1, now, &mut t);
                } else {
                    t.note(
                        self.step,
                        &format!("no reply after {} attempts", self.attempt),
                    );
                    self.reason = Some("timeout".to_owned());
                    // Its effect is unknown: undo it as well.
                    self.compensate(def, Some(self.step), now, &mut t);
                }
            }
            (
                Phase::Compensating,
                Input::Reply {
                    step,
                    direction: Direction::Undo,
                    reply,
                },
            ) if step == self.step => match reply {
                Reply::Done(_) => {
                    t.note(step, "compensated");
                    self.compensate(def, step.checked_sub(1), now, &mut t);
                }
                Reply::Failed(why) => {
                    t.note(step, &format!("compensation failed: {why}; retrying"));
                    self.deadline = now + def.backoff(self.step, self.attempt);
                }
            },
            (Phase::Compensating, Input::Tick) if now >= self.deadline => {
                self.send(def, Direction::Undo, self.attempt + 1, now, &mut t);
            }
            _ => {}
        }
        t
    }

    /// Starts step `step` forward, or completes the saga past the last.
    fn begin(&mut self, def: &Definition, step: usize, now: OffsetDateTime, t: &mut Transition) {
        self.step = step;
        if step >= def.steps.len() {
            self.phase = Phase::Completed;
            self.attempt = 0;
            return;
        }
        self.send(def, Direction::Do, 1, now, t);
    }

    /// Undoes the highest step with an effect at or below `from`, or ends
    /// compensated when none is left.
    fn compensate(
        &mut self,
        def: &Definition,
        from: Option<usize>,
        now: OffsetDateTime,
        t: &mut Transition,
    ) {
        let next = from.and_then(|from| {
            (0..=from)
                .rev()
                .find(|i| def.steps.get(*i).is_some_and(|s| s.compensable))
        });
        match next {
            Some(step) => {
                self.phase = Phase::Compensating;
                self.step = step;
                self.send(def, Direction::Undo, 1, now, t);
            }
            None => {
                self.phase = Phase::Compensated;
                self.attempt = 0;
            }
        }
    }

    fn send(
        &mut self,
        def: &Definition,
        direction: Direction,
        attempt: u32,
        now: OffsetDateTime,
        t: &mut Transition,
    ) {
        self.attempt = attempt;
        // The first attempt waits the step's timeout; each later one, forward or
        // back, twice as long as the one before (up to the longest backoff): a
        // participant slow to answer is not sent the same command at a fixed rhythm.
        self.deadline = now
            + match attempt {
                1 => def
                    .steps
                    .get(self.step)
                    .map_or(Duration::from_secs(1), |s| s.timeout),
                _ => def.backoff(self.step, attempt),
            };
        t.note(
            self.step,
            match direction {
                Direction::Do => "sent",
                Direction::Undo => "compensation sent",
            },
        );
        t.send = Some(Command {
            step: self.step,
            direction,
            attempt,
        });
    }
}

impl Transition {
    fn note(&mut self, step: usize, what: &str) {
        self.history.push(Entry {
            step,
            what: what.to_owned(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn def() -> Definition {
        Definition::new("place-order")
            .step("reserve", Duration::from_secs(2), 3, true)
            .step("charge", Duration::from_secs(2), 2, true)
            .step("confirm", Duration::from_secs(2), 5, false)
    }

    fn t0() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap_or_else(|_| panic!())
    }

    fn reply(step: usize, direction: Direction, reply: Reply) -> Input {
        Input::Reply {
            step,
            direction,
            reply,
        }
    }

    fn sent(t: &Transition) -> Option<(usize, Direction, u32)> {
        t.send.as_ref().map(|c| (c.step, c.direction, c.attempt))
    }

    #[test]
    fn every_step_done_completes_with_the_outputs_merged() {
        let def = def();
        let (mut saga, t) = Saga::start(&def, "o-1", json!({"order": "o-1"}), t0());
        assert_eq!(sent(&t), Some((0, Direction::Do, 1)));
        let t = saga.apply(
            &def,
            reply(0, Direction::Do, Reply::Done(json!({"reservation": "r-1"}))),
            t0(),
        );
        assert_eq!(sent(&t), Some((1, Direction::Do, 1)));
        // The same reply again changes nothing.
        assert!(
            saga.apply(&def, reply(0, Direction::Do, Reply::Done(json!({}))), t0())
                .is_noop()
        );
        saga.apply(
            &def,
            reply(1, Direction::Do, Reply::Done(json!({"charge": "c-1"}))),
            t0(),
        );
        let t = saga.apply(
            &def,
            reply(2, Direction::Do, Reply::Done(Value::Null)),
            t0(),
        );
        assert_eq!((saga.phase, t.send), (Phase::Completed, None));
        assert_eq!(
            saga.data,
            json!({"order": "o-1", "reservation": "r-1", "charge": "c-1"})
        );
    }

    #[test]
    fn a_declined_charge_undoes_the_reservation_only() {
        let def = def();
        let (mut saga, _) = Saga::start(&def, "o-1", json!({}), t0());
        saga.apply(&def, reply(0, Direction::Do, Reply::Done(json!({}))), t0());
        let t = saga.apply(
            &def,
            reply(1, Direction::Do, Reply::Failed("payment_declined".into())),
            t0(),
        );
        assert_eq!(sent(&t), Some((0, Direction::Undo, 1)));
        assert_eq!(saga.reason.as_deref(), Some("payment_declined"));
        let t = saga.apply(
            &def,
            reply(0, Direction::Undo, Reply::Done(json!({}))),
            t0(),
        );
        assert_eq!((saga.phase, t.send), (Phase::Compensated, None));
    }

    #[test]
    fn out_of_stock_at_the_first_step_has_nothing_to_undo() {
        let def = def();
        let (mut saga, _) = Saga::start(&def, "o-1", json!({}), t0());
        let t = saga.apply(
            &def,
            reply(0, Direction::Do, Reply::Failed("out_of_stock".into())),
            t0(),
        );
        assert_eq!((saga.phase, t.send), (Phase::Compensated, None));
        assert_eq!(saga.reason.as_deref(), Some("out_of_stock"));
    }

    #[test]
    fn an_unanswered_step_is_retried_then_undone_itself_as_a_timeout() {
        let def = def();
        let (mut saga, _) = Saga::start(&def, "o-1", json!({}), t0());
        saga.apply(&def, reply(0, Direction::Do, Reply::Done(json!({}))), t0());
        // Before the deadline a tick does nothing.
        assert!(
            saga.apply(&def, Input::Tick, t0() + Duration::from_secs(1))
                .is_noop()
        );
        let t = saga.apply(&def, Input::Tick, t0() + Duration::from_secs(2));
        assert_eq!(sent(&t), Some((1, Direction::Do, 2)));
        // The second attempt waits twice the step's timeout (backoff).
        assert!(
            saga.apply(&def, Input::Tick, t0() + Duration::from_secs(4))
                .is_noop()
        );
        // The charge's last attempt goes unanswered: it may have happened, so it is
        // refunded, then the reservation released.
        let t = saga.apply(&def, Input::Tick, t0() + Duration::from_secs(6));
        assert_eq!(sent(&t), Some((1, Direction::Undo, 1)));
        assert_eq!(saga.reason.as_deref(), Some("timeout"));
        // A late reply to the charge no longer counts.
        assert!(
            saga.apply(&def, reply(1, Direction::Do, Reply::Done(json!({}))), t0())
                .is_noop()
        );
        let t = saga.apply(
            &def,
            reply(1, Direction::Undo, Reply::Done(json!({}))),
            t0() + Duration::from_secs(5),
        );
        assert_eq!(sent(&t), Some((0, Direction::Undo, 1)));
    }

    #[test]
    fn an_abort_while_running_undoes_the_awaited_step_and_those_before() {
        let def = def();
        let (mut saga, _) = Saga::start(&def, "o-1", json!({}), t0());
        saga.apply(&def, reply(0, Direction::Do, Reply::Done(json!({}))), t0());
        // The charge was sent; the reservation expired meanwhile.
        let t = saga.apply(&def, Input::Abort("reservation expired".into()), t0());
        assert_eq!(sent(&t), Some((1, Direction::Undo, 1)));
        assert_eq!(saga.phase, Phase::Compensating);
        assert_eq!(saga.reason.as_deref(), Some("reservation expired"));
        saga.apply(
            &def,
            reply(1, Direction::Undo, Reply::Done(json!({}))),
            t0(),
        );
        saga.apply(
            &def,
            reply(0, Direction::Undo, Reply::Done(json!({}))),
            t0(),
        );
        assert_eq!(saga.phase, Phase::Compensated);
        // Once ended (or compensating), an abort changes nothing.
        assert!(
            saga.apply(&def, Input::Abort("late".into()), t0())
                .is_noop()
        );
        assert_eq!(saga.reason.as_deref(), Some("reservation expired"));
    }

    #[test]
    fn a_compensation_is_retried_with_growing_backoff_until_acknowledged() {
        let def = def();
        let (mut saga, _) = Saga::start(&def, "o-1", json!({}), t0());
        saga.apply(&def, reply(0, Direction::Do, Reply::Done(json!({}))), t0());
        saga.apply(
            &def,
            reply(1, Direction::Do, Reply::Failed("payment_declined".into())),
            t0(),
        );
        let mut now = t0();
        let mut gaps = Vec::new();
        for _ in 0..6 {
            let due = saga.deadline;
            gaps.push((due - now).whole_seconds());
            now = due;
            let t = saga.apply(&def, Input::Tick, now);
            assert_eq!(t.send.map(|c| c.direction), Some(Direction::Undo));
        }
        assert_eq!(gaps, [2, 4, 8, 16, 30, 30]);
        saga.apply(&def, reply(0, Direction::Undo, Reply::Done(json!({}))), now);
        assert_eq!(saga.phase, Phase::Compensated);
    }

    /// Inputs a broker and participants may produce: replies to any step, either
    /// way, done or failed, duplicated or late, and time passing.
    fn input() -> impl Strategy<Value = (Input, u64)> {
        let reply =
            (0usize..3, any::<bool>(), any::<bool>()).prop_map(|(step, undo, ok)| Input::Reply {
                step,
                direction: if undo { Direction::Undo } else { Direction::Do },
                reply: if ok {
                    Reply::Done(json!({}))
                } else {
                    Reply::Failed("no".into())
                },
            });
        (
            prop_oneof![
                8 => reply,
                2 => Just(Input::Tick),
                1 => Just(Input::Abort("expired".into())),
            ],
            0u64..5,
        )
    }

    proptest! {
        /// Whatever arrives: only the awaited step's command is ever sent, undos go
        /// in reverse, a terminal saga stays put, a completed saga undid nothing, a
        /// compensated one undid every step that may have had an effect, and once
        /// the participants answer, every saga ends.
        #[test]
        fn sagas_keep_their_invariants_and_always_end(inputs in proptest::collection::vec(input(), 0..60)) {
            let def = def();
            let mut now = t0();
            let (mut saga, t) = Saga::start(&def, "s", json!({}), now);
            let mut may_have_effect = std::collections::BTreeSet::new();
            let mut undone = Vec::new();
            let mut undo_sent = false;
            let mut track = |saga: &Saga, t: &Transition, input: Option<&Input>, before: (Phase, usize)| {
                if let Some(Input::Reply { step, direction, reply }) = input {
                    if before == (Phase::Running, *step)
                        && *direction == Direction::Do
                        && matches!(reply, Reply::Failed(_))
                    {
                        may_have_effect.remove(step);
                    }
                    if before == (Phase::Compensating, *step) && *direction == Direction::Undo
                        && matches!(reply, Reply::Done(_)) {
                        undone.push(*step);
                    }
                }
                if let Some(c) = &t.send {
                    prop_assert_eq!(c.step, saga.step, "only the awaited step is sent");
                    match c.direction {
                        Direction::Do => { may_have_effect.insert(c.step); }
                        Direction::Undo => undo_sent = true,
                    }
                }
                Ok(())
            };
            track(&saga, &t, None, (Phase::Running, 0))?;
            let mut all = inputs.clone();
            // Then participants that answer every command, done, and time that passes.
            for _ in 0..40 {
                all.push((Input::Tick, 40));
            }
            for (input, advance) in all {
                now += Duration::from_secs(advance);
                let before = (saga.phase, saga.step);
                let input = match input {
                    // After the random part, answer what is awaited.
                    Input::Tick if advance == 40 && !saga.phase.is_terminal() => Input::Reply {
                        step: saga.step,
                        direction: if saga.phase == Phase::Running { Direction::Do } else { Direction::Undo },
                        reply: Reply::Done(json!({})),
                    },
                    other => other,
                };
                let t = saga.apply(&def, input.clone(), now);
                if before.0.is_terminal() {
                    prop_assert!(t.is_noop(), "a finished saga stays finished");
                }
                track(&saga, &t, Some(&input), before)?;
            }
            prop_assert!(saga.phase.is_terminal(), "ended: {:?}", saga.phase);
            let mut sorted = undone.clone();
            sorted.sort_unstable_by(|a, b| b.cmp(a));
            prop_assert_eq!(&undone, &sorted, "undone in reverse");
            if saga.phase == Phase::Completed {
                prop_assert!(!undo_sent, "a completed saga undid nothing");
            } else {
                let must: Vec<usize> = may_have_effect
                    .iter()
                    .copied()
                    .filter(|i| def.steps[*i].compensable)
                    .collect();
                for step in must {
                    prop_assert!(undone.contains(&step), "step {} undone", step);
                }
            }
        }
    }
}
