//! Handing out the messages of the partitions a group member owns, for backends
//! whose broker gives a member whole partitions (Kafka, RabbitMQ streams) and leaves
//! redelivery to the client: one message per partition in flight, a nacked message
//! kept and handed out again after its delay (nothing behind it overtakes it), a
//! hand-out not settled within the ack wait handed out again, and settlements of a
//! hand-out that expired or of an ownership that ended ignored.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::bus::{Acker, BoxFuture, BusError, Delivery, Position};
use crate::envelope::CloudEvent;

/// A message buffered for a partition.
#[derive(Clone, Debug)]
pub(crate) struct Fetched {
    pub offset: u64,
    pub key: String,
    pub payload: Bytes,
    /// The broker's headers that are text (`ce-*` attributes in binary mode).
    pub headers: Vec<(String, String)>,
}

impl Fetched {
    /// The event: binary mode when the headers carry the attributes, else the
    /// structured document (or bytes from a producer outside Bazaar).
    fn event(&self) -> Result<CloudEvent, crate::EnvelopeError> {
        let header = |name: &str| {
            self.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        if header("ce-specversion").is_some() {
            CloudEvent::from_binary(header, &self.payload)
        } else {
            CloudEvent::from_json(&self.payload)
        }
    }
}

pub(crate) enum HeldState {
    /// Handed out at this instant, not settled yet.
    Out(Instant),
    /// Nacked: handed out again at this instant.
    Waiting(Instant),
}

pub(crate) struct Held {
    pub message: Fetched,
    pub attempt: u32,
    /// Which hand-out a settlement refers to: a late ack of an expired one is void.
    pub serial: u64,
    pub state: HeldState,
}

/// The member's state of one partition it owns; `X` is the backend's own part.
pub(crate) struct Part<X> {
    /// Which ownership it belongs to: settlements from an earlier one are void.
    pub epoch: u64,
    pub queue: VecDeque<Fetched>,
    pub held: Option<Held>,
    /// The offset after the last acked message.
    pub acked_to: Option<u64>,
    /// Being handed over: nothing more is handed out.
    pub releasing: bool,
    pub extra: X,
}

impl<X: Default> Part<X> {
    pub fn new(epoch: u64) -> Self {
        Self {
            epoch,
            queue: VecDeque::new(),
            held: None,
            acked_to: None,
            releasing: false,
            extra: X::default(),
        }
    }
}

impl<X> Part<X> {
    /// The last offset buffered, handed out or acked: a fetched message at or
    /// before it is a repeat (a fetch from before a reassignment).
    fn seen(&self) -> Option<u64> {
        self.queue
            .back()
            .map(|f| f.offset)
            .or(self.held.as_ref().map(|h| h.message.offset))
            .or(self.acked_to.and_then(|a| a.checked_sub(1)))
    }

    /// Buffers `message` unless it is a repeat.
    pub fn push(&mut self, message: Fetched) {
        if self.seen().is_none_or(|s| message.offset > s) {
            self.queue.push_back(message);
        }
    }
}

/// A member's partitions.
pub(crate) struct State<X> {
    /// The group gave this member its share (possibly none) at least once.
    pub joined: bool,
    /// Why the member stopped: `next` says it from then on.
    pub failed: Option<String>,
    pub epoch: u64,
    serial: u64,
    pub parts: BTreeMap<u32, Part<X>>,
    /// Round robin among partitions with work.
    turn: u32,
}

impl<X> Default for State<X> {
    fn default() -> Self {
        Self {
            joined: false,
            failed: None,
            epoch: 0,
            serial: 0,
            parts: BTreeMap::new(),
            turn: 0,
        }
    }
}

/// What `next` hands out, taken under the lock.
pub(crate) struct Handout {
    pub partition: u32,
    pub epoch: u64,
    pub serial: u64,
    pub attempt: u32,
    pub message: Fetched,
}

impl<X> State<X> {
    /// The next message to hand out, or the earliest instant one may be ready.
    pub fn take(&mut self, now: Instant, ack_wait: Duration) -> Result<Handout, Option<Instant>> {
        let mut soonest: Option<Instant> = None;
        let order: Vec<u32> = self
            .parts
            .range(self.turn..)
            .chain(self.parts.range(..self.turn))
            .map(|(p, _)| *p)
            .collect();
        for p in order {
            let Some(part) = self.parts.get_mut(&p) else {
                continue;
            };
            if part.releasing {
                continue;
            }
            let attempt = match &part.held {
                Some(held) => {
                    let at = match held.state {
                        HeldState::Out(since) => since + ack_wait,
                        HeldState::Waiting(until) => until,
                    };
                    if at > now {
                        soonest = Some(soonest.map_or(at, |s| s.min(at)));
                        continue;
                    }
                    held.attempt + 1
                }
                None if part.queue.is_empty() => continue,
                None => 1,
            };
            let message = match part.held.take() {
                Some(held) => held.message,
                None => match part.queue.pop_front() {
                    Some(m) => m,
                    None => continue,
                },
            };
            self.serial += 1;
            part.held = Some(Held {
                message: message.clone(),
                attempt,
                serial: self.serial,
                state: HeldState::Out(now),
            });
            self.turn = p.wrapping_add(1);
            return Ok(Handout {
                partition: p,
                epoch: part.epoch,
                serial: self.serial,
                attempt,
                message,
            });
        }
        Err(soonest)
    }

    /// The partition a settlement refers to, if its hand-out is still current.
    pub fn held(&mut self, partition: u32, epoch: u64, serial: u64) -> Option<&mut Part<X>> {
        self.parts
            .get_mut(&partition)
            .filter(|p| p.epoch == epoch && p.held.as_ref().is_some_and(|h| h.serial == serial))
    }

    /// Whether a message of `partition` is out with a handler (not nacked).
    pub fn busy(&self, partition: u32) -> bool {
        self.parts
            .get(&partition)
            .and_then(|part| part.held.as_ref())
            .is_some_and(|h| matches!(h.state, HeldState::Out(_)))
    }
}

/// What a backend's subscription shares with its deliveries' ackers.
pub(crate) trait Member: Send + Sync + 'static {
    type Extra: Send;
    /// Runs `f` under the member's lock.
    fn with_state<R>(&self, f: impl FnOnce(&mut State<Self::Extra>) -> R) -> R;
    /// Woken when a message may be ready.
    fn wake(&self) -> &Notify;
    /// Called after a settlement (a revocation may be waiting for one).
    fn settled(&self) {}
    fn ack_wait(&self) -> Duration;
    fn topic(&self) -> &str;
}

/// The next delivery of `member`'s partitions, waiting for one.
pub(crate) async fn next<M: Member>(member: &Arc<M>) -> Result<Delivery, BusError> {
    loop {
        let taken = member.with_state(|state| match &state.failed {
            Some(why) => Err(BusError::Unavailable(why.clone())),
            None => Ok(state.take(Instant::now(), member.ack_wait())),
        })?;
        match taken {
            Ok(h) => return Ok(delivery(member, h)),
            Err(Some(at)) => {
                let at = tokio::time::Instant::from_std(at);
                let _ = tokio::time::timeout_at(at, member.wake().notified()).await;
            }
            Err(None) => member.wake().notified().await,
        }
    }
}

fn delivery<M: Member>(member: &Arc<M>, h: Handout) -> Delivery {
    let m = h.message;
    Delivery::new(
        Position {
            topic: member.topic().to_owned(),
            key: m.key.clone(),
            partition: h.partition,
            offset: m.offset,
            attempt: h.attempt,
        },
        m.event(),
        m.payload.clone(),
        Box::new(PartitionAcker {
            member: member.clone(),
            partition: h.partition,
            epoch: h.epoch,
            serial: h.serial,
        }),
    )
}

struct PartitionAcker<M> {
    member: Arc<M>,
    partition: u32,
    epoch: u64,
    serial: u64,
}

impl<M: Member> PartitionAcker<M> {
    /// Settles locally (the backend commits acked offsets in the background). A
    /// settlement of a hand-out that expired or moved away is void: the message is
    /// or will be delivered again.
    fn settle(&self, then: impl FnOnce(&mut Part<M::Extra>)) {
        self.member.with_state(|state| {
            if let Some(part) = state.held(self.partition, self.epoch, self.serial) {
                then(part);
            }
        });
        self.member.settled();
        self.member.wake().notify_one();
    }
}

impl<M: Member> Acker for PartitionAcker<M> {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BusError>> {
        self.settle(|part| {
            if let Some(held) = part.held.take() {
                part.acked_to = Some(held.message.offset + 1);
            }
        });
        Box::pin(async { Ok(()) })
    }

    fn nack(self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<(), BusError>> {
        self.settle(|part| {
            if let Some(held) = part.held.as_mut() {
                held.state = HeldState::Waiting(Instant::now() + delay);
            }
        });
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetched(offset: u64) -> Fetched {
        Fetched {
            offset,
            key: "k".into(),
            payload: Bytes::new(),
            headers: Vec::new(),
        }
    }

    fn state_with(parts: &[(u32, &[u64])]) -> State<()> {
        let mut state = State::default();
        for (p, offsets) in parts {
            let mut part = Part::new(0);
            part.queue = offsets.iter().map(|o| fetched(*o)).collect();
            state.parts.insert(*p, part);
        }
        state
    }

    fn ready(state: &mut State<()>, now: Instant, wait: Duration) -> Handout {
        state
            .take(now, wait)
            .ok()
            .unwrap_or_else(|| panic!("a message is ready"))
    }

    #[test]
    fn one_message_per_partition_in_flight_and_partitions_take_turns() {
        let wait = Duration::from_secs(30);
        let now = Instant::now();
        let mut state = state_with(&[(0, &[0, 1]), (1, &[5])]);
        let a = ready(&mut state, now, wait);
        let b = ready(&mut state, now, wait);
        assert_eq!((a.partition, a.message.offset), (0, 0));
        assert_eq!((b.partition, b.message.offset), (1, 5));
        // Partition 0's next waits for its first to be settled.
        assert_eq!(state.take(now, wait).err(), Some(Some(now + wait)));
        let part = state
            .held(0, a.epoch, a.serial)
            .unwrap_or_else(|| panic!("held"));
        part.held = None;
        part.acked_to = Some(1);
        let c = ready(&mut state, now, wait);
        assert_eq!((c.partition, c.message.offset, c.attempt), (0, 1, 1));
    }

    #[test]
    fn an_expired_or_nacked_message_comes_back_first_with_the_next_attempt() {
        let wait = Duration::from_secs(1);
        let now = Instant::now();
        let mut state = state_with(&[(0, &[0, 1])]);
        let first = ready(&mut state, now, wait);
        let again = ready(&mut state, now + wait, wait);
        assert_eq!((again.message.offset, again.attempt), (0, 2));
        // The first hand-out's settlement is void now.
        assert!(state.held(0, first.epoch, first.serial).is_none());
        let part = state
            .held(0, again.epoch, again.serial)
            .unwrap_or_else(|| panic!("held"));
        if let Some(h) = part.held.as_mut() {
            h.state = HeldState::Waiting(now + Duration::from_millis(300));
        }
        assert_eq!(
            state.take(now, wait).err(),
            Some(Some(now + Duration::from_millis(300)))
        );
        let third = ready(&mut state, now + Duration::from_millis(300), wait);
        assert_eq!((third.message.offset, third.attempt), (0, 3));
    }

    #[test]
    fn a_partition_being_handed_over_hands_out_nothing_more() {
        let wait = Duration::from_secs(30);
        let now = Instant::now();
        let mut state = state_with(&[(0, &[0]), (1, &[0])]);
        if let Some(part) = state.parts.get_mut(&0) {
            part.releasing = true;
        }
        let only = ready(&mut state, now, wait);
        assert_eq!(only.partition, 1);
        assert!(state.busy(1) && !state.busy(0));
        assert_eq!(state.take(now, wait).err(), Some(Some(now + wait)));
    }

    #[test]
    fn a_repeat_from_an_earlier_fetch_is_not_buffered_twice() {
        let mut part: Part<()> = Part::new(0);
        part.acked_to = Some(5);
        part.push(fetched(4));
        part.push(fetched(5));
        part.push(fetched(5));
        part.push(fetched(6));
        let offsets: Vec<u64> = part.queue.iter().map(|f| f.offset).collect();
        assert_eq!(offsets, [5, 6]);
    }
}
