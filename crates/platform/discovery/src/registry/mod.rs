//! The embedded service registry: instances, their health checks, and a change index
//! that blocking queries wait on. [`api::router`] serves it with a Consul-compatible
//! HTTP API subset; [`checks`] runs the HTTP, TCP and TTL checks.

pub mod api;
pub mod checks;
pub mod eureka;
pub mod model;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

pub use model::{CheckKind, CheckSpec, FieldProblem, Health, Registration, parse_registration};

/// Both APIs over one registry: Consul's and Eureka's clients see the same instances.
pub fn router(registry: std::sync::Arc<Registry>) -> axum::Router {
    api::router(registry.clone()).merge(eureka::router(registry))
}

/// One check's live state.
#[derive(Clone, Debug)]
pub struct CheckState {
    pub spec: CheckSpec,
    pub health: Health,
    pub output: String,
    /// When the check last turned critical (for deregistration).
    pub critical_since: Option<Instant>,
    /// When the next probe is due (HTTP, TCP) or the TTL expires.
    pub due: Instant,
    /// The pending timer of the `due` chain, if any: at most one per check, however
    /// often a TTL is renewed.
    armed: Option<Instant>,
}

/// A registered instance.
#[derive(Clone, Debug)]
pub struct Entry {
    pub registration: Registration,
    pub checks: Vec<CheckState>,
    pub create_index: u64,
    pub modify_index: u64,
}

impl Entry {
    /// An instance is as healthy as its worst check.
    pub fn health(&self) -> Health {
        let mut worst = Health::Passing;
        for c in &self.checks {
            match c.health {
                Health::Critical => return Health::Critical,
                Health::Warning => worst = Health::Warning,
                Health::Passing => {}
            }
        }
        worst
    }
}

/// A moment a check needs attention. Timers are never cancelled: one that finds
/// nothing to do (the check was renewed, recovered, replaced or removed) is dropped
/// when it fires.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    at: Instant,
    kind: TimerKind,
    entry: String,
    check: String,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Clone, Copy)]
enum TimerKind {
    /// A probe due, or a TTL running out.
    Due,
    /// A critical check's `DeregisterCriticalServiceAfter` running out.
    Deregister,
}

#[derive(Debug, Default)]
struct State {
    index: u64,
    entries: HashMap<String, Entry>,
    /// Service name -> instance ids, both sorted: queries touch one service only.
    by_service: BTreeMap<String, BTreeSet<String>>,
    /// Last index at which each service changed (kept after its last instance goes,
    /// so a watcher of an emptied service still sees the change).
    service_index: HashMap<String, u64>,
    /// Service name -> the union of its instances' tags (the catalog's answer).
    tags: HashMap<String, Vec<String>>,
    /// Check id -> instance id (check ids are unique, as in Consul).
    check_owner: HashMap<String, String>,
    timers: BinaryHeap<Reverse<Timer>>,
}

impl State {
    fn schedule(&mut self, at: Instant, kind: TimerKind, entry: &str, check: &str) {
        self.timers.push(Reverse(Timer {
            at,
            kind,
            entry: entry.to_owned(),
            check: check.to_owned(),
        }));
    }

    /// Makes sure the `due` chain of a check has a timer at or before its due time.
    fn arm(&mut self, entry: &str, check_index: usize) {
        let Some(check) = self
            .entries
            .get_mut(entry)
            .and_then(|e| e.checks.get_mut(check_index))
        else {
            return;
        };
        if check.armed.is_some_and(|at| at <= check.due) {
            return;
        }
        check.armed = Some(check.due);
        let (due, id) = (check.due, check.spec.id.clone());
        self.schedule(due, TimerKind::Due, entry, &id);
    }

    fn retag(&mut self, name: &str) {
        let mut tags: Vec<String> = Vec::new();
        for e in self
            .by_service
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|id| self.entries.get(id))
        {
            for t in &e.registration.tags {
                if !tags.contains(t) {
                    tags.push(t.clone());
                }
            }
        }
        if self.by_service.contains_key(name) {
            self.tags.insert(name.to_owned(), tags);
        } else {
            self.tags.remove(name);
        }
    }

    fn remove(&mut self, id: &str) -> Option<Entry> {
        let entry = self.entries.remove(id)?;
        let name = &entry.registration.name;
        if let Some(ids) = self.by_service.get_mut(name) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_service.remove(name);
            }
        }
        for check in &entry.checks {
            if self
                .check_owner
                .get(&check.spec.id)
                .is_some_and(|o| o == id)
            {
                self.check_owner.remove(&check.spec.id);
            }
        }
        self.retag(&entry.registration.name);
        Some(entry)
    }
}

/// The registry. Shared behind an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct Registry {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State {
                index: 1,
                ..State::default()
            }),
            changed: watch::channel(1).0,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Advances the index for a change to `services` and wakes blocking queries.
    fn bump(&self, state: &mut State, services: &[&str]) -> u64 {
        state.index += 1;
        let index = state.index;
        for name in services {
            state.service_index.insert((*name).to_owned(), index);
        }
        self.changed.send_replace(index);
        index
    }

    /// The current change index.
    pub fn index(&self) -> u64 {
        self.state().index
    }

    /// The index of the last change to `service` (1 if it never existed).
    pub fn service_index(&self, service: &str) -> u64 {
        self.state()
            .service_index
            .get(service)
            .copied()
            .unwrap_or(1)
    }

    /// Adds or replaces (same ID) an instance; its checks start in their initial state.
    pub fn register(&self, registration: Registration) {
        let now = Instant::now();
        let mut state = self.state();
        let previous = state.remove(&registration.id);
        let index = state.index + 1;
        let checks: Vec<CheckState> = registration
            .checks
            .iter()
            .map(|spec| CheckState {
                spec: spec.clone(),
                health: spec.initial,
                output: String::new(),
                critical_since: (spec.initial == Health::Critical).then_some(now),
                due: match spec.kind {
                    CheckKind::Ttl { ttl } => now + ttl,
                    _ => now,
                },
                armed: None,
            })
            .collect();
        let id = registration.id.clone();
        for check in &checks {
            state.check_owner.insert(check.spec.id.clone(), id.clone());
            if let (Some(since), Some(after)) = (check.critical_since, check.spec.deregister_after)
            {
                state.schedule(since + after, TimerKind::Deregister, &id, &check.spec.id);
            }
        }
        let check_count = checks.len();
        tracing::info!(id = %id, name = %registration.name, "registered");
        let name = registration.name.clone();
        state
            .by_service
            .entry(name.clone())
            .or_default()
            .insert(id.clone());
        state.entries.insert(
            id.clone(),
            Entry {
                registration,
                checks,
                create_index: previous.as_ref().map_or(index, |e| e.create_index),
                modify_index: index,
            },
        );
        for i in 0..check_count {
            state.arm(&id, i);
        }
        state.retag(&name);
        let old_name = previous.map(|e| e.registration.name);
        match old_name.as_deref() {
            Some(old) if old != name => self.bump(&mut state, &[&name, old]),
            _ => self.bump(&mut state, &[&name]),
        };
    }

    /// Removes an instance; `false` if it was not registered.
    pub fn deregister(&self, id: &str) -> bool {
        let mut state = self.state();
        match state.remove(id) {
            Some(entry) => {
                self.bump(&mut state, &[&entry.registration.name]);
                tracing::info!(id, "deregistered");
                true
            }
            None => false,
        }
    }

    /// Sets a TTL check's state and restarts its TTL; `false` if no TTL check has
    /// that ID.
    pub fn update_ttl(&self, check_id: &str, health: Health, note: &str) -> bool {
        let now = Instant::now();
        let mut guard = self.state();
        let state = &mut *guard;
        let Some(owner) = state.check_owner.get(check_id).cloned() else {
            return false;
        };
        let Some(entry) = state.entries.get_mut(&owner) else {
            return false;
        };
        let Some(position) = entry.checks.iter().position(|c| c.spec.id == check_id) else {
            return false;
        };
        let check = &mut entry.checks[position];
        let CheckKind::Ttl { ttl } = check.spec.kind else {
            return false;
        };
        check.due = now + ttl;
        let was_critical = check.critical_since.is_some();
        let changed = apply(check, health, note.to_owned(), now);
        let deregister_at = match (check.critical_since, check.spec.deregister_after) {
            (Some(since), Some(after)) if !was_critical => Some(since + after),
            _ => None,
        };
        let name = entry.registration.name.clone();
        if changed {
            entry.modify_index = state.index + 1;
            self.bump(state, &[&name]);
        }
        state.arm(&owner, position);
        if let Some(at) = deregister_at {
            state.schedule(at, TimerKind::Deregister, &owner, check_id);
        }
        true
    }

    /// Records a probe's result (HTTP, TCP).
    pub(crate) fn record(&self, id: &str, check_id: &str, health: Health, output: String) {
        let now = Instant::now();
        let mut guard = self.state();
        let state = &mut *guard;
        let next = state.index + 1;
        let Some(entry) = state.entries.get_mut(id) else {
            return;
        };
        let Some(check) = entry.checks.iter_mut().find(|c| c.spec.id == check_id) else {
            return;
        };
        let was_critical = check.critical_since.is_some();
        if !apply(check, health, output, now) {
            return;
        }
        let deregister_at = match (check.critical_since, check.spec.deregister_after) {
            (Some(since), Some(after)) if !was_critical => Some(since + after),
            _ => None,
        };
        entry.modify_index = next;
        let name = entry.registration.name.clone();
        self.bump(state, &[&name]);
        if let Some(at) = deregister_at {
            state.schedule(at, TimerKind::Deregister, id, check_id);
        }
    }

    /// Handles every timer due by `now`: expires TTLs, removes instances critical
    /// past their `DeregisterCriticalServiceAfter`, and returns the probes to run
    /// (each rescheduled one interval later). Costs what is due, not what is
    /// registered.
    pub(crate) fn tick(&self, now: Instant) -> Vec<(String, String, CheckKind)> {
        let mut guard = self.state();
        let state = &mut *guard;
        let mut probes = Vec::new();
        let mut changed: Vec<String> = Vec::new();
        while state.timers.peek().is_some_and(|t| t.0.at <= now) {
            let Some(Reverse(timer)) = state.timers.pop() else {
                break;
            };
            let Some(entry) = state.entries.get_mut(&timer.entry) else {
                continue;
            };
            let Some(position) = entry.checks.iter().position(|c| c.spec.id == timer.check) else {
                continue;
            };
            let check = &mut entry.checks[position];
            match timer.kind {
                TimerKind::Deregister => {
                    if let (Some(since), Some(after)) =
                        (check.critical_since, check.spec.deregister_after)
                        && now.saturating_duration_since(since) >= after
                    {
                        let name = entry.registration.name.clone();
                        state.remove(&timer.entry);
                        tracing::warn!(id = %timer.entry, "deregistered after being critical too long");
                        changed.push(name);
                    }
                }
                TimerKind::Due => {
                    if check.armed != Some(timer.at) {
                        continue; // superseded by an earlier arming
                    }
                    check.armed = None;
                    if now >= check.due {
                        match &check.spec.kind {
                            CheckKind::Http { interval, .. } | CheckKind::Tcp { interval, .. } => {
                                check.due = now + *interval;
                                probes.push((
                                    timer.entry.clone(),
                                    timer.check.clone(),
                                    check.spec.kind.clone(),
                                ));
                            }
                            CheckKind::Ttl { .. } => {
                                if check.health != Health::Critical {
                                    apply(check, Health::Critical, "TTL expired".into(), now);
                                    if let Some(after) = check.spec.deregister_after {
                                        state.schedule(
                                            now + after,
                                            TimerKind::Deregister,
                                            &timer.entry,
                                            &timer.check,
                                        );
                                    }
                                    if let Some(entry) = state.entries.get_mut(&timer.entry) {
                                        entry.modify_index = state.index + 1;
                                        changed.push(entry.registration.name.clone());
                                    }
                                }
                                // An expired TTL waits for its next renewal.
                                continue;
                            }
                        }
                    }
                    // A probe rescheduled, or a TTL renewed since this timer was set.
                    state.arm(&timer.entry, position);
                }
            }
        }
        if !changed.is_empty() {
            let names: Vec<&str> = changed.iter().map(String::as_str).collect();
            self.bump(state, &names);
        }
        probes
    }

    /// Instances of `name` (optionally only passing, optionally with `tag`), with
    /// the service's index.
    pub fn instances(
        &self,
        name: &str,
        passing_only: bool,
        tag: Option<&str>,
    ) -> (u64, Vec<Entry>) {
        let state = self.state();
        let index = state.service_index.get(name).copied().unwrap_or(1);
        let found = state
            .by_service
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|id| state.entries.get(id))
            .filter(|e| !passing_only || e.health() == Health::Passing)
            .filter(|e| tag.is_none_or(|t| e.registration.tags.iter().any(|x| x == t)))
            .cloned()
            .collect();
        (index, found)
    }

    /// Runs `f` over the instances of `name` (filtered like [`instances`](Self::instances))
    /// under the registry's lock, without copying them: for rendering answers.
    pub fn with_instances<R>(
        &self,
        name: &str,
        passing_only: bool,
        tag: Option<&str>,
        f: impl FnOnce(u64, &[&Entry]) -> R,
    ) -> R {
        let state = self.state();
        let index = state.service_index.get(name).copied().unwrap_or(1);
        let found: Vec<&Entry> = state
            .by_service
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|id| state.entries.get(id))
            .filter(|e| !passing_only || e.health() == Health::Passing)
            .filter(|e| tag.is_none_or(|t| e.registration.tags.iter().any(|x| x == t)))
            .collect();
        f(index, &found)
    }

    /// Every service name with the union of its instances' tags.
    pub fn services(&self) -> (u64, BTreeMap<String, Vec<String>>) {
        let state = self.state();
        let out = state
            .by_service
            .keys()
            .map(|name| {
                (
                    name.clone(),
                    state.tags.get(name).cloned().unwrap_or_default(),
                )
            })
            .collect();
        (state.index, out)
    }

    /// Waits until the index (of `service`, or of the whole registry) passes
    /// `after`, or `wait` elapses (blocking queries).
    pub async fn wait_past(&self, after: u64, wait: Duration, service: Option<&str>) {
        let mut rx = self.changed.subscribe();
        let current = || match service {
            Some(name) => self.service_index(name),
            None => self.index(),
        };
        let _ = tokio::time::timeout(wait, async {
            // Subscribed before the check: a change in between still wakes us.
            while current() <= after {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
    }
}

/// Applies a probe result; returns whether health or output changed.
fn apply(check: &mut CheckState, health: Health, output: String, now: Instant) -> bool {
    let changed = check.health != health || check.output != output;
    if health == Health::Critical {
        check.critical_since.get_or_insert(now);
    } else {
        check.critical_since = None;
    }
    check.health = health;
    check.output = output;
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ttl_instance(id: &str, name: &str, ttl: u64, deregister_after: u64) -> Registration {
        Registration {
            id: id.into(),
            name: name.into(),
            address: "127.0.0.1".into(),
            port: 1,
            tags: vec![],
            meta: BTreeMap::new(),
            checks: vec![CheckSpec {
                id: format!("{id}-ttl"),
                name: "ttl".into(),
                kind: CheckKind::Ttl {
                    ttl: Duration::from_secs(ttl),
                },
                initial: Health::Passing,
                deregister_after: Some(Duration::from_secs(deregister_after)),
            }],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_keep_one_timer_then_expiry_and_deregistration_follow() {
        let r = Registry::new();
        r.register(ttl_instance("a", "svc", 10, 5));
        r.register(ttl_instance("b", "other", 10, 5));
        for _ in 0..1000 {
            assert!(r.update_ttl("a-ttl", Health::Passing, ""));
        }
        assert!(r.state().timers.len() <= 2, "{}", r.state().timers.len());
        let svc_index = r.service_index("svc");

        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(r.tick(Instant::now()).is_empty());
        let (index, entries) = r.instances("svc", false, None);
        assert_eq!(entries[0].health(), Health::Critical);
        assert!(index > svc_index, "the expiry is a change of svc");
        assert!(r.instances("svc", true, None).1.is_empty());

        tokio::time::advance(Duration::from_secs(5)).await;
        r.tick(Instant::now());
        assert!(r.instances("svc", false, None).1.is_empty());
        assert!(r.state().timers.is_empty());
        // The emptied service keeps its index, so its watchers see the removal.
        assert!(r.service_index("svc") > index);
    }

    #[tokio::test]
    async fn a_watcher_of_one_service_sleeps_through_changes_to_others() {
        let r = std::sync::Arc::new(Registry::new());
        r.register(ttl_instance("a", "svc", 60, 60));
        let index = r.service_index("svc");
        let watcher = {
            let r = r.clone();
            tokio::spawn(async move {
                r.wait_past(index, Duration::from_secs(5), Some("svc"))
                    .await;
                r.service_index("svc")
            })
        };
        for i in 0..20 {
            r.register(ttl_instance(&format!("o{i}"), "other", 60, 60));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!watcher.is_finished());
        r.deregister("a");
        let seen = tokio::time::timeout(Duration::from_secs(1), watcher)
            .await
            .unwrap()
            .unwrap();
        assert!(seen > index);
    }
}
