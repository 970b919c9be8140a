//! The embedded service registry: instances, their health checks, and a change index
//! that blocking queries wait on. [`api::router`] serves it with a Consul-compatible
//! HTTP API subset; [`checks`] runs the HTTP, TCP and TTL checks.

pub mod api;
pub mod checks;
pub mod eureka;
pub mod model;

use std::collections::BTreeMap;
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

#[derive(Debug, Default)]
struct State {
    index: u64,
    entries: BTreeMap<String, Entry>,
}

/// The registry. Share it in an `Arc`.
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
                entries: BTreeMap::new(),
            }),
            changed: watch::channel(1).0,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bumps the index and wakes blocking queries.
    fn bump(&self, state: &mut State) -> u64 {
        state.index += 1;
        let index = state.index;
        self.changed.send_replace(index);
        index
    }

    /// The current change index (`X-Consul-Index`).
    pub fn index(&self) -> u64 {
        self.state().index
    }

    /// Registers an instance; an existing ID is replaced.
    pub fn register(&self, registration: Registration) {
        let now = Instant::now();
        let mut state = self.state();
        let create_index = state.entries.get(&registration.id).map(|e| e.create_index);
        let index = self.bump(&mut state);
        let checks = registration
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
            })
            .collect();
        tracing::info!(id = %registration.id, name = %registration.name, "registered");
        state.entries.insert(
            registration.id.clone(),
            Entry {
                registration,
                checks,
                create_index: create_index.unwrap_or(index),
                modify_index: index,
            },
        );
    }

    /// Removes an instance; false if there was none with that ID.
    pub fn deregister(&self, id: &str) -> bool {
        let mut state = self.state();
        let removed = state.entries.remove(id).is_some();
        if removed {
            self.bump(&mut state);
            tracing::info!(id, "deregistered");
        }
        removed
    }

    /// Sets a TTL check's health (`/v1/agent/check/pass|warn|fail`), renewing its TTL.
    pub fn update_ttl(&self, check_id: &str, health: Health, note: &str) -> bool {
        let now = Instant::now();
        let mut state = self.state();
        let mut found = false;
        let mut changed = false;
        for entry in state.entries.values_mut() {
            for check in entry.checks.iter_mut().filter(|c| c.spec.id == check_id) {
                let CheckKind::Ttl { ttl } = check.spec.kind else {
                    continue;
                };
                found = true;
                check.due = now + ttl;
                changed |= apply(check, health, note.to_owned(), now);
            }
        }
        if changed {
            self.bump(&mut state);
        }
        found
    }

    /// Records a probe's result; returns whether anything visible changed.
    pub(crate) fn record(&self, id: &str, check_id: &str, health: Health, output: String) {
        let now = Instant::now();
        let mut state = self.state();
        let changed = state
            .entries
            .get_mut(id)
            .and_then(|e| e.checks.iter_mut().find(|c| c.spec.id == check_id))
            .is_some_and(|check| apply(check, health, output, now));
        if changed {
            let next = state.index + 1;
            if let Some(e) = state.entries.get_mut(id) {
                e.modify_index = next;
            }
            self.bump(&mut state);
        }
    }

    /// Expires TTLs and removes instances critical for longer than allowed.
    pub(crate) fn sweep(&self, now: Instant) {
        let mut state = self.state();
        let mut changed = false;
        for entry in state.entries.values_mut() {
            for check in &mut entry.checks {
                if matches!(check.spec.kind, CheckKind::Ttl { .. })
                    && now >= check.due
                    && check.health != Health::Critical
                {
                    changed |= apply(check, Health::Critical, "TTL expired".into(), now);
                }
            }
        }
        let expired: Vec<String> = state
            .entries
            .iter()
            .filter(|(_, e)| {
                e.checks
                    .iter()
                    .any(|c| match (c.critical_since, c.spec.deregister_after) {
                        (Some(since), Some(after)) => now.saturating_duration_since(since) >= after,
                        _ => false,
                    })
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            state.entries.remove(&id);
            tracing::warn!(id, "deregistered after being critical too long");
            changed = true;
        }
        if changed {
            self.bump(&mut state);
        }
    }

    /// Probes due at `now`: (instance id, check id, kind).
    pub(crate) fn due_probes(&self, now: Instant) -> Vec<(String, String, CheckKind)> {
        let mut state = self.state();
        let mut due = Vec::new();
        for (id, entry) in state.entries.iter_mut() {
            for check in &mut entry.checks {
                let interval = match &check.spec.kind {
                    CheckKind::Http { interval, .. } | CheckKind::Tcp { interval, .. } => *interval,
                    CheckKind::Ttl { .. } => continue,
                };
                if now >= check.due {
                    check.due = now + interval;
                    due.push((id.clone(), check.spec.id.clone(), check.spec.kind.clone()));
                }
            }
        }
        due
    }

    /// Instances of `name` (optionally only passing, optionally with `tag`).
    pub fn instances(
        &self,
        name: &str,
        passing_only: bool,
        tag: Option<&str>,
    ) -> (u64, Vec<Entry>) {
        let state = self.state();
        let found = state
            .entries
            .values()
            .filter(|e| e.registration.name == name)
            .filter(|e| !passing_only || e.health() == Health::Passing)
            .filter(|e| tag.is_none_or(|t| e.registration.tags.iter().any(|x| x == t)))
            .cloned()
            .collect();
        (state.index, found)
    }

    /// Every service name with the union of its instances' tags.
    pub fn services(&self) -> (u64, BTreeMap<String, Vec<String>>) {
        let state = self.state();
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for e in state.entries.values() {
            let tags = out.entry(e.registration.name.clone()).or_default();
            for t in &e.registration.tags {
                if !tags.contains(t) {
                    tags.push(t.clone());
                }
            }
        }
        (state.index, out)
    }

    /// Waits until the index passes `after` or `wait` elapses (blocking queries).
    pub async fn wait_past(&self, after: u64, wait: Duration) {
        let mut rx = self.changed.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|i| *i > after)).await;
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
