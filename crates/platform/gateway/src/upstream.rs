//! Upstream calls: instances come through discovery; one is chosen by the
//! upstream's load-balancing policy among those not ejected; failures eject an
//! instance for a growing time; idempotent requests (and requests that never left
//! because the connection failed) are retried on another instance within a budget.
//! Requests go out through [`crate::wire`], over connections pooled per worker
//! thread and authority.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use axum::body::Body;
use bytes::Bytes;
use chassis::client::Instance;
use discovery::Resolver;
use http::{HeaderMap, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rand::Rng;
use resilience::retry::RetryPolicy;

use crate::configuration::{HashOn, LbPolicy, UpstreamConfig};
use crate::ratelimit::nanos;

/// Why an upstream call failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no instance of `{service}` is known: {reason}")]
    NoInstance { service: String, reason: String },
    #[error("cannot connect to `{service}`: {reason}")]
    Connect { service: String, reason: String },
    #[error("`{service}` did not answer within {after:?}")]
    Timeout { service: String, after: Duration },
    #[error("`{service}` failed: {reason}")]
    Failed { service: String, reason: String },
}

/// One instance's live state.
#[derive(Debug, Default)]
pub struct InstanceState {
    pub outstanding: AtomicU32,
    /// Exponentially weighted response time, microseconds.
    pub ewma_us: AtomicU64,
    pub consecutive_failures: AtomicU32,
    pub ejections: AtomicU32,
    /// Nanoseconds since the upstreams' epoch; 0: not ejected.
    pub ejected_until: AtomicU64,
}

/// The instances last resolved, with their states (rebuilt when discovery answers
/// with a new set).
struct Snapshot {
    instances: Arc<[Instance]>,
    states: Vec<Arc<InstanceState>>,
}

/// One upstream service.
pub struct Upstream {
    pub name: String,
    snapshot: ArcSwapOption<Snapshot>,
    /// States survive instance-set changes (an instance keeps its ejection).
    states: Mutex<HashMap<String, Arc<InstanceState>>>,
    next: AtomicUsize,
    /// Attempts and budget, rebuilt when a reload changes the upstream's settings.
    retry: ArcSwap<Retry>,
    /// `bazaar_gateway_upstream_responses_total` per outcome, looked up once.
    outcomes: [Counter; OUTCOMES.len()],
}

/// The outcomes an upstream attempt is counted under.
const OUTCOMES: [&str; 8] = [
    "1xx",
    "2xx",
    "3xx",
    "4xx",
    "5xx",
    "connect_error",
    "timeout",
    "error",
];

impl Upstream {
    fn count(&self, outcome: &str) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.outcomes[i].inc();
        }
    }
}

/// A retry policy and the settings it was built from.
struct Retry {
    retries: u32,
    budget_percent: u8,
    policy: Arc<RetryPolicy>,
}

impl Retry {
    fn new(config: &UpstreamConfig) -> Arc<Self> {
        Arc::new(Self {
            retries: config.retries,
            budget_percent: config.retry_budget_percent,
            policy: RetryPolicy::new(
                config.retries + 1,
                Duration::from_millis(5),
                Duration::from_millis(100),
                config.retry_budget(),
            ),
        })
    }

    fn matches(&self, config: &UpstreamConfig) -> bool {
        self.retries == config.retries && self.budget_percent == config.retry_budget_percent
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    upstream: String,
    outcome: &'static str,
}

#[derive(Clone, Default)]
struct Metrics {
    outcomes: Family<OutcomeLabels, Counter>,
    ejections: Family<OutcomeLabels, Counter>,
}

/// Upstreams by service name (names come from the configuration, so a fast hash).
type UpstreamMap = HashMap<String, Arc<Upstream>, foldhash::fast::RandomState>;

/// Every upstream's state; the connections are per thread ([`crate::wire`]).
pub struct Upstreams {
    connect_timeout: Duration,
    resolver: Arc<dyn Resolver>,
    /// Read on every request without a lock; copied on the rare insert.
    map: ArcSwap<UpstreamMap>,
    inserting: Mutex<()>,
    epoch: Instant,
    metrics: Metrics,
}

/// What a call learned besides its answer.
#[derive(Debug, Default)]
pub struct Report {
    /// The answer's fields as lines, when [`Call::as_fields`] asked for them.
    pub fields: Option<crate::wire::Fields>,
    /// From the first attempt's start to the last one's end.
    pub took: Option<Duration>,
}

/// What a caller passes for one request.
pub struct Call<'a> {
    pub service: &'a str,
    pub config: &'a UpstreamConfig,
    pub timeout: Duration,
    /// The key for consistent hashing, when the policy hashes.
    pub hash_key: Option<&'a str>,
    /// The route's extra attempts, in place of the upstream's `retries`.
    pub retries: Option<u32>,
    /// Fields the proxy adds, written after the head's own instead of inserted into
    /// its map (each insert hashes a name the map then holds only to write it out).
    pub added: &'a crate::wire::Added,
    /// With these names, the answer's own fields come back as lines
    /// ([`crate::wire::Fields`], without the names given) rather than in its map:
    /// for a client connection whose server writes them out as they are.
    pub as_fields: Option<&'a [http::HeaderName]>,
}

impl Upstreams {
    pub fn new(resolver: Arc<dyn Resolver>, connect_timeout: Duration) -> Self {
        Self {
            connect_timeout,
            resolver,
            map: ArcSwap::from_pointee(UpstreamMap::default()),
            inserting: Mutex::new(()),
            epoch: Instant::now(),
            metrics: Metrics::default(),
        }
    }

    /// `bazaar_gateway_upstream_responses_total{upstream, outcome}` and
    /// `bazaar_gateway_upstream_ejections_total{upstream}`.
    pub fn register_metrics(&self, metrics: &telemetry::metrics::Metrics) {
        metrics.register(
            "bazaar_gateway_upstream_responses",
            "Upstream attempts by outcome (2xx..5xx, connect_error, timeout)",
            self.metrics.outcomes.clone(),
        );
        metrics.register(
            "bazaar_gateway_upstream_ejections",
            "Instances ejected by outlier detection",
            self.metrics.ejections.clone(),
        );
    }

    pub fn resolver(&self) -> &Arc<dyn Resolver> {
        &self.resolver
    }

    fn upstream(&self, service: &str, config: &UpstreamConfig) -> Arc<Upstream> {
        let known = |u: &Arc<Upstream>| {
            if !u.retry.load().matches(config) {
                u.retry.store(Retry::new(config));
            }
            u.clone()
        };
        if let Some(u) = self.map.load().get(service) {
            return known(u);
        }
        let _inserting = self.inserting.lock().unwrap_or_else(|e| e.into_inner());
        let map = self.map.load_full();
        if let Some(u) = map.get(service) {
            return known(u);
        }
        let outcomes = OUTCOMES.map(|outcome| {
            self.metrics
                .outcomes
                .get_or_create(&OutcomeLabels {
                    upstream: service.to_owned(),
                    outcome,
                })
                .clone()
        });
        let u = Arc::new(Upstream {
            name: service.to_owned(),
            snapshot: ArcSwapOption::empty(),
            states: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(0),
            retry: ArcSwap::new(Retry::new(config)),
            outcomes,
        });
        let mut grown = (*map).clone();
        grown.insert(service.to_owned(), u.clone());
        self.map.store(Arc::new(grown));
        u
    }

    /// For the admin API: `service`'s instances as discovery knows them now, with their states (and
    /// whether each is ejected): those no request has reached yet included, so an
    /// operator sees a service's instances before its first request.
    pub fn states(
        &self,
        service: &str,
        config: &UpstreamConfig,
    ) -> Vec<(Instance, Arc<InstanceState>, bool)> {
        let u = self.upstream(service, config);
        let Ok(s) = self.snapshot(&u) else {
            return Vec::new();
        };
        let now = nanos(self.epoch.elapsed());
        s.instances
            .iter()
            .cloned()
            .zip(s.states.iter().cloned())
            .map(|(i, st)| {
                let ejected = st.ejected_until.load(Ordering::Relaxed) > now;
                (i, st, ejected)
            })
            .collect()
    }

    fn snapshot(&self, u: &Upstream) -> Result<Arc<Snapshot>, UpstreamError> {
        let instances = self
            .resolver
            .resolve(&u.name)
            .map_err(|e| UpstreamError::NoInstance {
                service: u.name.clone(),
                reason: e.to_string(),
            })?;
        if let Some(s) = u.snapshot.load_full()
            && Arc::ptr_eq(&s.instances, &instances)
        {
            return Ok(s);
        }
        let mut states = u.states.lock().unwrap_or_else(|e| e.into_inner());
        let list = instances
            .iter()
            .map(|i| states.entry(i.id.clone()).or_default().clone())
            .collect();
        let s = Arc::new(Snapshot {
            instances,
            states: list,
        });
        u.snapshot.store(Some(s.clone()));
        Ok(s)
    }

    /// An instance not yet tried, by the route's policy; the ejected ones only when
    /// every other is (Envoy's panic mode: use them all rather than fail). The
    /// candidates are counted and indexed in place, not collected: a pick runs on
    /// every request.
    fn pick(
        &self,
        u: &Upstream,
        s: &Snapshot,
        call: &Call<'_>,
        tried: &[usize],
        at: Instant,
    ) -> Option<usize> {
        let now = nanos(at.saturating_duration_since(self.epoch));
        let all = 0..s.instances.len();
        let fresh = |i: &usize| !tried.contains(i);
        let healthy =
            |i: &usize| fresh(i) && s.states[*i].ejected_until.load(Ordering::Relaxed) <= now;
        let (eligible, n): (&dyn Fn(&usize) -> bool, usize) =
            match all.clone().filter(healthy).count() {
                0 => (&fresh, all.clone().filter(fresh).count()),
                n => (&healthy, n),
            };
        let nth = |k: usize| all.clone().filter(|i| eligible(i)).nth(k);
        match (n, call.config.lb) {
            (0, _) => None,
            (1, _) => nth(0),
            (_, LbPolicy::RoundRobin) => nth(u.next.fetch_add(1, Ordering::Relaxed) % n),
            (n, LbPolicy::P2c) => {
                let mut rng = rand::thread_rng();
                let a = rng.gen_range(0..n);
                let b = (a + rng.gen_range(1..n)) % n;
                let (a, b) = (nth(a)?, nth(b)?);
                let score = |i: usize| {
                    let st = &s.states[i];
                    let load = u64::from(st.outstanding.load(Ordering::Relaxed)) + 1;
                    load * st.ewma_us.load(Ordering::Relaxed).max(1)
                };
                Some(if score(a) <= score(b) { a } else { b })
            }
            (_, LbPolicy::ConsistentHash) => match call.hash_key {
                // Rendezvous hashing: the instance with the highest hash of
                // (key, instance) wins, so removing one moves only its keys.
                Some(key) => all.filter(|i| eligible(i)).max_by_key(|&i| {
                    mix(fnv(
                        key.as_bytes(),
                        fnv(s.instances[i].id.as_bytes(), 0xcbf2_9ce4_8422_2325),
                    ))
                }),
                None => nth(u.next.fetch_add(1, Ordering::Relaxed) % n),
            },
        }
    }

    /// Records an attempt's outcome: latency, and failures towards ejection.
    fn record(
        &self,
        u: &Upstream,
        s: &Snapshot,
        i: usize,
        call: &Call<'_>,
        took: Duration,
        failed: bool,
    ) {
        let st = &s.states[i];
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        let old = st.ewma_us.load(Ordering::Relaxed);
        // alpha = 1/8: follows a slowdown within a few dozen requests.
        let new = if old == 0 { us } else { old - old / 8 + us / 8 };
        st.ewma_us.store(new, Ordering::Relaxed);
        if !failed {
            st.consecutive_failures.store(0, Ordering::Relaxed);
            return;
        }
        let failures = st.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let o = &call.config;
        if failures < o.outlier_consecutive_failures {
            return;
        }
        let now = nanos(self.epoch.elapsed());
        let n = s.instances.len();
        let ejected = s
            .states
            .iter()
            .filter(|st| st.ejected_until.load(Ordering::Relaxed) > now)
            .count();
        let cap = (n * usize::from(o.outlier_max_ejected_percent) / 100).max(usize::from(n > 1));
        if ejected >= cap {
            return;
        }
        let times = st.ejections.fetch_add(1, Ordering::Relaxed);
        let base = o.outlier_base_ejection.0;
        let span = base
            .saturating_mul(1u32 << times.min(16))
            .min(o.outlier_max_ejection.0.max(base));
        st.ejected_until.store(now + nanos(span), Ordering::Relaxed);
        st.consecutive_failures.store(0, Ordering::Relaxed);
        self.metrics
            .ejections
            .get_or_create(&OutcomeLabels {
                upstream: u.name.clone(),
                outcome: "ejected",
            })
            .inc();
        tracing::warn!(upstream = %u.name, instance = %s.instances[i].id, ejected_for = ?span, "instance ejected after consecutive failures");
    }

    /// Sends a request (its URI a path and query; its body read whole, so any
    /// attempt can carry it again) to an instance of `call.service`. Each attempt
    /// is timed by `timer` when one is lent (a connection's, see
    /// [`crate::h1::within`]), else by a timer of its own. What else the call
    /// learned lands in `report`.
    pub async fn send(
        &self,
        call: Call<'_>,
        head: &http::request::Parts,
        body: Bytes,
        mut timer: Option<Pin<&mut tokio::time::Sleep>>,
        report: &mut Report,
    ) -> Result<Response<Body>, UpstreamError> {
        let u = self.upstream(call.service, call.config);
        let s = self.snapshot(&u)?;
        let retry = u.retry.load_full();
        retry.policy.on_request();
        let idempotent = resilience::retry::is_idempotent(&head.method);
        let retries = call.retries.unwrap_or(call.config.retries);
        let may_retry = retries > 0 && s.instances.len() > 1;
        // Written into each attempt's head by the wire (the time left as it goes).
        let context = telemetry::context::current()
            .unwrap_or_else(telemetry::context::RequestContext::new_root);
        let mut tried = Vec::new();
        let mut attempt = 0u32;
        let mut first_started = None;
        loop {
            attempt += 1;
            // One reading of the clock per attempt's start and end serves the
            // pick, the pool, the deadline sent, the timeout and the latencies.
            let started = Instant::now();
            let first = *first_started.get_or_insert(started);
            let Some(i) = self.pick(&u, &s, &call, &tried, started) else {
                return Err(UpstreamError::NoInstance {
                    service: u.name.clone(),
                    reason: "every instance was tried".into(),
                });
            };
            // Only a request that may go again needs to know where it went.
            if may_retry {
                tried.push(i);
            }
            let instance = &s.instances[i];
            let state = &s.states[i];
            // Counted down however the attempt ends, dropped midway included (a
            // count left up would keep the balancer off the instance for good).
            let outstanding = Outstanding::new(&state.outstanding);
            let sent = crate::wire::send_with(
                &instance.base_url,
                head,
                call.added,
                &body,
                self.connect_timeout,
                Some(&context),
                call.as_fields,
                started,
            );
            // An attempt ends by the upstream timeout or by the request's own
            // deadline, whichever comes first: cut off from outside, the attempt
            // would leave the client a bare timeout instead of a 504, and neither
            // the instance's latency nor its failure would be recorded.
            let own = tokio::time::Instant::from_std(started) + call.timeout;
            let at = context.deadline.map_or(own, |d| d.min(own));
            let cut_short = at < own;
            let lent = timer.as_mut().map(|t| t.as_mut());
            let outcome = crate::h1::within(at, lent, std::pin::pin!(sent))
                .await
                .ok_or(());
            drop(outstanding);
            // An answer comes with the time its head arrived; a failure reads it.
            let ended = match &outcome {
                Ok(Ok((_, _, answered))) => *answered,
                _ => Instant::now(),
            };
            let took = ended.saturating_duration_since(started);
            report.took = Some(ended.saturating_duration_since(first));
            let (result, failed, connect, label) = match outcome {
                Err(_) => (
                    Err(UpstreamError::Timeout {
                        service: u.name.clone(),
                        after: at
                            .saturating_duration_since(tokio::time::Instant::from_std(started)),
                    }),
                    true,
                    false,
                    "timeout",
                ),
                Ok(Err(e)) if e.is_connect() => (
                    Err(UpstreamError::Connect {
                        service: u.name.clone(),
                        reason: e.to_string(),
                    }),
                    true,
                    true,
                    "connect_error",
                ),
                Ok(Err(e)) => (
                    Err(UpstreamError::Failed {
                        service: u.name.clone(),
                        reason: e.to_string(),
                    }),
                    true,
                    false,
                    "error",
                ),
                Ok(Ok((r, lines, _))) => {
                    report.fields = lines;
                    let status = r.status();
                    let failed = status.is_server_error();
                    (Ok(r), failed, false, status_class(status))
                }
            };
            // The request's deadline cutting an attempt short says nothing of the
            // instance (a client's short deadline must not get instances ejected),
            // and leaves no time for another.
            if cut_short && matches!(result, Err(UpstreamError::Timeout { .. })) {
                u.count(label);
                return result;
            }
            self.record(&u, &s, i, &call, took, failed);
            u.count(label);
            // Retry: a connection that failed (nothing was sent), or an idempotent
            // request that failed upstream.
            let retryable = may_retry
                && (connect
                    || (idempotent
                        && match &result {
                            Ok(r) => matches!(
                                r.status(),
                                StatusCode::BAD_GATEWAY
                                    | StatusCode::SERVICE_UNAVAILABLE
                                    | StatusCode::GATEWAY_TIMEOUT
                            ),
                            Err(_) => true,
                        }));
            if !retryable || tried.len() >= s.instances.len() {
                return result;
            }
            // Another instance is tried at once (no backoff: a different instance is
            // not the one that just failed); the budget keeps retries from
            // multiplying an outage.
            if attempt > retries || !retry.policy.withdraw() {
                return result;
            }
            tracing::debug!(upstream = %u.name, attempt, "retrying on another instance");
        }
    }
}

/// An attempt in flight on an instance, for least-outstanding balancing: counted
/// up when made, down when dropped.
struct Outstanding<'a>(&'a AtomicU32);

impl<'a> Outstanding<'a> {
    fn new(count: &'a AtomicU32) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// FNV-1a, seeded: cheap and well spread for short keys.
fn fnv(bytes: &[u8], seed: u64) -> u64 {
    bytes.iter().fold(seed, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// MurmurHash3's finalizer: FNV alone leaves keys that differ in their last byte
/// close together, and rendezvous hashing compares whole values.
fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The hashing key of a request for `on`.
pub fn hash_key(on: &HashOn, headers: &HeaderMap, params: &[(String, String)]) -> Option<String> {
    match on {
        HashOn::Header(name) => headers
            .get(name.as_str())
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        HashOn::Cookie(name) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.to_owned()),
        HashOn::Param(name) => params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_keys_from_header_cookie_and_param() {
        let mut h = HeaderMap::new();
        h.insert("x-tenant", "acme".parse().unwrap());
        h.insert(http::header::COOKIE, "a=1; session=s42".parse().unwrap());
        let params = vec![("id".to_owned(), "7".to_owned())];
        assert_eq!(
            hash_key(&HashOn::Header("x-tenant".into()), &h, &params).as_deref(),
            Some("acme")
        );
        assert_eq!(
            hash_key(&HashOn::Cookie("session".into()), &h, &params).as_deref(),
            Some("s42")
        );
        assert_eq!(
            hash_key(&HashOn::Param("id".into()), &h, &params).as_deref(),
            Some("7")
        );
        assert_eq!(hash_key(&HashOn::Param("nope".into()), &h, &params), None);
    }
}
