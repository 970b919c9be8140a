//! The HTTP server every service runs: the standard endpoints (`/healthz`,
//! `/readyz`, `/metrics`, `/openapi.json`) and the standard middleware, outermost
//! first: request context + span + metrics + access log, problem rendering, panic
//! catching, request timeout, body limit.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::future::join_all;
use http::{HeaderValue, StatusCode};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::{Value, json};
use telemetry::key;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tracing::Instrument;

use messaging::consumer::{AfterCommit, HandlerError, Meta, Prepared, ReadSide, Transactional};
use messaging::{BoxFuture, CloudEvent};

use crate::Chassis;
use crate::db::Database;
use crate::identity::IdentityVerifier;
use crate::problem::{self, Problem};
use telemetry::context::{CORRELATION_ID, RequestContext};
use telemetry::metrics::Metrics;

/// The route label a handler (or the gateway) can set on its response when the
/// router has no template for the request, e.g. the gateway's matched route.
#[derive(Clone, Debug)]
pub struct RouteLabel(pub Arc<str>);

/// Label used when nothing matched: one series for all unmatched paths.
/// The route label of requests no route matched.
pub const UNMATCHED_ROUTE: &str = "<unmatched>";
/// How long one readiness check may take before it counts as failed.
const READINESS_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What `/readyz` checks.
#[derive(Clone, Default)]
pub struct Readiness {
    pub database: Option<Database>,
    /// Services this one calls, which discovery must resolve.
    pub dependencies: Vec<String>,
}

#[derive(Clone)]
struct StdState {
    name: &'static str,
    version: &'static str,
    metrics: Metrics,
    readiness: Readiness,
    resolver: Arc<dyn discovery::Resolver>,
    downstreams: Arc<crate::downstreams::Downstreams>,
    openapi: Arc<Value>,
    discovery: DiscoveryMetrics,
    faults: crate::faults::Faults,
    allow_crash: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct UpstreamLabel {
    upstream: String,
}

/// What discovery currently serves for each known service, read at scrape time.
#[derive(Clone)]
pub(crate) struct DiscoveryMetrics {
    instances: Family<UpstreamLabel, Gauge>,
    stale: Family<UpstreamLabel, Gauge>,
}

impl DiscoveryMetrics {
    pub(crate) fn new(metrics: &Metrics) -> Self {
        let this = Self {
            instances: Family::default(),
            stale: Family::default(),
        };
        metrics.register(
            "bazaar_discovery_instances",
            "Instances discovery serves for a service",
            this.instances.clone(),
        );
        metrics.register(
            "bazaar_discovery_stale",
            "1 while discovery serves a last known set because its backend is unreachable",
            this.stale.clone(),
        );
        this
    }

    fn refresh(&self, resolver: &dyn discovery::Resolver, names: &[String]) {
        let mut all = resolver.services();
        all.extend(names.iter().cloned());
        all.sort();
        all.dedup();
        for name in all {
            let count = resolver.resolve(&name).map(|i| i.len()).unwrap_or(0);
            let label = UpstreamLabel { upstream: name };
            self.instances
                .get_or_create(&label)
                .set(i64::try_from(count).unwrap_or(i64::MAX));
            self.stale
                .get_or_create(&label)
                .set(i64::from(resolver.stale(&label.upstream)));
        }
    }
}

#[derive(Clone)]
struct ObserveState {
    service: &'static str,
    metrics: Metrics,
    request_timeout: Duration,
    log: Arc<AccessLogPolicy>,
}

/// Which requests get an access log line.
pub struct AccessLogPolicy {
    enabled: bool,
    /// Log one in `every` requests below `always_from`.
    every: u64,
    always_from: u16,
    seen: std::sync::atomic::AtomicU64,
}

impl AccessLogPolicy {
    pub fn new(http: &crate::settings::HttpSettings) -> Self {
        let sample = http.access_log_sample.clamp(0.0, 1.0);
        Self {
            enabled: http.access_log && sample > 0.0,
            every: if sample > 0.0 {
                (1.0 / sample).round().max(1.0) as u64
            } else {
                u64::MAX
            },
            always_from: http.access_log_always_from,
            seen: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn logs(&self, status: u16) -> bool {
        if status >= self.always_from {
            return true;
        }
        self.enabled
            && (self.every == 1
                || self
                    .seen
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    .is_multiple_of(self.every))
    }
}

/// What a proxy knows of a request beyond what the chassis sees, added to its
/// access log line: given to [`log_access`].
#[derive(Clone, Debug, Default)]
pub struct AccessLog {
    /// The client, as trusted proxies reveal it (else the peer address).
    pub client_ip: Option<std::net::IpAddr>,
    pub user_id: Option<Arc<str>>,
    /// The path as routed (normalized).
    pub path: Option<String>,
    pub upstream: Option<Arc<str>>,
    /// How long the upstream took to answer: `upstream_ms` in the line.
    pub upstream_time: Option<Duration>,
}

impl Chassis {
    /// Wraps a service's routes with the standard endpoints and middleware.
    /// `openapi` is the service's contract, served at `/openapi.json`.
    pub fn router(
        &self,
        routes: Router,
        readiness: Readiness,
        openapi: Option<utoipa::openapi::OpenApi>,
    ) -> Router {
        let mut std_routes = Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .route("/admin/breakers", get(list_breakers))
            .route("/admin/breakers/{name}/{action}", post(change_breaker))
            .route(
                "/admin/faults",
                get(show_fault).post(set_fault).delete(clear_fault),
            )
            .route("/admin/crash", post(crash));
        // `None`: the service serves its own `/openapi.json` (the gateway merges its
        // upstreams' documents).
        if openapi.is_some() {
            std_routes = std_routes.route("/openapi.json", get(openapi_doc));
        }
        let openapi = openapi
            .and_then(|doc| serde_json::to_value(&doc).ok())
            .unwrap_or(Value::Null);
        let std_routes = std_routes.with_state(StdState {
            name: self.name,
            version: self.version,
            metrics: self.metrics.clone(),
            readiness,
            resolver: self.client.resolver().clone(),
            downstreams: self.client.downstreams().clone(),
            openapi: Arc::new(openapi),
            discovery: self.discovery_metrics.clone(),
            faults: self.faults.clone(),
            allow_crash: self.http.allow_crash,
        });
        let limit = usize::try_from(self.http.body_limit.0).unwrap_or(usize::MAX);
        let timeout = self.http.request_timeout.0;
        routes
            .merge(std_routes)
            .layer(axum::Extension(IdentityVerifier::new(
                self.identity.clone(),
            )))
            .layer(RequestBodyLimitLayer::new(limit))
            .layer(DefaultBodyLimit::max(limit))
            .layer(middleware::from_fn_with_state(
                self.faults.clone(),
                crate::faults::middleware,
            ))
            .layer(middleware::from_fn_with_state(timeout, request_timeout))
            .layer(CatchPanicLayer::custom(|_| {
                Problem::internal("a handler panicked").into_response()
            }))
            .layer(middleware::from_fn(problem::render))
            .layer(middleware::from_fn_with_state(
                ObserveState {
                    service: self.name,
                    metrics: self.metrics.clone(),
                    request_timeout: timeout,
                    log: Arc::new(AccessLogPolicy::new(&self.http)),
                },
                observe,
            ))
    }

    /// Serves `router` until `shutdown` is cancelled, then drains in-flight requests
    /// for at most the configured grace period.
    pub async fn serve(self, router: Router, shutdown: CancellationToken) -> std::io::Result<()> {
        self.serve_with(router, shutdown, None).await
    }

    /// [`serve`](Self::serve), with `server` accepting the connections instead of
    /// axum's loop (the gateway's own server); registration, draining and the grace
    /// period stay the chassis's.
    pub async fn serve_with(
        self,
        router: Router,
        shutdown: CancellationToken,
        server: Option<ServerFn>,
    ) -> std::io::Result<()> {
        let grace = self.http.shutdown_grace.0;
        let addr = self.local_addr;
        let service = self.name;
        tracing::info!(%addr, "listening");
        let registration = self.registrar.clone().map(|registrar| {
            let registration = registration_of(service, addr);
            let id = registration.id.clone();
            let task = tokio::spawn(keep_registered(registrar.clone(), registration));
            (registrar, id, task)
        });
        let server: futures::future::BoxFuture<'static, std::io::Result<()>> = match server {
            Some(custom) => custom(self.listener, router, shutdown.clone()),
            None => Box::pin(
                axum::serve(
                    self.listener,
                    router.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(shutdown.clone().cancelled_owned())
                .into_future(),
            ),
        };
        let drained = tokio::select! {
            result = server => result.map(|()| true),
            () = async {
                shutdown.cancelled().await;
                tokio::time::sleep(grace).await;
            } => Ok(false),
        }?;
        if let Some((registrar, id, task)) = registration {
            task.abort();
            if let Err(e) = registrar.deregister(&id).await {
                tracing::warn!(error = %e, "could not deregister");
            }
        }
        if drained {
            tracing::info!(service, "stopped; all requests drained");
        } else {
            tracing::warn!(service, grace = ?grace, "grace period over; dropped remaining connections");
        }
        Ok(())
    }
}

/// Interval of the registry's health check on each instance.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// An instance critical this long is dropped from the registry: a crashed process
/// that never deregistered leaves no ghost behind.
const DEREGISTER_AFTER: Duration = Duration::from_secs(30);

fn registration_of(service: &str, addr: SocketAddr) -> discovery::Registration {
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        addr.ip().to_string()
    };
    let mut registration = discovery::Registration::http(service, &host, addr.port());
    registration.check_interval = CHECK_INTERVAL;
    registration.deregister_after = DEREGISTER_AFTER;
    registration
        .meta
        .insert("version".into(), env!("CARGO_PKG_VERSION").into());
    registration
}

/// Registers now, then refreshes as often as the backend needs (a restarted
/// registry is refilled, a lease kept alive).
async fn keep_registered(
    registrar: Arc<dyn discovery::Registrar>,
    registration: discovery::Registration,
) {
    let mut registered = false;
    let mut failures = 0u32;
    loop {
        match registrar.register(&registration).await {
            Ok(()) if !registered => {
                tracing::info!(id = %registration.id, "registered with discovery");
                registered = true;
                failures = 0;
            }
            Ok(()) => {}
            Err(e) => {
                // Once when it starts failing, then every half minute: an outage
                // should not flood the log.
                if failures.is_multiple_of(30) {
                    tracing::warn!(error = %e, failures, "registration failed; retrying every second");
                }
                failures += 1;
                registered = false;
            }
        }
        let pause = if registered {
            registrar.refresh_every()
        } else {
            Duration::from_secs(1)
        };
        tokio::time::sleep(pause).await;
    }
}

/// Request context, span, metrics, correlation id echo and the access log line.
async fn observe(State(state): State<ObserveState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    // The caller's deadline, tightened to this service's own request timeout; work
    // past it is dropped, and calls made meanwhile carry what is left.
    let ctx =
        RequestContext::from_headers(request.headers()).with_deadline_within(state.request_timeout);
    let method = request.method().clone();
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let span = tracing::info_span!(
        "request",
        service = state.service,
        correlation_id = %ctx.correlation_id,
        trace_id = %ctx.trace.trace_id_hex(),
        method = %method,
        path = %request.uri().path(),
    );
    let correlation = HeaderValue::from_str(&ctx.correlation_id).ok();
    let mut response = telemetry::context::scope(ctx, next.run(request))
        .instrument(span.clone())
        .await;
    let route = route
        .or_else(|| {
            response
                .extensions()
                .get::<RouteLabel>()
                .map(|r| r.0.to_string())
        })
        .unwrap_or_else(|| UNMATCHED_ROUTE.to_owned());
    let status = response.status();
    let elapsed = started.elapsed();
    state
        .metrics
        .observe_http(method.as_str(), &route, status.as_u16(), elapsed);
    if let Some(v) = correlation {
        response.headers_mut().insert(CORRELATION_ID, v);
    }
    if state.log.logs(status.as_u16()) {
        span.in_scope(|| log_access(&response, None, &route, elapsed, peer, None));
    }
    response
}

/// A request's own ids, for an access line logged outside the request's span.
pub struct RequestIds<'a> {
    pub correlation_id: &'a str,
    pub trace_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
}

/// The access line (`request completed`) for `response`, with what a proxy adds in
/// `extra`; `ids` when the caller is not inside the request's span.
pub fn log_access(
    response: &Response,
    extra: Option<&AccessLog>,
    route: &str,
    elapsed: Duration,
    peer: Option<std::net::IpAddr>,
    ids: Option<RequestIds<'_>>,
) {
    // The length the answer declares, else its body's, where that is known: a
    // proxy may write an answer's fields without putting them in its map.
    let bytes = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .or_else(|| axum::body::HttpBody::size_hint(response.body()).exact());
    let client_ip = extra.and_then(|e| e.client_ip).or(peer);
    // Outside a span (the gateway's proxied requests) the line is written without
    // `tracing`'s dispatch: the same fields, in the same order.
    if tracing::enabled!(tracing::Level::INFO)
        && telemetry::logging::info_line(module_path!(), "request completed", |line| {
            // An IPv4 address on the stack: the line is written for every request.
            let mut v4 = [0; 15];
            let v6;
            let ip = match client_ip {
                Some(IpAddr::V4(a)) => Some(v4_text(a, &mut v4)),
                Some(other) => {
                    v6 = ip_text(other);
                    Some(v6.as_str())
                }
                None => None,
            };
            line.str(
                key!("correlation_id"),
                ids.as_ref().map(|i| i.correlation_id),
            )
            .str(key!("trace_id"), ids.as_ref().map(|i| i.trace_id))
            .str(key!("method"), ids.as_ref().map(|i| i.method))
            .str(key!("path"), ids.as_ref().map(|i| i.path))
            .u64(key!("status"), Some(u64::from(response.status().as_u16())))
            .str(key!("route"), Some(route))
            .millis(key!("duration_ms"), Some(elapsed))
            .u64(key!("bytes"), bytes)
            .str(key!("client_ip"), ip)
            .str(key!("user_id"), extra.and_then(|e| e.user_id.as_deref()))
            .str(key!("routed_path"), extra.and_then(|e| e.path.as_deref()))
            .str(key!("upstream"), extra.and_then(|e| e.upstream.as_deref()))
            .millis(key!("upstream_ms"), extra.and_then(|e| e.upstream_time));
        })
    {
        return;
    }
    tracing::info!(
        correlation_id = ids.as_ref().map(|i| i.correlation_id),
        trace_id = ids.as_ref().map(|i| i.trace_id),
        method = ids.as_ref().map(|i| i.method),
        path = ids.as_ref().map(|i| i.path),
        status = response.status().as_u16(),
        route,
        duration_ms = telemetry::logging::ms(elapsed),
        bytes,
        client_ip = client_ip.map(ip_text),
        user_id = extra.and_then(|e| e.user_id.as_deref()),
        routed_path = extra.and_then(|e| e.path.as_deref()),
        upstream = extra.and_then(|e| e.upstream.as_deref()),
        upstream_ms = extra
            .and_then(|e| e.upstream_time)
            .map(telemetry::logging::ms),
        "request completed"
    );
}

/// `ip` as text; IPv4 written by hand, since `Display` goes through the formatting
/// machinery, a measurable share of a proxied request (the access line and
/// `X-Forwarded-For` name the client of every request).
pub fn ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4_text(v4, &mut [0; 15]).to_owned(),
        IpAddr::V6(_) => ip.to_string(),
    }
}

/// An IPv4 address as text, written into `buf`.
fn v4_text(ip: std::net::Ipv4Addr, buf: &mut [u8; 15]) -> &str {
    let mut n = 0;
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        if octet >= 100 {
            buf[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            buf[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        buf[n] = b'0' + octet % 10;
        n += 1;
    }
    std::str::from_utf8(&buf[..n]).unwrap_or_default()
}

/// Drops the handler when the request's deadline passes (the caller's, or this
/// service's own `request_timeout`, whichever comes first).
async fn request_timeout(
    State(timeout): State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    let deadline = telemetry::context::current()
        .and_then(|c| c.deadline)
        .unwrap_or_else(|| tokio::time::Instant::now() + timeout);
    match tokio::time::timeout_at(deadline, next.run(request)).await {
        Ok(response) => response,
        Err(_) => Problem::timed_out().into_response(),
    }
}

async fn healthz(State(s): State<StdState>) -> Response {
    axum::Json(json!({ "status": "ok", "service": s.name, "version": s.version })).into_response()
}

async fn readyz(State(s): State<StdState>) -> Response {
    let mut checks = serde_json::Map::new();
    let mut ready = true;
    if let Some(db) = &s.readiness.database {
        let result = tokio::time::timeout(READINESS_CHECK_TIMEOUT, db.check())
            .await
            .unwrap_or_else(|_| Err("database check timed out".into()));
        ready &= result.is_ok();
        checks.insert("database".into(), check_value(result));
    }
    let deps = join_all(s.readiness.dependencies.iter().map(|d| {
        let resolver = s.resolver.clone();
        async move {
            let result = resolver.resolve(d).map(|_| ()).map_err(|e| e.to_string());
            (d.clone(), result)
        }
    }))
    .await;
    for (dep, result) in deps {
        ready &= result.is_ok();
        checks.insert(format!("dependency:{dep}"), check_value(result));
    }
    if ready {
        axum::Json(json!({ "status": "ready", "service": s.name, "checks": checks }))
            .into_response()
    } else {
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "not-ready", "Not ready")
            .with_detail("a readiness check failed; see `checks`")
            .with_extension("checks", Value::Object(checks))
            .into_response()
    }
}

fn check_value(result: Result<(), String>) -> Value {
    match result {
        Ok(()) => json!("ok"),
        Err(e) => json!(e),
    }
}

async fn metrics(State(s): State<StdState>) -> Response {
    s.discovery
        .refresh(s.resolver.as_ref(), &s.readiness.dependencies);
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

/// Admin endpoints answer only callers on this machine: they change how the service
/// treats its dependencies, or show every user's data, and services may listen on a
/// shared network.
fn admin_allowed(request: &Request) -> Result<(), Problem> {
    local_only(request.extensions())
}

fn local_only(extensions: &http::Extensions) -> Result<(), Problem> {
    let local = extensions
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .is_some_and(|c| c.0.ip().is_loopback());
    if local {
        Ok(())
    } else {
        Err(
            Problem::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden")
                .with_detail("admin endpoints answer only on loopback"),
        )
    }
}

/// `GET /admin/faults`: the fault in force, or null.
async fn show_fault(_local: LocalOnly, State(state): State<StdState>) -> Response {
    axum::Json(json!({ "fault": state.faults.current() })).into_response()
}

/// `POST /admin/faults` `{latency, error_rate, duration}`: injects a fault (chaos).
async fn set_fault(
    _local: LocalOnly,
    State(state): State<StdState>,
    crate::extract::Json(fault): crate::extract::Json<crate::faults::Fault>,
) -> Result<Response, Problem> {
    crate::faults::validate(&fault).map_err(Problem::bad_request)?;
    tracing::warn!(?fault, "fault injected");
    state.faults.set(fault.clone());
    Ok(axum::Json(json!({ "fault": fault })).into_response())
}

/// `POST /admin/crash`: answers 202, then the process dies by SIGKILL (no graceful
/// shutdown, nothing flushed: a crash) for its supervisor to restart. What `bazaar
/// chaos` does to a process it cannot signal, e.g. through the gateway.
async fn crash(_local: LocalOnly, State(state): State<StdState>) -> Result<Response, Problem> {
    if !state.allow_crash {
        return Err(Problem::conflict(
            "this process has no supervisor to restart it; set http.allow_crash to let it crash",
        ));
    }
    tracing::warn!("crashing on request (POST /admin/crash)");
    // A moment for the answer to reach the caller; a plain thread, so a stuck
    // runtime cannot hold the crash back.
    std::thread::spawn(|| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        std::process::abort();
    });
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({ "crashing": true })),
    )
        .into_response())
}

/// `DELETE /admin/faults`: ends the fault now.
async fn clear_fault(_local: LocalOnly, State(state): State<StdState>) -> StatusCode {
    state.faults.clear();
    StatusCode::NO_CONTENT
}

/// An extractor for a service's own admin routes: the request came from this
/// machine (403 problem otherwise).
pub struct LocalOnly;

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for LocalOnly {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, Problem> {
        local_only(&parts.extensions).map(|()| LocalOnly)
    }
}

/// `GET /admin/breakers`: every downstream breaker's state and window.
async fn list_breakers(State(s): State<StdState>, request: Request) -> Response {
    if let Err(p) = admin_allowed(&request) {
        return p.into_response();
    }
    axum::Json(json!({ "breakers": s.downstreams.snapshots() })).into_response()
}

/// `POST /admin/breakers/{name}/{action}`: `force-open`, `force-closed` (back to a
/// fresh CLOSED) or `disable`.
async fn change_breaker(
    State(s): State<StdState>,
    axum::extract::Path((name, action)): axum::extract::Path<(String, String)>,
    request: Request,
) -> Response {
    if let Err(p) = admin_allowed(&request) {
        return p.into_response();
    }
    if s.resolver.resolve(&name).is_err() {
        return Problem::not_found(&format!("downstream service `{name}`")).into_response();
    }
    let Some(breaker) = s.downstreams.get(&name).breaker.clone() else {
        return Problem::internal("breaker unavailable").into_response();
    };
    match action.as_str() {
        "force-open" => breaker.force_open(),
        "force-closed" => breaker.force_closed(),
        "disable" => breaker.disable(),
        other => {
            return Problem::bad_request(format!(
                "unknown action `{other}`; use force-open, force-closed or disable"
            ))
            .into_response();
        }
    }
    axum::Json(breaker.snapshot()).into_response()
}

async fn openapi_doc(State(s): State<StdState>) -> Response {
    axum::Json((*s.openapi).clone()).into_response()
}

/// A built service ready to run: its bound chassis, its full router and its database.
/// A server loop replacing axum's: gets the bound listener, the service's full
/// router and the shutdown token; returns once its connections are drained.
pub type ServerFn = Box<
    dyn FnOnce(
            tokio::net::TcpListener,
            Router,
            CancellationToken,
        ) -> futures::future::BoxFuture<'static, std::io::Result<()>>
        + Send,
>;

/// Work a service runs beside its HTTP server (an outbox relay, a consumer).
pub type BackgroundTask =
    Box<dyn FnOnce(CancellationToken) -> futures::future::BoxFuture<'static, ()> + Send>;

/// How long background tasks get to stop after the server drained.
const BACKGROUND_GRACE: Duration = Duration::from_secs(5);

pub struct Service {
    chassis: Chassis,
    router: Router,
    database: Option<Database>,
    background: Vec<BackgroundTask>,
    server: Option<ServerFn>,
}

impl Service {
    pub fn new(chassis: Chassis, router: Router, database: Option<Database>) -> Self {
        Self {
            chassis,
            router,
            database,
            background: Vec::new(),
            server: None,
        }
    }

    /// Accepts connections with `server` instead of axum's loop.
    pub fn with_server(mut self, server: ServerFn) -> Self {
        self.server = Some(server);
        self
    }

    /// Publishes what this service writes into `outbox` (in `pool`'s database)
    /// beside the server, exporting the relay lag; without a broker the events wait
    /// in the outbox.
    pub fn with_outbox_relay(self, pool: sqlx::AnyPool, outbox: messaging::outbox::Outbox) -> Self {
        match self.chassis.events.clone() {
            Some(bus) => {
                let relay = messaging::outbox::Relay::new(pool, bus, outbox, self.chassis.name)
                    .with_metrics(&self.chassis.metrics);
                self.with_background(move |stop| relay.run(stop))
            }
            None => {
                tracing::warn!("no events broker configured: events wait in the outbox");
                self
            }
        }
    }

    /// Consumes `topic` as consumer group `group` through `handler`, whose writes go
    /// to `pool` with the events claimed in the group's inbox: the deliveries waiting
    /// in a partition are handled in one transaction
    /// ([`messaging::consumer::run_transactional`]). Without a broker, says so and
    /// consumes nothing.
    pub fn with_transactional_consumer<H: Transactional>(
        self,
        topic: &str,
        group: &str,
        pool: sqlx::AnyPool,
        handler: H,
    ) -> Self {
        match self.chassis.events.clone() {
            Some(bus) => {
                // A service's consumers keep its state and its sagas' steps: an event
                // that fails for a passing reason is retried until handled.
                let config = messaging::consumer::ConsumerConfig::new(topic, group).until_handled();
                let store = messaging::consumer::Store {
                    pool,
                    inbox: messaging::inbox::Inbox::new(group),
                };
                let handler = Arc::new(Faulty {
                    faults: self.chassis.faults.clone(),
                    inner: handler,
                });
                self.with_background(move |stop| {
                    messaging::consumer::run_transactional(bus, config, store, stop, handler)
                })
            }
            None => {
                tracing::warn!(
                    topic,
                    group,
                    "no events broker configured: nothing is consumed"
                );
                self
            }
        }
    }

    /// A read side fed by one topic: `routes` over the service's database with the
    /// standard readiness, and `handler` run for the events of `topic` it handles
    /// (consumer group: the service's name) in a transaction of that database, where
    /// each is claimed in the group's inbox (installed here).
    pub async fn fed_by(
        chassis: Chassis,
        db: Database,
        routes: Router<sqlx::AnyPool>,
        openapi: utoipa::openapi::OpenApi,
        topic: &str,
        handler: ReadSide,
    ) -> Result<Self, sqlx::Error> {
        messaging::inbox::Inbox::install(db.pool()).await?;
        let pool = db.pool().clone();
        let readiness = Readiness {
            database: Some(db.clone()),
            dependencies: Vec::new(),
        };
        let router = chassis.router(routes.with_state(pool.clone()), readiness, Some(openapi));
        let group = chassis.name;
        Ok(Self::new(chassis, router, Some(db))
            .with_transactional_consumer(topic, group, pool, handler))
    }

    /// Runs `task` beside the server; it gets a token cancelled on shutdown and is
    /// awaited (for a few seconds at most) before the database closes.
    pub fn with_background<F, Fut>(mut self, task: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.background
            .push(Box::new(move |token| Box::pin(task(token))));
        self
    }

    /// The bound port (the real one when configured with 0).
    pub fn port(&self) -> u16 {
        self.chassis.local_addr().port()
    }

    /// Serves until `shutdown`, drains, then closes the database cleanly.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let tasks: Vec<_> = self
            .background
            .into_iter()
            .map(|task| tokio::spawn(task(shutdown.child_token())))
            .collect();
        let served = self
            .chassis
            .serve_with(self.router, shutdown, self.server)
            .await;
        let _ = tokio::time::timeout(BACKGROUND_GRACE, join_all(tasks)).await;
        if let Some(db) = self.database {
            db.close().await;
        }
        served
    }
}

/// A transactional handler that `bazaar chaos` can slow down or fail (before its
/// transaction, so a struck delivery has changed nothing).
struct Faulty<H> {
    faults: crate::faults::Faults,
    inner: H,
}

impl<H: Transactional> Transactional for Faulty<H> {
    fn accepts(&self, event: &CloudEvent, meta: &Meta) -> Result<bool, HandlerError> {
        self.inner.accepts(event, meta)
    }

    fn prepare<'a>(
        &'a self,
        event: &'a CloudEvent,
        meta: &'a Meta,
    ) -> BoxFuture<'a, Result<Prepared, HandlerError>> {
        Box::pin(async move {
            if !self.faults.strike().await {
                return Err(HandlerError::Retry(
                    "a fault was injected into this service (bazaar chaos)".into(),
                ));
            }
            self.inner.prepare(event, meta).await
        })
    }

    fn handle<'a>(
        &'a self,
        tx: &'a mut sqlx::AnyConnection,
        event: &'a CloudEvent,
        meta: &'a Meta,
        prepared: Prepared,
        after: &'a mut AfterCommit,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        self.inner.handle(tx, event, meta, prepared, after)
    }
}
