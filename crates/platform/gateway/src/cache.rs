//! A shared HTTP cache (RFC 9111) in front of the upstreams.
//!
//! Per route that names a `[caches.<name>]` policy:
//! - GET answers are stored when the upstream allows it: a cacheable status, no
//!   `no-store`, `private`, `Set-Cookie` or `Vary: *`, and a freshness lifetime from
//!   `s-maxage`, `max-age` or `Expires` (or the policy's `default_ttl`), capped by
//!   `max_ttl`. HEAD is answered from the stored GET.
//! - Variants: the request's values of the headers an answer `Vary`s on are kept
//!   with it; a request matches the variant whose values it shares.
//! - A stale answer with a validator is revalidated (`If-None-Match` /
//!   `If-Modified-Since`); a `304` refreshes it. Clients get `304` themselves when
//!   their `If-None-Match` (or `If-Modified-Since`) matches; answers the upstream
//!   sent without an `ETag` get one made from their body.
//! - Request coalescing: concurrent misses on one key make one upstream call; the
//!   others wait for it (up to the route's deadline) and share its answer when it
//!   can be stored, or go upstream themselves when it cannot.
//! - stale-if-error: while the upstream fails (5xx, unreachable, timed out) a stale
//!   answer is served for the policy's `stale_if_error` (or the answer's own
//!   `stale-if-error=N`), unless it said `must-revalidate`.
//! - Memory is bounded in bytes (`gateway.cache_max_bytes`), the least useful entries
//!   evicted first (moka's TinyLFU); `store = "redis"` keeps entries in the shared
//!   Redis instead, with a Redis expiry.
//! - A successful unsafe request (POST, PUT, PATCH, DELETE) invalidates what is
//!   stored for its URI (RFC 9111 §4.4).
//! - Every answer says what happened in `Cache-Status` (RFC 9211) and, from the cache,
//!   its `Age`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use sha2::Digest;
use tokio::sync::watch;

use crate::configuration::{CachePolicy, CacheStore};
use crate::redis_store::SharedRedis;
use crate::upstream::UpstreamError;

pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
/// The cache's name in `Cache-Status`.
const NAME: &str = "bazaar";
/// Variants kept per URI; more are a sign of a `Vary` on something too diverse.
const MAX_VARIANTS: usize = 8;
/// Statuses cacheable by default (RFC 9110 §15.1).
const CACHEABLE: [u16; 11] = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];

/// A response's or request's `Cache-Control`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Directives {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub must_revalidate: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub stale_if_error: Option<u64>,
}

impl Directives {
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut d = Self::default();
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(value) = value.to_str() else {
                // Unreadable directives: assume the strictest.
                d.no_store = true;
                continue;
            };
            for directive in value.split(',') {
                let (name, arg) = match directive.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (directive.trim(), None),
                };
                let secs = || arg.and_then(|a| a.parse::<u64>().ok());
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => d.no_store = true,
                    // The qualified forms (`no-cache="set-cookie"`) are taken whole:
                    // stricter, never wrong.
                    "no-cache" => d.no_cache = true,
                    "private" => d.private = true,
                    "must-revalidate" | "proxy-revalidate" => d.must_revalidate = true,
                    // A malformed age is treated as stale (RFC 9111 §4.2.1).
                    "max-age" => d.max_age = Some(secs().unwrap_or(0)),
                    "s-maxage" => d.s_maxage = Some(secs().unwrap_or(0)),
                    "stale-if-error" => d.stale_if_error = secs(),
                    _ => {}
                }
            }
        }
        d
    }
}

/// One stored answer.
#[derive(Debug)]
pub struct Stored {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The request's values of the headers this answer varies on.
    vary: Vec<(HeaderName, Option<String>)>,
    /// When the answer arrived, and how old it already was then.
    response_time: SystemTime,
    initial_age: Duration,
    fresh_for: Duration,
    stale_if_error: Duration,
    must_revalidate: bool,
    /// The `ETag` was made here: it cannot revalidate with the upstream.
    etag_generated: bool,
}

impl Stored {
    fn age(&self, now: SystemTime) -> Duration {
        self.initial_age + now.duration_since(self.response_time).unwrap_or_default()
    }

    fn is_fresh(&self, now: SystemTime) -> bool {
        self.age(now) < self.fresh_for
    }

    /// May be served while the upstream fails.
    fn usable_on_error(&self, now: SystemTime) -> bool {
        !self.must_revalidate && self.age(now) < self.fresh_for + self.stale_if_error
    }

    /// The stored request values match this request's.
    fn matches(&self, request: &HeaderMap) -> bool {
        self.vary
            .iter()
            .all(|(name, value)| joined(request, name).as_deref() == value.as_deref())
    }

    /// `If-None-Match` / `If-Modified-Since` for revalidating with the upstream.
    fn validators(&self) -> Vec<(HeaderName, HeaderValue)> {
        let mut v = Vec::new();
        if !self.etag_generated
            && let Some(etag) = self.headers.get(header::ETAG)
        {
            v.push((header::IF_NONE_MATCH, etag.clone()));
        }
        if let Some(lm) = self.headers.get(header::LAST_MODIFIED) {
            v.push((header::IF_MODIFIED_SINCE, lm.clone()));
        }
        v
    }

    /// An `ETag` the upstream knows, or a `Last-Modified`: a conditional request can
    /// revalidate this answer.
    fn has_validator(&self) -> bool {
        (!self.etag_generated && self.headers.contains_key(header::ETAG))
            || self.headers.contains_key(header::LAST_MODIFIED)
    }

    /// How long the entry is worth keeping: fresh, then usable on error, then (with
    /// a validator) as a base for a cheap revalidation.
    fn keep_for(&self, now: SystemTime) -> Duration {
        let revalidate = match self.has_validator() {
            false => Duration::ZERO,
            true => self.fresh_for.max(Duration::from_secs(60)),
        };
        (self.fresh_for + self.stale_if_error + revalidate).saturating_sub(self.age(now))
    }

    fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        self.body.len() + headers + 256
    }
}

/// The request's values of `name`, joined as one field.
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!values.is_empty()).then(|| values.join(","))
}

/// The variants stored for one key.
#[derive(Debug, Default)]
pub struct Variants {
    variants: Vec<Arc<Stored>>,
    keep_for: Duration,
    weight: u32,
}

impl Variants {
    fn new(variants: Vec<Arc<Stored>>, now: SystemTime, key: &str) -> Self {
        let keep_for = variants
            .iter()
            .map(|s| s.keep_for(now))
            .max()
            .unwrap_or_default();
        let weight = variants.iter().map(|s| s.weight()).sum::<usize>() + key.len();
        Self {
            variants,
            keep_for,
            weight: u32::try_from(weight).unwrap_or(u32::MAX),
        }
    }

    fn find(&self, request: &HeaderMap) -> Option<&Arc<Stored>> {
        self.variants.iter().find(|s| s.matches(request))
    }
}

struct KeepFor;

impl moka::Expiry<Arc<str>, Arc<Variants>> for KeepFor {
    fn expire_after_create(
        &self,
        _: &Arc<str>,
        value: &Arc<Variants>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.keep_for)
    }

    fn expire_after_update(
        &self,
        _: &Arc<str>,
        value: &Arc<Variants>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.keep_for)
    }
}

/// What a lookup found for a request.
enum Lookup {
    Fresh(Arc<Stored>),
    Stale(Arc<Stored>),
    Miss,
}

/// An answer published to the requests that waited for it: the stored answer, or
/// nothing they can use.
type Filled = Option<Option<Arc<Stored>>>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    route: String,
    result: &'static str,
}

#[derive(Clone, Default)]
struct Metrics {
    requests: Family<CacheLabels, Counter>,
    bytes: Gauge,
    store_errors: Counter,
}

/// The cache: entries in memory or Redis, and the fetches under way.
pub struct Cache {
    memory: moka::sync::Cache<Arc<str>, Arc<Variants>>,
    inflight: Mutex<HashMap<Arc<str>, watch::Receiver<Filled>>>,
    redis: Option<Arc<SharedRedis>>,
    metrics: Metrics,
}

/// One cacheable request, as the proxy sees it.
pub struct CacheRequest<'a> {
    /// The stored answers' key (`Cache::key`).
    pub key: String,
    pub policy: &'a CachePolicy,
    pub route: &'a str,
    pub head: bool,
    /// How long followers wait for the leader's fetch.
    pub deadline: Duration,
}

/// A fetch under way: the leader publishes its outcome to the followers.
struct Leader<'a> {
    cache: &'a Cache,
    key: Arc<str>,
    tx: watch::Sender<Filled>,
}

impl Leader<'_> {
    fn publish(self, stored: Option<Arc<Stored>>) {
        self.tx.send_replace(Some(stored));
    }
}

impl Drop for Leader<'_> {
    // A leader that ends (answered, failed or cancelled with its client) leaves the
    // key free; followers of a cancelled leader see the channel close and fetch.
    fn drop(&mut self) {
        if let Ok(mut inflight) = self.cache.inflight.lock()
            && inflight
                .get(&self.key)
                .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()))
        {
            inflight.remove(&self.key);
        }
    }
}

enum Flight<'a> {
    Leader(Leader<'a>),
    Follower(watch::Receiver<Filled>),
}

impl Cache {
    /// A cache of at most `max_bytes` in memory; `redis` for `store = "redis"`.
    pub fn new(max_bytes: u64, redis: Option<Arc<SharedRedis>>) -> Self {
        Self {
            memory: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_, v: &Arc<Variants>| v.weight)
                .expire_after(KeepFor)
                .build(),
            inflight: Mutex::new(HashMap::new()),
            redis,
            metrics: Metrics::default(),
        }
    }

    pub fn register_metrics(&self, metrics: &telemetry::metrics::Metrics) {
        metrics.register(
            "bazaar_gateway_cache_requests",
            "Requests on cached routes, by route and result (hit, collapsed, revalidated, stale, miss, uncacheable, bypass)",
            self.metrics.requests.clone(),
        );
        metrics.register(
            "bazaar_gateway_cache_bytes",
            "Bytes held by the in-memory cache",
            self.metrics.bytes.clone(),
        );
        metrics.register(
            "bazaar_gateway_cache_store_errors",
            "Cache reads and writes that could not reach Redis (treated as misses)",
            self.metrics.store_errors.clone(),
        );
    }

    /// The key of what `target` (path and query, as sent upstream) on `host` through
    /// `service` answers under policy `policy`; `user` for per-user caching.
    pub fn key(
        policy: &str,
        service: &str,
        host: Option<&str>,
        target: &str,
        user: Option<&str>,
    ) -> String {
        let mut key = format!("{policy}\n{service}\n{}\n{target}", host.unwrap_or(""));
        if let Some(user) = user {
            key.push_str("\nuser:");
            key.push_str(user);
        }
        key
    }

    fn count(&self, route: &str, result: &'static str) {
        self.metrics
            .requests
            .get_or_create(&CacheLabels {
                route: route.to_owned(),
                result,
            })
            .inc();
    }

    /// Counts a request the cache let through (authenticated, or not GET/HEAD).
    pub fn bypassed(&self, route: &str) {
        self.count(route, "bypass");
    }

    fn redis_for(&self, policy: &CachePolicy) -> Option<&Arc<SharedRedis>> {
        match policy.store {
            CacheStore::Redis => self.redis.as_ref(),
            CacheStore::Memory => None,
        }
    }

    fn redis_key(redis: &SharedRedis, key: &str) -> String {
        let digest = sha2::Sha256::digest(key.as_bytes());
        format!("{}:cache:{}", redis.prefix, hex::encode(digest))
    }

    async fn variants(&self, key: &str, policy: &CachePolicy) -> Option<Arc<Variants>> {
        let Some(redis) = self.redis_for(policy) else {
            return self.memory.get(key);
        };
        let read = async {
            let mut c = redis.connection().await?;
            redis::cmd("GET")
                .arg(Self::redis_key(redis, key))
                .query_async::<Option<Vec<u8>>>(&mut c)
                .await
        };
        match read.await {
            Ok(Some(bytes)) => codec::decode(&bytes, key).map(Arc::new),
            Ok(None) => None,
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::debug!(error = %e, "cache read from Redis failed; a miss");
                None
            }
        }
    }

    async fn lookup(&self, key: &str, policy: &CachePolicy, request: &HeaderMap) -> Lookup {
        let now = SystemTime::now();
        match self.variants(key, policy).await {
            Some(v) => match v.find(request) {
                Some(s) if s.is_fresh(now) => Lookup::Fresh(s.clone()),
                Some(s) => Lookup::Stale(s.clone()),
                None => Lookup::Miss,
            },
            None => Lookup::Miss,
        }
    }

    /// Stores `stored`, replacing the variant for the same request values.
    async fn store(&self, key: &str, policy: &CachePolicy, stored: Arc<Stored>) {
        let now = SystemTime::now();
        let mut variants: Vec<Arc<Stored>> = match self.variants(key, policy).await {
            Some(v) => v
                .variants
                .iter()
                .filter(|s| s.vary != stored.vary && s.keep_for(now) > Duration::ZERO)
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        variants.insert(0, stored);
        variants.truncate(MAX_VARIANTS);
        let variants = Variants::new(variants, now, key);
        match self.redis_for(policy) {
            None => {
                self.memory.insert(Arc::from(key), Arc::new(variants));
                self.metrics
                    .bytes
                    .set(i64::try_from(self.memory.weighted_size()).unwrap_or(i64::MAX));
            }
            Some(redis) => {
                let Some(bytes) = codec::encode(&variants) else {
                    return;
                };
                let write = async {
                    let mut c = redis.connection().await?;
                    redis::cmd("SET")
                        .arg(Self::redis_key(redis, key))
                        .arg(bytes)
                        .arg("PX")
                        .arg(variants.keep_for.as_millis().max(1) as u64)
                        .query_async::<()>(&mut c)
                        .await
                };
                if let Err(e) = write.await {
                    self.metrics.store_errors.inc();
                    tracing::debug!(error = %e, "cache write to Redis failed");
                }
            }
        }
    }

    /// Drops what is stored under `key` (after an unsafe request changed it).
    pub async fn invalidate(&self, key: &str, policy: &CachePolicy) {
        match self.redis_for(policy) {
            None => self.memory.invalidate(key),
            Some(redis) => {
                let delete = async {
                    let mut c = redis.connection().await?;
                    redis::cmd("DEL")
                        .arg(Self::redis_key(redis, key))
                        .query_async::<()>(&mut c)
                        .await
                };
                if let Err(e) = delete.await {
                    self.metrics.store_errors.inc();
                    tracing::warn!(error = %e, "cache invalidation in Redis failed");
                }
            }
        }
    }

    /// Everything in memory, dropped (the admin API's purge).
    pub fn purge_memory(&self) {
        self.memory.invalidate_all();
        self.metrics.bytes.set(0);
    }

    /// Every cached answer in Redis under this gateway's prefix, deleted; how many.
    pub async fn purge_redis(&self) -> Result<u64, redis::RedisError> {
        let Some(redis) = self.redis.as_ref() else {
            return Ok(0);
        };
        let mut c = redis.connection().await?;
        let pattern = format!("{}:cache:*", redis.prefix);
        let mut cursor = 0u64;
        let mut deleted = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut c)
                .await?;
            if !keys.is_empty() {
                deleted += redis::cmd("DEL")
                    .arg(&keys)
                    .query_async::<u64>(&mut c)
                    .await?;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    pub fn max_bytes(&self) -> u64 {
        self.memory.policy().max_capacity().unwrap_or(0)
    }

    /// Entries and bytes in memory (approximate: moka applies writes lazily).
    pub fn memory_usage(&self) -> (u64, u64) {
        self.memory.run_pending_tasks();
        (self.memory.entry_count(), self.memory.weighted_size())
    }

    fn join(&self, key: &str) -> Flight<'_> {
        let Ok(mut inflight) = self.inflight.lock() else {
            // A poisoned map only loses coalescing.
            let (tx, _) = watch::channel(None);
            return Flight::Leader(Leader {
                cache: self,
                key: Arc::from(key),
                tx,
            });
        };
        if let Some(rx) = inflight.get(key) {
            return Flight::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        let key: Arc<str> = Arc::from(key);
        inflight.insert(key.clone(), rx);
        Flight::Leader(Leader {
            cache: self,
            key,
            tx,
        })
    }

    /// Answers a GET or HEAD on a cached route: from the cache, or through `send`
    /// (called at most once) and stored when the answer allows it.
    pub async fn serve<F>(
        &self,
        request: CacheRequest<'_>,
        mut parts: http::request::Parts,
        send: F,
    ) -> Result<Response<axum::body::Body>, UpstreamError>
    where
        F: AsyncFnOnce(http::request::Parts) -> Result<Response<axum::body::Body>, UpstreamError>,
    {
        let asked = Directives::parse(&parts.headers);
        // The client's conditions are the cache's to answer; the upstream gets the
        // cache's own validators.
        let conditions = Conditions::take(&mut parts.headers);
        let request_headers = parts.headers.clone();
        let lookup = self
            .lookup(&request.key, request.policy, &parts.headers)
            .await;
        let forced = asked.no_cache || asked.max_age == Some(0);
        if let Lookup::Fresh(stored) = &lookup
            && !forced
        {
            self.count(request.route, "hit");
            return Ok(respond(stored, &conditions, request.head, "hit"));
        }
        if request.head {
            // Only GETs fill the cache.
            self.count(request.route, "uncacheable");
            let response = send(parts).await?;
            return Ok(passthrough(response, "fwd=request"));
        }
        let stale = match lookup {
            Lookup::Fresh(s) | Lookup::Stale(s) => Some(s),
            Lookup::Miss => None,
        };
        let leader = match self.join(&request.key) {
            Flight::Leader(leader) => Some(leader),
            Flight::Follower(mut rx) => {
                let waited =
                    tokio::time::timeout(request.deadline, rx.wait_for(Option::is_some)).await;
                if let Ok(Ok(filled)) = waited
                    && let Some(Some(stored)) = &*filled
                    && stored.matches(&request_headers)
                {
                    self.count(request.route, "collapsed");
                    return Ok(respond(stored, &conditions, false, "fwd=miss; collapsed"));
                }
                // Nothing to share (not storable, or the leader gave up): go alone.
                None
            }
        };
        let publish = |stored: Option<Arc<Stored>>| {
            if let Some(leader) = leader {
                leader.publish(stored);
            }
        };
        if let Some(s) = &stale {
            for (name, value) in s.validators() {
                parts.headers.insert(name, value);
            }
        }
        let sent_at = SystemTime::now();
        let result = send(parts).await;
        let now = SystemTime::now();
        if let (Ok(r), Some(old)) = (&result, &stale)
            && r.status() == StatusCode::NOT_MODIFIED
        {
            let fresh = Arc::new(old.refreshed(r.headers(), request.policy, sent_at, now));
            self.store(&request.key, request.policy, fresh.clone())
                .await;
            publish(Some(fresh.clone()));
            self.count(request.route, "revalidated");
            return Ok(respond(
                &fresh,
                &conditions,
                false,
                "fwd=stale; fwd-status=304; stored",
            ));
        }
        // stale-if-error: the upstream failed (an error status, or no answer) and a
        // stale answer may still stand in.
        let failed = match &result {
            Ok(r) if is_failure(r.status()) => Some(format!(
                "fwd=stale; fwd-status={}; detail=stale-if-error",
                r.status().as_u16()
            )),
            Ok(_) => None,
            Err(_) => Some("fwd=stale; detail=stale-if-error".to_owned()),
        };
        if let (Some(detail), Some(stored)) =
            (failed, stale.as_ref().filter(|s| s.usable_on_error(now)))
        {
            if let Err(e) = &result {
                tracing::warn!(error = %e, "upstream failed; serving a stale answer (stale-if-error)");
            }
            publish(Some(stored.clone()));
            self.count(request.route, "stale");
            return Ok(respond(stored, &conditions, false, &detail));
        }
        let response = match result {
            Ok(r) => r,
            Err(e) => {
                publish(None);
                return Err(e);
            }
        };
        let fwd = match stale {
            Some(_) => "fwd=stale",
            None => "fwd=uri-miss",
        };
        let Some(meta) = storable(&response, request.policy) else {
            publish(None);
            self.count(request.route, "uncacheable");
            return Ok(passthrough(response, fwd));
        };
        let limit = usize::try_from(request.policy.max_object_bytes).unwrap_or(usize::MAX);
        let (parts, body) = response.into_parts();
        match read_bounded(body, limit).await {
            Ok(body) => {
                let stored = Arc::new(Stored::new(
                    parts,
                    body,
                    meta,
                    &request_headers,
                    sent_at,
                    now,
                ));
                self.store(&request.key, request.policy, stored.clone())
                    .await;
                publish(Some(stored.clone()));
                self.count(request.route, "miss");
                Ok(respond(
                    &stored,
                    &conditions,
                    false,
                    &format!("{fwd}; stored"),
                ))
            }
            Err(Bounded::TooLarge(body)) => {
                publish(None);
                self.count(request.route, "uncacheable");
                let mut response = Response::from_parts(parts, body);
                set_status(response.headers_mut(), &format!("{fwd}; detail=too-large"));
                Ok(response)
            }
            Err(Bounded::Broken(reason)) => {
                publish(None);
                Err(UpstreamError::Failed {
                    service: request.route.to_owned(),
                    reason,
                })
            }
        }
    }
}

/// Statuses after which a stale answer beats the upstream's.
fn is_failure(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

fn set_status(headers: &mut HeaderMap, detail: &str) {
    if let Ok(v) = HeaderValue::from_str(&format!("{NAME}; {detail}")) {
        headers.insert(CACHE_STATUS, v);
    }
}

fn passthrough(response: Response<axum::body::Body>, detail: &str) -> Response<axum::body::Body> {
    let (mut parts, body) = response.into_parts();
    set_status(&mut parts.headers, detail);
    Response::from_parts(parts, body)
}

/// What [`storable`] learned of an answer.
struct Meta {
    fresh_for: Duration,
    stale_if_error: Duration,
    must_revalidate: bool,
    vary: Vec<HeaderName>,
}

/// Whether a shared cache may store this answer, and for how long it is fresh.
fn storable(response: &Response<axum::body::Body>, policy: &CachePolicy) -> Option<Meta> {
    if !CACHEABLE.contains(&response.status().as_u16()) {
        return None;
    }
    let headers = response.headers();
    let cc = Directives::parse(headers);
    if cc.no_store || cc.private || headers.contains_key(header::SET_COOKIE) {
        return None;
    }
    let mut vary = Vec::new();
    for value in headers.get_all(header::VARY) {
        for name in value.to_str().ok()?.split(',') {
            let name = name.trim();
            if name == "*" {
                return None;
            }
            if !name.is_empty() {
                vary.push(HeaderName::from_bytes(name.as_bytes()).ok()?);
            }
        }
    }
    let fresh_for = freshness(headers, &cc, policy);
    let validator =
        headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED);
    // An answer fresh for no time is worth keeping only to revalidate cheaply.
    if fresh_for.is_zero() && !validator {
        return None;
    }
    let stale_if_error = match cc.must_revalidate {
        true => Duration::ZERO,
        false => cc
            .stale_if_error
            .map(Duration::from_secs)
            .unwrap_or(policy.stale_if_error.0),
    };
    Some(Meta {
        fresh_for,
        stale_if_error,
        must_revalidate: cc.must_revalidate,
        vary,
    })
}

/// The freshness lifetime (RFC 9111 §4.2.1): `s-maxage`, `max-age`, `Expires` minus
/// `Date`, else the policy's default; `no-cache` makes it zero; capped by `max_ttl`.
fn freshness(headers: &HeaderMap, cc: &Directives, policy: &CachePolicy) -> Duration {
    if cc.no_cache {
        return Duration::ZERO;
    }
    let lifetime = match (cc.s_maxage, cc.max_age) {
        (Some(s), _) | (None, Some(s)) => Duration::from_secs(s),
        (None, None) => match headers.get(header::EXPIRES) {
            // An invalid Expires (like `0`) means already expired.
            Some(expires) => match http_date(Some(expires)) {
                Some(expires) => {
                    let date = http_date(headers.get(header::DATE)).unwrap_or_else(SystemTime::now);
                    expires.duration_since(date).unwrap_or_default()
                }
                None => Duration::ZERO,
            },
            None => policy.default_ttl.0,
        },
    };
    lifetime.min(policy.max_ttl.0)
}

fn http_date(value: Option<&HeaderValue>) -> Option<SystemTime> {
    httpdate::parse_http_date(value?.to_str().ok()?).ok()
}

impl Stored {
    fn new(
        parts: http::response::Parts,
        body: Bytes,
        meta: Meta,
        request: &HeaderMap,
        request_time: SystemTime,
        response_time: SystemTime,
    ) -> Self {
        let mut headers = parts.headers;
        crate::proxy::strip_hop_by_hop(&mut headers);
        let initial_age = initial_age(&headers, request_time, response_time);
        headers.remove(header::AGE);
        headers.remove(CACHE_STATUS);
        // A strong validator made from the body, so clients can revalidate even when
        // the upstream gives none.
        let etag_generated = !headers.contains_key(header::ETAG);
        if etag_generated {
            let digest = sha2::Sha256::digest(&body);
            if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", hex::encode(&digest[..12]))) {
                headers.insert(header::ETAG, v);
            }
        }
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        Self {
            status: parts.status,
            vary: meta
                .vary
                .into_iter()
                .map(|name| {
                    let value = joined(request, &name);
                    (name, value)
                })
                .collect(),
            headers,
            body,
            response_time,
            initial_age,
            fresh_for: meta.fresh_for,
            stale_if_error: meta.stale_if_error,
            must_revalidate: meta.must_revalidate,
            etag_generated,
        }
    }

    /// This answer after a `304`: its headers updated by the 304's (RFC 9111 §4.3.4)
    /// and its freshness computed anew.
    fn refreshed(
        &self,
        update: &HeaderMap,
        policy: &CachePolicy,
        request_time: SystemTime,
        response_time: SystemTime,
    ) -> Self {
        let mut headers = self.headers.clone();
        for name in update.keys() {
            if *name == header::CONTENT_LENGTH || *name == header::AGE {
                continue;
            }
            headers.remove(name);
            for value in update.get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        let cc = Directives::parse(&headers);
        Self {
            status: self.status,
            body: self.body.clone(),
            vary: self.vary.clone(),
            initial_age: initial_age(update, request_time, response_time),
            fresh_for: freshness(&headers, &cc, policy),
            stale_if_error: self.stale_if_error,
            must_revalidate: cc.must_revalidate,
            etag_generated: self.etag_generated,
            headers,
            response_time,
        }
    }
}

/// RFC 9111 §4.2.3's corrected initial age.
fn initial_age(
    headers: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Duration {
    let apparent = http_date(headers.get(header::DATE))
        .and_then(|date| response_time.duration_since(date).ok())
        .unwrap_or_default();
    let age = headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or_default();
    let delay = response_time
        .duration_since(request_time)
        .unwrap_or_default();
    apparent.max(age + delay)
}

/// The client's conditional headers.
#[derive(Default)]
struct Conditions {
    if_none_match: Option<HeaderValue>,
    if_modified_since: Option<HeaderValue>,
}

impl Conditions {
    fn take(headers: &mut HeaderMap) -> Self {
        Self {
            if_none_match: headers.remove(header::IF_NONE_MATCH),
            if_modified_since: headers.remove(header::IF_MODIFIED_SINCE),
        }
    }

    /// The client already has `stored` (RFC 9110 §13.1.2, §13.1.3: weak comparison;
    /// `If-Modified-Since` only without `If-None-Match`).
    fn satisfied_by(&self, stored: &Stored) -> bool {
        if let Some(inm) = &self.if_none_match {
            let Some(etag) = stored
                .headers
                .get(header::ETAG)
                .and_then(|e| e.to_str().ok())
            else {
                return false;
            };
            let Ok(inm) = inm.to_str() else {
                return false;
            };
            let bare = |t: &str| t.trim().trim_start_matches("W/").to_owned();
            return inm
                .split(',')
                .any(|t| t.trim() == "*" || bare(t) == bare(etag));
        }
        match (
            http_date(self.if_modified_since.as_ref()),
            http_date(stored.headers.get(header::LAST_MODIFIED)),
        ) {
            (Some(since), Some(modified)) => modified <= since,
            _ => false,
        }
    }
}

/// Headers a 304 carries (RFC 9110 §15.4.5).
const NOT_MODIFIED_HEADERS: [HeaderName; 7] = [
    header::CACHE_CONTROL,
    header::CONTENT_LOCATION,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::VARY,
    header::LAST_MODIFIED,
];

/// `stored` as an answer: a 304 when the client's conditions hold, the body unless
/// `head`, with `Age` and `Cache-Status`.
fn respond(
    stored: &Stored,
    conditions: &Conditions,
    head: bool,
    detail: &str,
) -> Response<axum::body::Body> {
    let age = stored.age(SystemTime::now());
    let not_modified = stored.status == StatusCode::OK && conditions.satisfied_by(stored);
    let (status, mut headers, body) = match not_modified {
        true => {
            let mut headers = HeaderMap::new();
            for name in NOT_MODIFIED_HEADERS {
                for value in stored.headers.get_all(&name) {
                    headers.append(name.clone(), value.clone());
                }
            }
            (StatusCode::NOT_MODIFIED, headers, Bytes::new())
        }
        false => (
            stored.status,
            stored.headers.clone(),
            match head {
                true => Bytes::new(),
                false => stored.body.clone(),
            },
        ),
    };
    headers.insert(header::AGE, HeaderValue::from(age.as_secs()));
    let ttl = stored.fresh_for.as_secs() as i64 - age.as_secs() as i64;
    set_status(&mut headers, &format!("{detail}; ttl={ttl}"));
    let mut response = Response::new(axum::body::Body::from(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// A body read whole, or why not.
enum Bounded {
    /// Over the limit: what was read and the rest, as one body, to forward unstored.
    TooLarge(axum::body::Body),
    Broken(String),
}

async fn read_bounded(mut body: axum::body::Body, limit: usize) -> Result<Bytes, Bounded> {
    use hyper::body::Body as _;
    if body.size_hint().lower() > limit as u64 {
        return Err(Bounded::TooLarge(body));
    }
    let mut read = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Bounded::Broken(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            read.extend_from_slice(&data);
            if read.len() > limit {
                let head = futures::stream::once(async move {
                    Ok::<_, axum::Error>(hyper::body::Frame::data(read.freeze()))
                });
                let rest = http_body_util::BodyStream::new(body);
                let chained =
                    http_body_util::StreamBody::new(futures::StreamExt::chain(head, rest));
                return Err(Bounded::TooLarge(axum::body::Body::new(chained)));
            }
        }
    }
    Ok(read.freeze())
}

/// Entries as bytes for Redis: a version tag, then per variant its metadata as JSON
/// and its body as is (a body in JSON would be several times its size).
mod codec {
    use super::*;

    const MAGIC: &[u8; 4] = b"BZC1";

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Meta {
        status: u16,
        headers: Vec<(String, String)>,
        vary: Vec<(String, Option<String>)>,
        response_time_ms: u64,
        initial_age_ms: u64,
        fresh_for_ms: u64,
        stale_if_error_ms: u64,
        must_revalidate: bool,
        etag_generated: bool,
    }

    fn ms(d: Duration) -> u64 {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
    }

    fn put(out: &mut Vec<u8>, bytes: &[u8]) -> Option<()> {
        out.extend_from_slice(&u32::try_from(bytes.len()).ok()?.to_be_bytes());
        out.extend_from_slice(bytes);
        Some(())
    }

    /// `None` when a header value is not text (such entries stay out of Redis).
    pub fn encode(v: &Variants) -> Option<Vec<u8>> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&u32::try_from(v.variants.len()).ok()?.to_be_bytes());
        for s in &v.variants {
            let mut headers = Vec::new();
            for (name, value) in &s.headers {
                headers.push((name.as_str().to_owned(), value.to_str().ok()?.to_owned()));
            }
            let meta = Meta {
                status: s.status.as_u16(),
                headers,
                vary: s
                    .vary
                    .iter()
                    .map(|(n, v)| (n.as_str().to_owned(), v.clone()))
                    .collect(),
                response_time_ms: ms(s
                    .response_time
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()),
                initial_age_ms: ms(s.initial_age),
                fresh_for_ms: ms(s.fresh_for),
                stale_if_error_ms: ms(s.stale_if_error),
                must_revalidate: s.must_revalidate,
                etag_generated: s.etag_generated,
            };
            put(&mut out, &serde_json::to_vec(&meta).ok()?)?;
            put(&mut out, &s.body)?;
        }
        Some(out)
    }

    fn take<'a>(input: &mut &'a [u8]) -> Option<&'a [u8]> {
        let (len, rest) = input.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
        let (bytes, rest) = (rest.get(..len)?, rest.get(len..)?);
        *input = rest;
        Some(bytes)
    }

    /// `None` for anything not written by [`encode`] (another version, or damage):
    /// a miss, never a wrong answer.
    pub fn decode(bytes: &[u8], key: &str) -> Option<Variants> {
        let mut input = bytes.strip_prefix(MAGIC)?;
        let (count, rest) = input.split_first_chunk::<4>()?;
        let count = u32::from_be_bytes(*count);
        input = rest;
        let mut variants = Vec::new();
        for _ in 0..count.min(MAX_VARIANTS as u32) {
            let meta: Meta = serde_json::from_slice(take(&mut input)?).ok()?;
            let body = Bytes::copy_from_slice(take(&mut input)?);
            let mut headers = HeaderMap::new();
            for (name, value) in meta.headers {
                headers.append(
                    HeaderName::from_bytes(name.as_bytes()).ok()?,
                    HeaderValue::from_str(&value).ok()?,
                );
            }
            let mut vary = Vec::new();
            for (name, value) in meta.vary {
                vary.push((HeaderName::from_bytes(name.as_bytes()).ok()?, value));
            }
            variants.push(Arc::new(Stored {
                status: StatusCode::from_u16(meta.status).ok()?,
                headers,
                body,
                vary,
                response_time: SystemTime::UNIX_EPOCH
                    + Duration::from_millis(meta.response_time_ms),
                initial_age: Duration::from_millis(meta.initial_age_ms),
                fresh_for: Duration::from_millis(meta.fresh_for_ms),
                stale_if_error: Duration::from_millis(meta.stale_if_error_ms),
                must_revalidate: meta.must_revalidate,
                etag_generated: meta.etag_generated,
            }));
        }
        Some(Variants::new(variants, SystemTime::now(), key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| {
                (
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn directives_parse_case_insensitively_and_malformed_ages_are_stale() {
        let d = Directives::parse(&headers(&[
            ("cache-control", "Public, MAX-AGE=60, s-maxage=\"30\""),
            ("cache-control", "stale-if-error=5, must-revalidate"),
        ]));
        assert_eq!(d.max_age, Some(60));
        assert_eq!(d.s_maxage, Some(30));
        assert_eq!(d.stale_if_error, Some(5));
        assert!(d.must_revalidate && !d.no_store && !d.private);
        let d = Directives::parse(&headers(&[(
            "cache-control",
            "max-age=soon, no-cache=\"set-cookie\"",
        )]));
        assert_eq!(d.max_age, Some(0));
        assert!(d.no_cache);
    }

    #[test]
    fn freshness_prefers_s_maxage_then_max_age_then_expires_and_is_capped() {
        let policy = CachePolicy {
            max_ttl: chassis::config::HumanDuration::secs(100),
            default_ttl: chassis::config::HumanDuration::secs(7),
            ..CachePolicy::default()
        };
        let f = |h: &[(&str, &str)]| {
            let h = headers(h);
            freshness(&h, &Directives::parse(&h), &policy).as_secs()
        };
        assert_eq!(f(&[("cache-control", "max-age=60, s-maxage=20")]), 20);
        assert_eq!(f(&[("cache-control", "max-age=60")]), 60);
        assert_eq!(f(&[("cache-control", "max-age=6000")]), 100);
        assert_eq!(
            f(&[
                ("date", "Thu, 01 Jan 2026 00:00:00 GMT"),
                ("expires", "Thu, 01 Jan 2026 00:00:30 GMT")
            ]),
            30
        );
        assert_eq!(f(&[("expires", "0")]), 0);
        assert_eq!(f(&[]), 7);
        assert_eq!(f(&[("cache-control", "max-age=60, no-cache")]), 0);
    }

    #[test]
    fn client_conditions_compare_etags_weakly_and_dates() {
        let stored = Stored {
            status: StatusCode::OK,
            headers: headers(&[
                ("etag", "\"v1\""),
                ("last-modified", "Thu, 01 Jan 2026 00:00:00 GMT"),
            ]),
            body: Bytes::new(),
            vary: Vec::new(),
            response_time: SystemTime::now(),
            initial_age: Duration::ZERO,
            fresh_for: Duration::from_secs(1),
            stale_if_error: Duration::ZERO,
            must_revalidate: false,
            etag_generated: false,
        };
        let c = |h: &[(&str, &str)]| Conditions::take(&mut headers(h)).satisfied_by(&stored);
        assert!(c(&[("if-none-match", "W/\"v1\"")]));
        assert!(c(&[("if-none-match", "\"v0\", \"v1\"")]));
        assert!(c(&[("if-none-match", "*")]));
        assert!(!c(&[("if-none-match", "\"v2\"")]));
        assert!(c(&[("if-modified-since", "Thu, 01 Jan 2026 00:00:00 GMT")]));
        assert!(!c(&[(
            "if-modified-since",
            "Wed, 31 Dec 2025 00:00:00 GMT"
        )]));
        // If-None-Match wins over If-Modified-Since.
        assert!(!c(&[
            ("if-none-match", "\"v2\""),
            ("if-modified-since", "Thu, 01 Jan 2026 00:00:00 GMT")
        ]));
    }

    #[test]
    fn the_redis_codec_round_trips_and_refuses_damage() {
        let stored = Arc::new(Stored {
            status: StatusCode::NOT_FOUND,
            headers: headers(&[("content-type", "application/json"), ("etag", "\"x\"")]),
            body: Bytes::from_static(b"{\"a\":1}"),
            vary: vec![(header::ACCEPT_LANGUAGE, Some("fr".into()))],
            response_time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            initial_age: Duration::from_secs(3),
            fresh_for: Duration::from_secs(60),
            stale_if_error: Duration::from_secs(5),
            must_revalidate: true,
            etag_generated: true,
        });
        let v = Variants::new(vec![stored.clone()], SystemTime::now(), "k");
        let bytes = codec::encode(&v).unwrap();
        let back = codec::decode(&bytes, "k").unwrap();
        let s = &back.variants[0];
        assert_eq!(s.status, stored.status);
        assert_eq!(s.headers, stored.headers);
        assert_eq!(s.body, stored.body);
        assert_eq!(s.vary, stored.vary);
        assert_eq!(s.response_time, stored.response_time);
        assert_eq!(
            (s.initial_age, s.fresh_for, s.stale_if_error),
            (stored.initial_age, stored.fresh_for, stored.stale_if_error)
        );
        assert!(s.must_revalidate && s.etag_generated);
        assert!(codec::decode(&bytes[..bytes.len() - 1], "k").is_none());
        assert!(codec::decode(b"BZC0", "k").is_none());
    }
}
