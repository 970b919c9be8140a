//! The part every watching backend shares: a local snapshot per service name,
//! filled by a background task per name (started on the first `resolve`), served
//! synchronously, and kept, marked stale, while the backend is unreachable.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{BoxFuture, Instance, ResolveError, Resolver, StaticResolver};

/// A backend that can follow one service name.
pub trait Source: Send + Sync + 'static {
    /// Follows `service` until the task is dropped: every answer goes to
    /// [`Sink::update`], every failure to reach the backend to [`Sink::failed`].
    fn follow(self: Arc<Self>, service: String, sink: Sink) -> BoxFuture<'static, ()>;
}

#[derive(Debug)]
struct Known {
    instances: Arc<[Instance]>,
    stale: bool,
}

type Snapshot = Arc<RwLock<HashMap<String, Known>>>;

/// Where a [`Source`] reports what it sees for one service.
#[derive(Clone)]
pub struct Sink {
    service: String,
    known: Snapshot,
    generation: Arc<watch::Sender<u64>>,
}

impl Sink {
    /// The current instances of the service (possibly none).
    pub fn update(&self, mut instances: Vec<Instance>) {
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        let previous = known.insert(
            self.service.clone(),
            Known {
                instances: Arc::from(instances),
                stale: false,
            },
        );
        drop(known);
        if previous.is_some_and(|p| p.stale) {
            tracing::info!(upstream = %self.service, "discovery reachable again; instances are current");
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// The backend could not be reached: keep the last known set, marked stale.
    pub fn failed(&self, error: &dyn Display) {
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = known.get_mut(&self.service) {
            if !entry.stale {
                tracing::warn!(upstream = %self.service, error = %error, "discovery unreachable; serving the last known instances");
            }
            entry.stale = true;
        } else {
            tracing::warn!(upstream = %self.service, error = %error, "discovery unreachable; no instances known yet");
        }
        drop(known);
        self.generation.send_modify(|g| *g += 1);
    }
}

/// A [`Resolver`] over any [`Source`]: names the source does not know (yet) are
/// answered from a static fallback map.
pub struct WatchingResolver<S> {
    source: Arc<S>,
    fallback: StaticResolver,
    known: Snapshot,
    tasks: Mutex<HashMap<String, JoinHandle<()>>>,
    generation: Arc<watch::Sender<u64>>,
}

impl<S: Source> WatchingResolver<S> {
    pub fn new(source: S, fallback: StaticResolver) -> Self {
        Self {
            source: Arc::new(source),
            fallback,
            known: Arc::default(),
            tasks: Mutex::default(),
            generation: Arc::new(watch::channel(0).0),
        }
    }

    /// Starts following `service` if nothing follows it yet (needs a Tokio runtime;
    /// without one the fallback keeps answering).
    pub fn follow(&self, service: &str) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        if tasks.contains_key(service) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let sink = Sink {
            service: service.to_owned(),
            known: self.known.clone(),
            generation: self.generation.clone(),
        };
        let task = runtime.spawn(self.source.clone().follow(service.to_owned(), sink));
        tasks.insert(service.to_owned(), task);
    }

    /// Ticks on every answer or failure of any followed service (tests, benchmarks
    /// and status pages wait on it instead of polling).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Follows `service` and waits until the source has answered for it once.
    pub async fn ready(&self, service: &str, within: Duration) -> Result<(), ResolveError> {
        self.follow(service);
        let mut changes = self.changes();
        let answered = || {
            self.known
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(service)
        };
        let wait = async {
            while !answered() {
                if changes.changed().await.is_err() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(within, wait).await;
        if answered() {
            Ok(())
        } else {
            Err(ResolveError::Unknown(service.to_owned()))
        }
    }

    pub fn source(&self) -> &S {
        &self.source
    }
}

impl<S> Drop for WatchingResolver<S> {
    fn drop(&mut self) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            task.abort();
        }
    }
}

impl<S: Source> Resolver for WatchingResolver<S> {
    fn resolve(&self, service: &str) -> Result<Arc<[Instance]>, ResolveError> {
        self.follow(service);
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        match known.get(service) {
            Some(k) if !k.instances.is_empty() => Ok(k.instances.clone()),
            Some(_) => self
                .fallback
                .resolve(service)
                .map_err(|_| ResolveError::NoInstances(service.to_owned())),
            None => self.fallback.resolve(service),
        }
    }

    fn services(&self) -> Vec<String> {
        let mut names = self.fallback.services();
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        names.extend(known.keys().cloned());
        names.sort();
        names.dedup();
        names
    }

    fn stale(&self, service: &str) -> bool {
        self.known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(service)
            .is_some_and(|k| k.stale)
    }
}
