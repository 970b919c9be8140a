//! Consumer groups over a topic log. Per partition, one member at a time holds a
//! window of up to [`WINDOW`] consecutive messages (Kafka's partition ownership, at
//! message granularity): it handles them in order, so a key's events stay in order,
//! while other members take other partitions. A window is leased for the member's
//! ack wait, renewed as it fetches and acks; when the lease runs out (the member
//! died) or a message is nacked, the partition goes back to its first unacknowledged
//! message, delivered again with one attempt more; an ack moves the partition past
//! every message acknowledged in order. Positions are written to
//! `groups/<group>.json` (atomically, fsynced) at most every flush interval, so after
//! a crash a group may see again what it acknowledged just before: delivery is at
//! least once, which the inbox makes harmless.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::store::{Record, TopicLog};
use crate::bus::StartFrom;

/// Most messages of one partition out with one member at once.
pub const WINDOW: usize = 64;

#[derive(Debug, Default)]
struct Part {
    /// Everything of this partition before `next` is acknowledged.
    next: u64,
    /// The member holding the window, until when, and its ack wait (each fetch and
    /// each settle renews the lease by that much).
    holder: Option<(String, Instant, Duration)>,
    /// Messages out with the holder, by offset: their token and whether acked.
    window: BTreeMap<u64, (u64, bool)>,
    /// Deliveries so far of messages not yet acknowledged.
    attempts: HashMap<u64, u32>,
    /// After a nack: the partition waits until then.
    not_before: Option<Instant>,
}

impl Part {
    /// Gives the window back: its unacknowledged messages will be delivered again.
    fn release(&mut self) {
        self.window.clear();
        self.holder = None;
    }
}

#[derive(Debug)]
struct Group {
    parts: Vec<Part>,
    dirty: bool,
    /// Where the next fetch starts looking, so partitions take turns.
    turn: usize,
}

#[derive(Serialize, Deserialize)]
struct Saved {
    next: Vec<u64>,
}

/// A delivery handed out under a lease.
#[derive(Debug, Clone)]
pub struct Leased {
    pub record: Record,
    pub attempt: u32,
    pub token: u64,
}

/// Why an ack or nack was not applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettleError {
    #[error("no consumer group `{0}`")]
    UnknownGroup(String),
    #[error("the lease on offset {0} is gone (it expired and the message was delivered again)")]
    LeaseLost(u64),
}

/// Every group of one topic.
pub struct Groups {
    log: Arc<TopicLog>,
    dir: PathBuf,
    groups: Mutex<HashMap<String, Group>>,
    changed: Notify,
    tokens: AtomicU64,
}

impl Groups {
    /// Loads the saved groups of `log` from `dir`.
    pub fn open(log: Arc<TopicLog>, dir: PathBuf) -> io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let mut groups = HashMap::new();
        for entry in std::fs::read_dir(&dir)?.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(group) = name.strip_suffix(".json") else {
                continue;
            };
            let saved: Saved = match serde_json::from_slice(&std::fs::read(entry.path())?) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(group, error = %e, "unreadable group position; the group restarts from the beginning");
                    Saved { next: Vec::new() }
                }
            };
            let mut parts: Vec<Part> = (0..log.partitions).map(|_| Part::default()).collect();
            for (p, next) in parts.iter_mut().zip(saved.next) {
                p.next = next;
            }
            groups.insert(
                group.to_owned(),
                Group {
                    parts,
                    dirty: false,
                    turn: 0,
                },
            );
        }
        Ok(Self {
            log,
            dir,
            groups: Mutex::new(groups),
            changed: Notify::new(),
            tokens: AtomicU64::new(1),
        })
    }

    fn start_offset(&self, start: &StartFrom) -> u64 {
        let (first, next) = self.log.bounds();
        match start {
            StartFrom::Earliest => first,
            StartFrom::Latest => next,
            StartFrom::Offset(o) => *o,
            StartFrom::Time(t) => {
                let ms = i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
                self.log.offset_at_time(ms)
            }
        }
    }

    fn fresh(&self, start: &StartFrom) -> Group {
        let from = self.start_offset(start);
        Group {
            parts: (0..self.log.partitions)
                .map(|_| Part {
                    next: from,
                    ..Part::default()
                })
                .collect(),
            dirty: true,
            turn: 0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Group>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates `group` at `start` unless it exists.
    pub fn ensure(&self, group: &str, start: &StartFrom) {
        let mut groups = self.lock();
        if !groups.contains_key(group) {
            let fresh = self.fresh(start);
            groups.insert(group.to_owned(), fresh);
        }
    }

    /// Moves `group` to `start` (replay), dropping its leases.
    pub fn reset(&self, group: &str, start: &StartFrom) {
        let fresh = self.fresh(start);
        self.lock().insert(group.to_owned(), fresh);
        self.changed.notify_waiters();
    }

    /// Forgets `group`; `false` if there was none.
    pub fn delete(&self, group: &str) -> io::Result<bool> {
        let existed = self.lock().remove(group).is_some();
        match std::fs::remove_file(self.dir.join(format!("{group}.json"))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.changed.notify_waiters();
        Ok(existed)
    }

    /// Group names with how many records each has yet to acknowledge.
    pub fn lag(&self) -> Vec<(String, u64)> {
        let groups = self.lock();
        let mut out: Vec<(String, u64)> = groups
            .iter()
            .map(|(name, g)| {
                let behind = g
                    .parts
                    .iter()
                    .enumerate()
                    .map(|(p, part)| self.log.count_in_partition_from(p as u32, part.next))
                    .sum();
                (name.clone(), behind)
            })
            .collect();
        out.sort();
        out
    }

    /// Leases up to `max` deliveries available now to `member`; also returns when
    /// the next lease or nack delay runs out.
    fn take(
        &self,
        group: &str,
        member: &str,
        max: usize,
        ack_wait: Duration,
    ) -> io::Result<(Vec<Leased>, Option<Instant>)> {
        let now = Instant::now();
        let mut groups = self.lock();
        let Some(g) = groups.get_mut(group) else {
            return Ok((Vec::new(), None));
        };
        let count = g.parts.len();
        let mut out = Vec::new();
        let mut timer: Option<Instant> = None;
        let mut soonest = |t: Instant| timer = Some(timer.map_or(t, |x| x.min(t)));
        for i in 0..count {
            if out.len() >= max {
                break;
            }
            let p = (g.turn + i) % count;
            let part = &mut g.parts[p];
            if let Some((_, until, _)) = &part.holder
                && *until <= now
            {
                part.release(); // the holder is gone
            }
            if let Some(at) = part.not_before {
                if at > now {
                    soonest(at);
                    continue;
                }
                part.not_before = None;
            }
            match &mut part.holder {
                Some((holder, until, _)) if holder != member => {
                    soonest(*until);
                    continue;
                }
                // The holder is fetching: it is alive.
                Some((_, until, _)) => *until = now + ack_wait,
                None => {}
            }
            let mut from = part
                .window
                .keys()
                .next_back()
                .map_or(part.next, |last| last + 1);
            let mut leased = 0;
            while part.window.len() < WINDOW && out.len() < max {
                let Some(offset) = self.log.next_in_partition(p as u32, from) else {
                    break;
                };
                if part.window.is_empty() && offset != part.next {
                    // Skip offsets of other partitions (and retention-removed ones).
                    part.next = offset;
                }
                let Some(record) = self.log.read(offset)? else {
                    break;
                };
                let attempt = part.attempts.entry(offset).or_insert(0);
                *attempt += 1;
                let token = self.tokens.fetch_add(1, Ordering::Relaxed);
                part.window.insert(offset, (token, false));
                out.push(Leased {
                    record,
                    attempt: *attempt,
                    token,
                });
                from = offset + 1;
                leased += 1;
            }
            if leased > 0 {
                part.holder = Some((member.to_owned(), now + ack_wait, ack_wait));
            }
            if let Some((_, until, _)) = &part.holder {
                soonest(*until);
            }
        }
        g.turn = (g.turn + 1) % count.max(1);
        Ok((out, timer))
    }

    /// Waits up to `wait` for deliveries for `group` (created at `start` if new).
    pub async fn fetch(
        &self,
        group: &str,
        member: &str,
        start: &StartFrom,
        max: usize,
        ack_wait: Duration,
        wait: Duration,
    ) -> io::Result<Vec<Leased>> {
        self.ensure(group, start);
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + wait;
        let mut appended = self.log.appended();
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            appended.borrow_and_update();
            let (got, timer) = self.take(group, member, max, ack_wait)?;
            if !got.is_empty() {
                return Ok(got);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let until = timer.map_or(deadline, |t| t.min(deadline));
            tokio::select! {
                () = &mut notified => {}
                _ = appended.changed() => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// Applies `apply` to the partition whose window holds `offset` under `token`.
    fn settle(
        &self,
        group: &str,
        offset: u64,
        token: u64,
        apply: impl FnOnce(&mut Part),
    ) -> Result<(), SettleError> {
        let mut groups = self.lock();
        let g = groups
            .get_mut(group)
            .ok_or_else(|| SettleError::UnknownGroup(group.to_owned()))?;
        let part = g
            .parts
            .iter_mut()
            .find(|p| p.window.get(&offset).is_some_and(|(t, _)| *t == token))
            .ok_or(SettleError::LeaseLost(offset))?;
        apply(part);
        g.dirty = true;
        drop(groups);
        self.changed.notify_waiters();
        Ok(())
    }

    /// The delivery is handled: once everything before it is too, its partition
    /// moves past it.
    pub fn ack(&self, group: &str, offset: u64, token: u64) -> Result<(), SettleError> {
        self.settle(group, offset, token, |part| {
            if let Some(slot) = part.window.get_mut(&offset) {
                slot.1 = true;
            }
            while let Some((&first, &(_, acked))) = part.window.iter().next() {
                if !acked {
                    break;
                }
                part.window.remove(&first);
                part.attempts.remove(&first);
                part.next = first + 1;
            }
            if part.window.is_empty() {
                // Nothing out: any member may take the partition next.
                part.holder = None;
            } else if let Some((_, until, ack_wait)) = &mut part.holder {
                // Each settled message shows the holder alive.
                *until = Instant::now() + *ack_wait;
            }
        })
    }

    /// Deliver it again after `delay`, and everything after it in its partition.
    pub fn nack(
        &self,
        group: &str,
        offset: u64,
        token: u64,
        delay: Duration,
    ) -> Result<(), SettleError> {
        self.settle(group, offset, token, |part| {
            // Later messages of the window were sent but not handled: they come
            // back without counting an attempt.
            let later: Vec<u64> = part.window.range(offset + 1..).map(|(o, _)| *o).collect();
            for o in later {
                if let Some(a) = part.attempts.get_mut(&o) {
                    *a = a.saturating_sub(1);
                }
            }
            part.release();
            part.not_before = Some(Instant::now() + delay);
        })
    }

    /// Writes the positions of groups that moved (write, fsync, rename): takes them,
    /// runs `before` (the log's sync: the records those positions cover must be on
    /// disk before the positions are), then writes them. If `before` fails, they stay
    /// to be written next time.
    pub fn flush_after(&self, before: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let dirty: Vec<(String, Saved)> = {
            let mut groups = self.lock();
            groups
                .iter_mut()
                .filter(|(_, g)| g.dirty)
                .map(|(name, g)| {
                    g.dirty = false;
                    (
                        name.clone(),
                        Saved {
                            next: g.parts.iter().map(|p| p.next).collect(),
                        },
                    )
                })
                .collect()
        };
        if let Err(e) = before() {
            let mut groups = self.lock();
            for (name, _) in &dirty {
                if let Some(g) = groups.get_mut(name) {
                    g.dirty = true;
                }
            }
            return Err(e);
        }
        for (name, saved) in dirty {
            let path = self.dir.join(format!("{name}.json"));
            let tmp = self.dir.join(format!(".{name}.json.tmp"));
            let bytes = serde_json::to_vec(&saved).map_err(io::Error::other)?;
            {
                use std::io::Write;
                let mut file = std::fs::File::create(&tmp)?;
                file.write_all(&bytes)?;
                file.sync_data()?;
            }
            std::fs::rename(&tmp, &path)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedded::store::LogConfig;
    use bytes::Bytes;

    /// A fresh directory, and a one-partition log's settings in it.
    fn one_partition() -> (std::path::PathBuf, LogConfig) {
        let dir =
            std::env::temp_dir().join(format!("bazaar-groups-{}", uuid::Uuid::new_v4().simple()));
        let mut config = LogConfig::new(&dir);
        config.partitions = 1;
        (dir, config)
    }

    #[tokio::test]
    async fn windows_leases_and_positions_survive_a_reopen() {
        let (dir, config) = one_partition();
        let open = || {
            let log = TopicLog::open("t", dir.join("log"), &config).unwrap();
            Groups::open(log.clone(), dir.join("groups"))
                .map(|g| (log, g))
                .unwrap()
        };
        let (log, groups) = open();
        for n in 0..5u8 {
            log.append("k", Bytes::from(vec![n])).await.unwrap();
        }
        let (long, short) = (Duration::from_secs(30), Duration::from_millis(20));
        let wait = Duration::from_millis(10);
        let fetch = |member: &'static str, ack_wait| {
            let groups = &groups;
            async move {
                groups
                    .fetch("g", member, &StartFrom::Earliest, 8, ack_wait, wait)
                    .await
                    .unwrap()
            }
        };
        // One member holds the partition's window, in order; another gets nothing.
        let window = fetch("a", long).await;
        let offsets: Vec<u64> = window.iter().map(|l| l.record.offset).collect();
        assert_eq!(offsets, [0, 1, 2, 3, 4]);
        assert!(fetch("b", long).await.is_empty());
        // Acks out of order move the partition only past what is acked in order.
        groups.ack("g", 1, window[1].token).unwrap();
        assert_eq!(groups.lag(), [("g".to_owned(), 5)]);
        groups.ack("g", 0, window[0].token).unwrap();
        groups.ack("g", 2, window[2].token).unwrap();
        assert_eq!(groups.lag(), [("g".to_owned(), 2)]);
        // A nack sends 3 and 4 back; 4 comes back without counting an attempt.
        groups
            .nack("g", 3, window[3].token, Duration::ZERO)
            .unwrap();
        assert_eq!(
            groups.ack("g", 4, window[4].token),
            Err(SettleError::LeaseLost(4))
        );
        let again = fetch("b", short).await;
        let seen: Vec<(u64, u32)> = again.iter().map(|l| (l.record.offset, l.attempt)).collect();
        assert_eq!(seen, [(3, 2), (4, 1)]);
        // b dies holding them: after its lease, a gets them, one attempt more.
        tokio::time::sleep(Duration::from_millis(40)).await;
        let taken = fetch("a", long).await;
        let seen: Vec<(u64, u32)> = taken.iter().map(|l| (l.record.offset, l.attempt)).collect();
        assert_eq!(seen, [(3, 3), (4, 2)]);
        assert_eq!(
            groups.ack("g", 3, again[0].token),
            Err(SettleError::LeaseLost(3))
        );
        groups.ack("g", 3, taken[0].token).unwrap();
        groups.flush_after(|| Ok(())).unwrap();
        drop((log, groups));

        let (_log, groups) = open();
        let got = groups
            .fetch("g", "c", &StartFrom::Latest, 8, long, wait)
            .await
            .unwrap();
        assert_eq!(
            got[0].record.offset, 4,
            "resumes after the last ack, not at `start`"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Positions are saved only once what runs before them (the log's sync) has
    /// succeeded; after a failure they are saved on the next flush.
    #[tokio::test]
    async fn positions_wait_for_the_log_sync_before_them() {
        let (dir, config) = one_partition();
        let log = TopicLog::open("t", dir.join("log"), &config).unwrap();
        let groups = Groups::open(log.clone(), dir.join("groups")).unwrap();
        log.append("k", Bytes::from_static(b"x")).await.unwrap();
        let wait = Duration::from_millis(10);
        let got = groups
            .fetch(
                "g",
                "a",
                &StartFrom::Earliest,
                8,
                Duration::from_secs(30),
                wait,
            )
            .await
            .unwrap();
        groups.ack("g", 0, got[0].token).unwrap();
        let saved = dir.join("groups").join("g.json");
        let failed = groups.flush_after(|| Err(io::Error::other("disk gone")));
        assert!(failed.is_err());
        assert!(!saved.exists(), "no position before the log is synced");
        let mut synced = false;
        groups
            .flush_after(|| {
                synced = true;
                Ok(())
            })
            .unwrap();
        assert!(synced && saved.exists(), "saved on the next flush");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
