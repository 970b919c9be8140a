//! The forwarding core.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use chassis::Problem;
use chassis::client::HttpClient;
use chassis::http::{AccessLog, RouteLabel};
use chassis::identity::{IDENTITY_HEADER, IdentityIssuer};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};

use crate::auth::{API_KEY, Authenticator, Caller};
use crate::cache::{Cache, CacheRequest};
use crate::configuration::{AuthenticatedCaching, LimitKey, LimitStore, RedisFallback};
use crate::cors::is_preflight;
use crate::forwarded::TrustedProxies;
use crate::normalize::normalize;
use crate::ratelimit::{Decision, KeyedLimiter, RedisLimiter};
use crate::routes::Match;
use crate::runtime::Config;
use crate::upstream::{Call, UpstreamError};

/// Headers meaningful only for one connection (RFC 9110 §7.6.1), never forwarded.
pub(crate) const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];
/// Identity a client might try to assert itself; only the gateway sets these.
const CLIENT_IDENTITY: [HeaderName; 3] = [
    IDENTITY_HEADER,
    HeaderName::from_static("x-user-id"),
    HeaderName::from_static("x-user-email"),
];
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Headers a `Connection` list can never remove: the gateway's own.
const PROTECTED: [HeaderName; 3] = [X_FORWARDED_FOR, X_FORWARDED_PROTO, X_FORWARDED_HOST];
/// The forwarding fields the gateway sets, `X-Forwarded-For` first (the one it
/// replaces even from a trusted proxy).
const FORWARDED: [HeaderName; 3] = PROTECTED;

/// Everything a request needs, shared by all requests.
pub struct Proxy {
    /// Routes and policies, swapped whole on reload.
    pub config: Arc<Config>,
    pub upstreams: crate::upstream::Upstreams,
    /// For the gateway's own calls (merging the upstreams' OpenAPI documents).
    pub client: HttpClient,
    pub auth: Authenticator,
    pub issuer: IdentityIssuer,
    /// Proxies whose `X-Forwarded-*` are believed.
    pub trusted: TrustedProxies,
    /// Deadline for routes that set none.
    pub upstream_timeout: Duration,
    /// Largest request body forwarded, in bytes.
    pub max_body: u64,
    /// The shared store of `store = "redis"` rate limits.
    pub redis: Option<RedisLimiter>,
    pub redis_fallback: RedisFallback,
    /// `bazaar_gateway_ratelimit_store_errors_total`.
    pub redis_errors: prometheus_client::metrics::counter::Counter,
    pub cache: Cache,
}

impl Proxy {
    /// A rate-limit decision, in Redis for `store = "redis"` policies (with the
    /// configured fallback while Redis is unreachable), else in memory.
    async fn decide(
        &self,
        name: &str,
        limiter: &KeyedLimiter,
        key: &str,
    ) -> Result<Decision, Problem> {
        // The clock is read here, not taken from the request's start: authentication
        // may have waited (a JWKS fetch), Redis may have failed after a round trip,
        // and a stale time would let a key through early.
        let local = || limiter.check(key, std::time::Instant::now());
        if limiter.policy.store != LimitStore::Redis {
            return Ok(local());
        }
        let error = match &self.redis {
            Some(redis) => match Box::pin(redis.check(name, limiter, key)).await {
                Ok(decision) => return Ok(decision),
                Err(e) => e.to_string(),
            },
            None => "no gateway.redis_url is configured".to_owned(),
        };
        self.redis_errors.inc();
        tracing::debug!(error = %error, policy = name, "rate limit store unavailable; falling back");
        match self.redis_fallback {
            RedisFallback::Local => Ok(local()),
            RedisFallback::Allow => Ok(Decision {
                allowed: true,
                remaining: 0,
                reset: Duration::ZERO,
                retry_after: Duration::ZERO,
            }),
            RedisFallback::Deny => Err(Problem::unavailable(
                "the rate limit cannot be checked right now; try again shortly",
            )),
        }
    }

    /// The forwarded identity for `caller`: a fresh one, or one minted less than half
    /// its lifetime ago (so it has at least that half left when it arrives): signing
    /// one per request would cost more than the rest of the request. Kept as a
    /// header value: a clone shares its bytes, where making the value anew would
    /// copy and check a few hundred bytes per request.
    fn identity(&self, caller: &Caller, now: std::time::Instant) -> Result<HeaderValue, Problem> {
        // Held while minting: a caller's concurrent first requests sign once.
        let mut minted = caller
            .minted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, token)) = &*minted
            && now.saturating_duration_since(*at) < self.issuer.ttl() / 2
        {
            return Ok(token.clone());
        }
        let token = self
            .issuer
            .mint_with_claims(&caller.sub, caller.email.as_deref(), &caller.claims)
            .map_err(Problem::internal)?;
        let token =
            HeaderValue::from_maybe_shared(bytes::Bytes::from(token)).map_err(Problem::internal)?;
        *minted = Some((now, token.clone()));
        Ok(token)
    }
}

/// Forwards one request, or answers it with a problem, with the matched route's
/// label; what the access line adds is written into `log`.
///
/// Both come back beside the response, not in its extensions: the first insert
/// into a response's extensions allocates a map, and each value a box of its own.
///
/// `timer`: the connection's timer for upstream calls, when it lends one (see
/// [`crate::h1::within`]); such a connection's server writes its answers itself,
/// so an upstream's answer may leave its fields in `fields` as lines instead of in
/// the response's map (see [`crate::wire::Fields`]). `started`: when the request
/// began (its one reading of the clock before the upstream call).
#[allow(clippy::too_many_arguments)]
pub async fn handle_request(
    proxy: &Proxy,
    peer: SocketAddr,
    request: Request,
    log: &mut AccessLog,
    timer: Option<Pin<&mut tokio::time::Sleep>>,
    fields: &mut Option<crate::wire::Fields>,
    started: std::time::Instant,
) -> (Response, Option<RouteLabel>) {
    match forward(proxy, peer, request, log, timer, fields, started).await {
        Ok((response, label)) => (response, Some(label)),
        Err((label, problem)) => (problem.into_response(), label),
    }
}

type Failure = (Option<RouteLabel>, Problem);

/// The key a rate-limit policy counts a request under: the user or API-key
/// consumer when there is a caller (else the client's address), the address, or
/// the route.
fn limit_key(
    by: LimitKey,
    caller: Option<&Caller>,
    client: std::net::IpAddr,
    route: &str,
) -> String {
    let ip = || chassis::http::ip_text(client);
    let user = |c: &Caller| {
        let mut key = String::with_capacity(5 + c.sub.len());
        key.push_str("user:");
        key.push_str(&c.sub);
        key
    };
    match by {
        LimitKey::Ip => ip(),
        LimitKey::User => caller.map_or_else(ip, user),
        LimitKey::Consumer => match caller {
            Some(Caller {
                consumer: Some(consumer),
                ..
            }) => format!("consumer:{consumer}"),
            Some(c) => user(c),
            None => ip(),
        },
        LimitKey::Route => route.to_owned(),
    }
}

/// Counts a request under `key` in policy `name`: the rate-limit headers for its
/// answer, or the 429 (with `Retry-After` and the same headers) when it is over.
async fn limited(
    proxy: &Proxy,
    name: &str,
    limiter: &KeyedLimiter,
    key: &str,
) -> Result<RateLimitHeaders, Problem> {
    let decision = proxy.decide(name, limiter, key).await?;
    let headers = rate_limit_headers(name, limiter, &decision);
    if decision.allowed {
        return Ok(headers);
    }
    let mut problem = Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate-limited",
        "Too many requests",
    )
    .with_detail(format!(
        "over the limit of {} requests per {}; retry after the time in Retry-After",
        limiter.policy.rate, limiter.policy.per
    ))
    .with_header(
        header::RETRY_AFTER,
        HeaderValue::from(decision.retry_after.as_secs_f64().ceil().max(1.0) as u64),
    );
    for (name, value) in headers.into_iter().flatten() {
        problem = problem.with_header(name, value);
    }
    Err(problem)
}

/// A matched route, the path to send upstream and what its template captured.
type Found<'a> = (&'a crate::routes::Route, String, Vec<(String, String)>);

/// A route found, or the problem of a path no route serves (404) or serves for
/// other methods (405, with `Allow`).
fn found(matched: Match<'_>) -> Result<Found<'_>, Failure> {
    match matched {
        Match::Found {
            route,
            upstream_path,
            params,
        } => Ok((route, upstream_path, params)),
        Match::MethodNotAllowed(allowed) => {
            let allow = allowed
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            let problem = Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
            )
            .with_detail(format!("this path takes {allow}"));
            let problem = match HeaderValue::from_str(&allow) {
                Ok(v) => problem.with_header(header::ALLOW, v),
                Err(_) => problem,
            };
            Err((None, problem))
        }
        Match::NotFound => Err((
            None,
            Problem::new(StatusCode::NOT_FOUND, "no-route", "Not found")
                .with_detail("no route serves this path"),
        )),
    }
}

/// The request's host, without a port, from `Host` or the absolute URI.
fn host_of(request: &Request) -> Option<&str> {
    let raw = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().host())?;
    // `[::1]:8080` keeps its brackets; `example.com:8080` loses the port. (The
    // colon is found by a plain byte scan: `rsplit_once`'s char searcher cost
    // about 150 instructions a request.)
    let colon = raw.bytes().rposition(|b| b == b':');
    Some(match colon.map(|at| raw.split_at(at)) {
        Some((host, port))
            if !host.is_empty()
                && port[1..].bytes().all(|b| b.is_ascii_digit())
                && !raw.ends_with(']') =>
        {
            host
        }
        _ => raw,
    })
}

async fn forward(
    proxy: &Proxy,
    peer: SocketAddr,
    request: Request,
    log: &mut AccessLog,
    timer: Option<Pin<&mut tokio::time::Sleep>>,
    fields: &mut Option<crate::wire::Fields>,
    started: std::time::Instant,
) -> Result<(Response, RouteLabel), Failure> {
    // One runtime for the whole request, even if a reload lands meanwhile.
    let runtime = proxy.config.current();
    let forwarded = proxy.trusted.forwarded(peer.ip(), request.headers());
    log.client_ip = Some(forwarded.client);
    let path = normalize(request.uri().path(), runtime.config.slashes)
        .map_err(|e| (None, Problem::bad_request(format!("refused path: {e}"))))?;
    // A preflight is routed as the request it announces.
    let preflight = is_preflight(request.method(), request.headers());
    let method = match preflight {
        true => request
            .headers()
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|m| http::Method::from_bytes(m.as_bytes()).ok())
            .unwrap_or_else(|| request.method().clone()),
        false => request.method().clone(),
    };
    let host = host_of(&request);
    let (route, upstream_path, params) = found(runtime.table.matching(host, &method, &path))?;
    // A preflight to a route without CORS is an OPTIONS request like any other,
    // held to the route's methods: routed as the method it announced, it would
    // reach the upstream past them.
    let (preflight, (route, upstream_path, params)) = match preflight && route.cors.is_none() {
        true => (
            false,
            found(runtime.table.matching(host, request.method(), &path))?,
        ),
        false => (preflight, (route, upstream_path, params)),
    };
    let label = RouteLabel(route.label.clone());
    log.path = Some(path.to_string());
    // The route's CORS grants for this origin, on every answer including problems.
    let origin = request.headers().get(header::ORIGIN).cloned();
    let mut grants = HeaderMap::new();
    if let Some(cors) = &route.cors {
        if preflight {
            let (status, headers) = cors.preflight(request.headers());
            let mut response = Response::new(Body::empty());
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            return Ok((response, label));
        }
        cors.decorate(origin.as_ref(), &mut grants);
    }
    let fail = |p: Problem| {
        let p = grants.iter().fold(p, |p, (name, value)| {
            p.with_header(name.clone(), value.clone())
        });
        (Some(label.clone()), p)
    };

    // A policy keyed by what the client is not asked to prove (its address, the
    // route) is applied before authentication: a flood of bad credentials is
    // limited too, and costs no signature check.
    let policy = match &route.rate_limit {
        Some(name) => Some((
            name,
            runtime.limiters.get(name).ok_or_else(|| {
                fail(Problem::internal(format!(
                    "rate-limit policy `{name}` missing"
                )))
            })?,
        )),
        None => None,
    };
    let mut limit = None;
    if let Some((name, limiter)) = policy
        && matches!(limiter.policy.key, LimitKey::Ip | LimitKey::Route)
    {
        let key = limit_key(limiter.policy.key, None, forwarded.client, &route.label);
        limit = Some(limited(proxy, name, limiter, &key).await.map_err(fail)?);
    }

    let caller = proxy
        .auth
        .authenticate(route.auth, request.headers(), &runtime.api_keys)
        .await
        .map_err(fail)?;
    if !route.consumers.is_empty() {
        let allowed = caller
            .as_deref()
            .and_then(|c| c.consumer.as_deref())
            .is_some_and(|name| route.consumers.iter().any(|c| c == name));
        if !allowed {
            return Err(fail(
                Problem::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden")
                    .with_detail("this route is open only to some API-key consumers; present one of their keys in X-Api-Key"),
            ));
        }
    }
    log.user_id = caller.as_ref().map(|c| c.sub.clone());

    if limit.is_none()
        && let Some((name, limiter)) = policy
    {
        let key = limit_key(
            limiter.policy.key,
            caller.as_deref(),
            forwarded.client,
            &route.label,
        );
        limit = Some(limited(proxy, name, limiter, &key).await.map_err(fail)?);
    }

    // Only a cached route keys on the host.
    let host_name = match route.cache {
        Some(_) => host_of(&request).map(str::to_ascii_lowercase),
        None => None,
    };
    let proto = match request.extensions().get::<crate::server::Https>() {
        Some(_) => HeaderValue::from_static("https"),
        None => HeaderValue::from_static("http"),
    };
    let (mut parts, body) = request.into_parts();
    let host = parts.headers.get(header::HOST).cloned();
    let upstream_config = runtime.upstream(&route.service);
    // The identity and `X-Forwarded-*` the proxy sets go out after the request's
    // own fields rather than into its map: four inserts hashed four names, a
    // thousand instructions a request, for fields only written out. The map must
    // hold them where something reads it: the cache (`Vary`), aggregation, hashing
    // on a header and a route's own header rules.
    let direct = route.cache.is_none()
        && route.config.aggregate.is_empty()
        && upstream_config.hash_on.is_none()
        && route.request_headers.is_empty();
    // What untrusted clients claim about earlier hops is not kept.
    let replaced: &[HeaderName] = match (direct, forwarded.trusted_peer) {
        (true, false) => &FORWARDED,
        (true, true) => &FORWARDED[..1],
        (false, _) => &[],
    };
    strip(
        &mut parts.headers,
        &[&CLIENT_IDENTITY, &CREDENTIALS, replaced],
    );
    route.request_headers.apply(&mut parts.headers);
    let mut added: [Option<(HeaderName, HeaderValue)>; 4] = Default::default();
    if let Some(caller) = &caller {
        added[0] = Some((
            IDENTITY_HEADER,
            proxy.identity(caller, started).map_err(fail)?,
        ));
    }
    // The chain's buffer becomes the header's without a copy.
    if let Ok(v) = HeaderValue::try_from(forwarded.chain) {
        added[1] = Some((X_FORWARDED_FOR, v));
    }
    if !forwarded.trusted_peer {
        added[2] = Some((X_FORWARDED_PROTO, proto));
        added[3] = host.map(|h| (X_FORWARDED_HOST, h));
    } else if !parts.headers.contains_key(X_FORWARDED_PROTO) {
        added[2] = Some((X_FORWARDED_PROTO, proto));
    }
    if !direct {
        if !forwarded.trusted_peer && added[3].is_none() {
            parts.headers.remove(X_FORWARDED_HOST);
        }
        for (name, value) in added.iter_mut().filter_map(Option::take) {
            parts.headers.insert(name, value);
        }
    }
    // The upstream gets the normalized (and rewritten) path: the one checked. A
    // path in origin form that neither changed keeps the URI as it was parsed.
    if parts.uri.path() != upstream_path || parts.uri.scheme().is_some() {
        let target = crate::routes::with_query(upstream_path, parts.uri.query());
        parts.uri = target.parse().map_err(|_| {
            fail(Problem::bad_request(
                "the rewritten path is not a valid URI",
            ))
        })?;
    }
    // Upstreams are spoken to in HTTP/1.1, whatever the client spoke.
    parts.version = http::Version::HTTP_11;
    let hash_key = upstream_config
        .hash_on
        .as_ref()
        .and_then(|on| crate::upstream::hash_key(on, &parts.headers, &params));
    // The body is read whole before anything goes upstream (nginx's request
    // buffering): a malformed chunk or a client that stops midway never reaches a
    // service as half a request, and a slow client holds no upstream connection.
    let max_body = usize::try_from(proxy.max_body).unwrap_or(usize::MAX);
    let body = match http_body_util::BodyExt::collect(http_body_util::Limited::new(body, max_body))
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(fail(body_too_large(proxy.max_body)));
        }
        Err(_) => {
            return Err(fail(Problem::bad_request(
                "the request body is malformed (bad chunk encoding) or was cut short",
            )));
        }
    };
    let bodiless = body.is_empty();
    let timeout = route.timeout.unwrap_or(proxy.upstream_timeout);
    if !route.config.aggregate.is_empty() {
        let services: Vec<&str> = route
            .config
            .aggregate
            .iter()
            .map(|p| p.service.as_str())
            .collect();
        log.upstream = Some(services.join("+").into());
        let sent = std::time::Instant::now();
        // The rarer paths are boxed so the common one's future stays small.
        let merged = Box::pin(crate::aggregate::fan_out(
            proxy, &runtime, route, &parts, &params, timeout,
        ))
        .await;
        log.upstream_time = Some(sent.elapsed());
        let response = merged.map_err(fail)?;
        return Ok(finish(response, route, &grants, limit, label, &mut None));
    }
    log.upstream = Some(route.service.clone());
    // The answer's fields pass as lines where nothing reads or changes them on the
    // way (no cache, CORS or header rules of the route's) and the client's server
    // writes them itself; the fields the proxy sets on answers are left out of them.
    let as_fields = (timer.is_some()
        && route.cache.is_none()
        && route.cors.is_none()
        && route.response_headers.is_empty())
    .then_some(match limit.is_some() {
        true => &SET_ON_ANSWERS[..],
        false => &SET_ON_ANSWERS[..1],
    });
    let call = Call {
        service: &route.service,
        config: upstream_config,
        timeout,
        hash_key: hash_key.as_deref(),
        retries: route.retries,
        added: &added,
        as_fields,
    };
    let upstream_time = &mut log.upstream_time;
    let send = async |parts: http::request::Parts| {
        let mut report = crate::upstream::Report::default();
        let response = proxy
            .upstreams
            .send(call, &parts, body, timer, &mut report)
            .await;
        crate::message::recycle(parts.headers);
        *upstream_time = report.took;
        *fields = report.fields;
        response
    };
    let cache = route
        .cache
        .as_ref()
        .filter(|(_, p)| caller.is_none() || p.authenticated != AuthenticatedCaching::Never);
    let response = match cache {
        Some((name, policy)) => {
            let user = match policy.authenticated {
                AuthenticatedCaching::PerUser => caller.as_ref().map(|c| &*c.sub),
                _ => None,
            };
            let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let key = Cache::key(name, &route.service, host_name.as_deref(), target, user);
            let method = parts.method.clone();
            if (method == http::Method::GET || method == http::Method::HEAD) && bodiless {
                let request = CacheRequest {
                    key,
                    policy,
                    route: &route.label,
                    head: method == http::Method::HEAD,
                    deadline: timeout,
                };
                Box::pin(proxy.cache.serve(request, parts, send)).await
            } else {
                proxy.cache.bypassed(&route.label);
                let response = send(parts).await;
                // A change through the URI makes what is stored for it stale
                // (RFC 9111 §4.4).
                if let Ok(r) = &response
                    && !method.is_safe()
                    && (r.status().is_success() || r.status().is_redirection())
                {
                    Box::pin(proxy.cache.invalidate(&key, policy)).await;
                }
                response
            }
        }
        None => {
            if route.cache.is_some() {
                proxy.cache.bypassed(&route.label);
            }
            send(parts).await
        }
    };
    let response = response.map_err(|e| fail(upstream_problem(&route.service, e)))?;
    Ok(finish(response, route, &grants, limit, label, fields))
}

/// The upstream's answer as the client gets it: hop-by-hop headers out, the route's
/// transform, CORS grants and rate-limit headers in. Where the answer's fields came
/// as lines (`fields`), the rate-limit headers join them.
fn finish(
    response: Response,
    route: &crate::routes::Route,
    grants: &HeaderMap,
    limit: Option<RateLimitHeaders>,
    label: RouteLabel,
    fields: &mut Option<crate::wire::Fields>,
) -> (Response, RouteLabel) {
    if let Some(lines) = fields {
        // (Lines come only from routes without CORS or header rules, and hold no
        // hop-by-hop field.)
        for (name, value) in limit.into_iter().flatten().flatten() {
            lines.push(&name, &value);
        }
        return (response, label);
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    route.response_headers.apply(&mut parts.headers);
    for (name, value) in grants {
        // `Vary: origin` joins what the answer varies by (an upstream's
        // `Vary: accept-encoding` must reach caches too).
        match *name == header::VARY {
            true => parts.headers.append(name.clone(), value.clone()),
            false => parts.headers.insert(name.clone(), value.clone()).is_some(),
        };
    }
    for (name, value) in limit.into_iter().flatten().flatten() {
        parts.headers.insert(name, value);
    }
    (Response::from_parts(parts, body), label)
}

/// The 413 for a body over `limit` bytes.
pub fn body_too_large(limit: u64) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body-too-large",
        "Body too large",
    )
    .with_detail(format!("bodies of at most {limit} bytes are taken"))
}

const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// What the gateway sets on the answers it passes on, in place of any the upstream
/// sent: the correlation id always, the rate-limit state on limited routes.
static SET_ON_ANSWERS: [HeaderName; 3] = [
    telemetry::context::CORRELATION_ID,
    RATELIMIT_POLICY,
    RATELIMIT,
];

/// `RateLimit-Policy` and `RateLimit`, each when it could be written (an array, not
/// a `Vec`: one allocation less on every rate-limited request).
type RateLimitHeaders = [Option<(HeaderName, HeaderValue)>; 2];

/// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
fn rate_limit_headers(name: &str, limiter: &KeyedLimiter, d: &Decision) -> RateLimitHeaders {
    // Written by hand (`format!` was a visible share of a rate-limited request), at
    // its exact size: a value with room to spare is two allocations (`Bytes` keeps
    // the spare room in a block of its own).
    let (mut remaining, mut reset) = (itoa::Buffer::new(), itoa::Buffer::new());
    let remaining = remaining.format(d.remaining);
    let reset = reset.format(d.reset.as_secs_f64().ceil() as u64);
    let mut state = Vec::with_capacity(name.len() + remaining.len() + reset.len() + 8);
    state.push(b'"');
    state.extend_from_slice(name.as_bytes());
    state.extend_from_slice(b"\";r=");
    state.extend_from_slice(remaining.as_bytes());
    state.extend_from_slice(b";t=");
    state.extend_from_slice(reset.as_bytes());
    [
        limiter
            .header_policy(name)
            .map(|policy| (RATELIMIT_POLICY, policy)),
        HeaderValue::from_maybe_shared(bytes::Bytes::from(state))
            .ok()
            .map(|state| (RATELIMIT, state)),
    ]
}

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip(headers, &[]);
}

/// Removes the hop-by-hop headers, those `Connection` names (never the gateway's
/// own), and every name in the lists of `also`. Each removal follows a pass over
/// the names present: a request carries a handful of headers, and removing each of
/// the candidates by name would hash every one of them, present or not; collecting
/// the names found first would allocate on every request.
fn strip(headers: &mut HeaderMap, also: &[&[HeaderName]]) {
    // `Upgrade` is hop-by-hop; WebSocket pass-through is not offered yet.
    let doomed = |name: &HeaderName| {
        HOP_BY_HOP.contains(name)
            || *name == header::UPGRADE
            || also.iter().any(|list| list.contains(name))
    };
    let mut named = Vec::new();
    while let Some(name) = headers.keys().find(|n| doomed(n)).cloned() {
        if name == header::CONNECTION {
            named.extend(
                headers
                    .get_all(header::CONNECTION)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
                    .filter(|n| !PROTECTED.contains(n) && !CLIENT_IDENTITY.contains(n)),
            );
        }
        headers.remove(name);
    }
    for name in named {
        headers.remove(name);
    }
}

/// A client's credentials, never taken upstream (services get the gateway-signed
/// identity instead), and its `Host` (set anew for the upstream).
const CREDENTIALS: [HeaderName; 3] = [header::AUTHORIZATION, API_KEY, header::HOST];

pub(crate) fn upstream_problem(service: &str, error: UpstreamError) -> Problem {
    tracing::warn!(upstream = service, error = %error, "upstream failed");
    match error {
        UpstreamError::Timeout { after, .. } => Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream-timeout",
            "Upstream timed out",
        )
        .with_detail(format!("`{service}` did not answer within {after:?}")),
        _ => Problem::new(
            StatusCode::BAD_GATEWAY,
            "upstream-unavailable",
            "Upstream unavailable",
        )
        .with_detail(format!("`{service}` cannot be reached; try again shortly")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_loses_its_port_and_nothing_else() {
        let host = |value: &str| {
            let request = Request::builder()
                .header(header::HOST, value)
                .body(Body::empty())
                .unwrap();
            host_of(&request).map(str::to_owned)
        };
        assert_eq!(host("shop.test:8080").as_deref(), Some("shop.test"));
        assert_eq!(host("shop.test").as_deref(), Some("shop.test"));
        assert_eq!(host("[::1]:8080").as_deref(), Some("[::1]"));
        assert_eq!(host("[::1]").as_deref(), Some("[::1]"));
        assert_eq!(host("shop.test:http").as_deref(), Some("shop.test:http"));
        assert_eq!(host(":8080").as_deref(), Some(":8080"));
        let absolute = Request::builder()
            .uri("http://shop.test:9/x")
            .body(Body::empty())
            .unwrap();
        assert_eq!(host_of(&absolute), Some("shop.test"));
    }

    /// Every hop-by-hop field, every field `Connection` names (but the gateway's
    /// own) and every listed one goes, however many a request carries; the rest
    /// stays.
    #[test]
    fn stripping_takes_every_doomed_field_and_nothing_else() {
        let mut headers = HeaderMap::new();
        let mut put = |name: &str, value: &str| {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        };
        put(
            "connection",
            "x-named-1, X-Named-2, x-forwarded-for, x-user-id",
        );
        put("connection", "keep-alive");
        for name in ["keep-alive", "proxy-connection", "te", "trailer", "upgrade"] {
            put(name, "1");
        }
        for name in [
            "x-named-1",
            "x-named-2",
            "authorization",
            "x-api-key",
            "host",
        ] {
            put(name, "1");
        }
        for name in [
            "x-user-id",
            "x-user-email",
            "x-forwarded-for",
            "accept",
            "x-kept",
        ] {
            put(name, "1");
        }
        strip(&mut headers, &[&CLIENT_IDENTITY, &CREDENTIALS]);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "x-forwarded-for", "x-kept"]);
    }
}
