//! The gateway's own server: thread per core, each thread a single-threaded runtime
//! accepting on the shared listener, so a request's server connection, upstream
//! connection and everything between run on one thread without cross-thread
//! wake-ups (the model of nginx's workers). HTTP/1.1 and h2c on one port, with the
//! protocol limits configured here; the gateway's own endpoints (health, metrics,
//! OpenAPI, JWKS, admin routes of the chassis) go through the chassis router, and
//! everything else takes the proxy's short path.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::{IntoResponse, Response};
use chassis::Problem;
use chassis::http::{
    AccessLog, AccessLogPolicy, RequestIds, ServerFn, UNMATCHED_ROUTE, log_access,
};
use futures::FutureExt;
use http::header::{self, HeaderValue};
use http::{Request, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use telemetry::context::{CORRELATION_ID, RequestContext};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::h1;
use crate::proxy::{self, Proxy};
use crate::wire::Fields;

/// Protocol limits, from `[gateway]`.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Worker threads; 0 means one per core.
    pub workers: usize,
    /// Request line plus headers, in bytes: past it, 431.
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// Past it, 414.
    pub max_uri_bytes: usize,
    /// A client must send its whole request head within this (slow clients).
    pub header_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
    /// Streams a client may reset before the server answers them (HTTP/2 rapid
    /// reset, CVE-2023-44487).
    pub h2_max_pending_resets: usize,
    /// An HTTP/2 connection with no open stream for this long is closed (GOAWAY).
    pub h2_idle_timeout: Duration,
}

/// A listener beyond the chassis's main one, bound at start.
pub struct Listener {
    pub socket: std::net::TcpListener,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Marks a request that came over TLS (for `X-Forwarded-Proto`).
#[derive(Clone, Copy, Debug)]
pub struct Https;

/// What every worker shares.
struct Shared {
    own: Router,
    proxy: Arc<Proxy>,
    metrics: telemetry::metrics::Metrics,
    request_timeout: Duration,
    access: AccessLogPolicy,
    limits: Limits,
    /// Exact paths the chassis router serves on the public port.
    own_paths: Vec<String>,
    /// What plain HTTP/1.1 connections are held to.
    h1: h1::Settings,
}

/// The gateway's [`ServerFn`].
pub fn server(
    proxy: Arc<Proxy>,
    metrics: telemetry::metrics::Metrics,
    http: &chassis::settings::HttpSettings,
    limits: Limits,
    own_paths: Vec<String>,
    main_tls: Option<tokio_rustls::TlsAcceptor>,
    more: Vec<Listener>,
) -> ServerFn {
    let request_timeout = http.request_timeout.0;
    let access = AccessLogPolicy::new(http);
    Box::new(move |listener, own, shutdown| {
        let h1 = h1::Settings {
            max_header_bytes: limits.max_header_bytes,
            max_headers: limits.max_headers,
            header_timeout: limits.header_timeout,
            body_timeout: request_timeout,
            max_body: proxy.max_body,
        };
        let shared = Arc::new(Shared {
            h1,
            own,
            proxy,
            metrics,
            request_timeout,
            access,
            limits,
            own_paths,
        });
        Box::pin(async move {
            let mut listeners = vec![Listener {
                socket: listener.into_std()?,
                tls: main_tls,
            }];
            listeners.extend(more);
            run(listeners, shared, shutdown).await
        })
    })
}

async fn run(
    listeners: Vec<Listener>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let workers = match shared.limits.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    // Each worker reports its end on a channel: joining threads from a blocking task
    // would hold up the owning runtime's shutdown for as long as they run.
    let mut ended = Vec::with_capacity(workers);
    for n in 0..workers {
        let listeners = listeners
            .iter()
            .map(|l| {
                Ok(Listener {
                    socket: l.socket.try_clone()?,
                    tls: l.tls.clone(),
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        let (done, end) = tokio::sync::oneshot::channel();
        ended.push(end);
        std::thread::Builder::new()
            .name(format!("gateway-{n}"))
            .spawn(move || {
                let result = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    // Access lines are written when the worker runs out of work.
                    .on_thread_park(telemetry::logging::idle)
                    .build()
                    .and_then(|runtime| runtime.block_on(worker(listeners, shared, shutdown)));
                let _ = done.send(result);
            })?;
    }
    let mut result = Ok(());
    for end in ended {
        match end.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(_) => result = Err(std::io::Error::other("a gateway worker panicked")),
        }
    }
    result
}

/// Between PINGs on an HTTP/2 connection, and how long an answer may take: a peer
/// that stops answering them is dropped.
const H2_PING_EVERY: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// HTTP/2 only: a connection reaches it after its preface was seen or `h2` was
/// negotiated, and hyper's automatic builder would serve anything else as
/// HTTP/1.1, past the strict parser of `h1`.
fn builder(limits: &Limits) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.h2_max_pending_resets)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(H2_PING_EVERY)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    builder
}

/// One worker: accepts on every listener until shutdown, then lets its
/// connections finish.
async fn worker(
    listeners: Vec<Listener>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // A token of this worker's own: every connection waits on it between requests,
    // and waiting registers under the token's lock, which the workers would
    // otherwise all take.
    let shutdown = shutdown.child_token();
    let builder = builder(&shared.limits);
    // Each plain connection holds a sender; when every one is dropped, they have all
    // ended.
    let (live, mut all_ended) = tokio::sync::mpsc::channel::<()>(1);
    // Without it, tokio wakes this worker through its eventfd for every fifth
    // request's head timeout.
    tokio::spawn(chassis::clock::timer_floor());
    let loops = listeners
        .into_iter()
        .map(|l| accept(l, &shared, &shutdown, &builder, &live));
    futures::future::try_join_all(loops).await?;
    drop(live);
    let _ = all_ended.recv().await;
    Ok(())
}

/// An HTTP/1.1 connection's requests, for [`h1::serve`].
struct Plain {
    shared: Arc<Shared>,
    peer: SocketAddr,
    /// The connection is TLS: its requests are marked [`Https`].
    https: bool,
}

impl h1::Handler for Plain {
    fn handle(
        &self,
        request: Request<Body>,
        timers: h1::Timers<'_>,
    ) -> impl Future<Output = (Response, Option<Fields>)> + Send {
        // Marked inside `dispatch`, where the request already is: changing it here
        // made a copy of it on every plain request.
        self.shared
            .dispatch(self.peer, request, Some(timers), self.https)
    }

    /// Refusals count and log as unrouted requests: a smuggling attempt or an
    /// oversized head is what an operator most wants to see.
    fn refused(
        &self,
        answer: &Response,
        method: Option<&str>,
        path: Option<&str>,
        elapsed: Duration,
    ) {
        let status = answer.status().as_u16();
        let method = method.unwrap_or("-");
        self.shared
            .metrics
            .observe_http(method, UNMATCHED_ROUTE, status, elapsed);
        if self.shared.access.logs(status) {
            let ids = path.map(|path| RequestIds {
                correlation_id: "-",
                trace_id: "-",
                method,
                path,
            });
            log_access(
                answer,
                None,
                UNMATCHED_ROUTE,
                elapsed,
                Some(self.peer.ip()),
                ids,
            );
        }
    }
}

async fn accept(
    listener: Listener,
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
    builder: &http2::Builder<TokioExecutor>,
    live: &tokio::sync::mpsc::Sender<()>,
) -> std::io::Result<()> {
    listener.socket.set_nonblocking(true)?;
    let socket = tokio::net::TcpListener::from_std(listener.socket)?;
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            accepted = socket.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        // Urgent data inline: `recv` stops short at an urgent mark, which would break
        // the rule that a short read drained the socket (see `wire::read_some`).
        let _ = socket2::SockRef::from(&stream).set_out_of_band_inline(true);
        let (live, builder) = (live.clone(), builder.clone());
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        match &listener.tls {
            // HTTP/1.1 on the gateway's own loop; a client that opens with
            // HTTP/2's preface is handed to hyper's server.
            None => {
                tokio::spawn(async move {
                    let _live = live;
                    let plain = Plain {
                        shared,
                        peer,
                        https: false,
                    };
                    let ended = h1::serve(stream, &plain.shared.h1, &shutdown, &plain).await;
                    if let h1::Ended::Http2(io) = ended {
                        serve_h2(io, plain, &builder, &shutdown).await;
                    }
                });
            }
            // The handshake, then HTTP/2 (by ALPN) on hyper's server, HTTP/1.1 on the
            // gateway's own loop, held to the same strict parsing as plain connections.
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _live = live;
                    // The handshake is held to the deadline of a request head.
                    let handshake = acceptor.accept(stream);
                    let timeout = shared.limits.header_timeout;
                    let stream = match tokio::time::timeout(timeout, handshake).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %peer, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    let tls = Plain {
                        shared,
                        peer,
                        https: true,
                    };
                    if h2 {
                        return serve_h2(stream, tls, &builder, &shutdown).await;
                    }
                    let ended = h1::serve(stream, &tls.shared.h1, &shutdown, &tls).await;
                    // HTTP/2 with prior knowledge inside TLS, without ALPN.
                    if let h1::Ended::Http2(io) = ended {
                        serve_h2(io, tls, &builder, &shutdown).await;
                    }
                });
            }
        }
    }
}

/// Serves an HTTP/2 connection on hyper's server until the client closes it, it
/// has had no open stream for `h2_idle_timeout`, or shutdown: the last two end it
/// gracefully (GOAWAY, then the streams in flight finish).
async fn serve_h2<I>(
    io: I,
    conn: Plain,
    builder: &http2::Builder<TokioExecutor>,
    shutdown: &CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let idle_timeout = conn.shared.limits.h2_idle_timeout;
    let grace = conn.shared.request_timeout + Duration::from_secs(1);
    let activity = Arc::new(Activity::default());
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let shared = conn.shared.clone();
            let (peer, https) = (conn.peer, conn.https);
            // Held by the stream until its answer's body is dropped, sent or not.
            let open = Open::new(&activity);
            let request = request.map(Body::new);
            async move {
                let (response, fields) = shared.dispatch(peer, request, None, https).await;
                let mut response = response.map(|body| Body::new(Counted { body, _open: open }));
                // (Fields come as lines only to a connection that lends timers.)
                if let Some(fields) = fields {
                    fields.into_map(response.headers_mut());
                }
                Ok::<_, Infallible>(response)
            }
        })
    };
    let connection = builder.serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = async {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = activity.idle_for(idle_timeout) => {}
            }
        } => {
            connection.as_mut().graceful_shutdown();
            // Streams in flight get their deadline to finish; a GOAWAY ends only
            // when the client answers its PING, which a dead client never does.
            match tokio::time::timeout(grace, connection).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::debug!("an HTTP/2 connection did not close in time; dropped");
                    return;
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// The streams open on an HTTP/2 connection, for its idle timeout.
#[derive(Default)]
struct Activity {
    open: std::sync::atomic::AtomicUsize,
    changed: tokio::sync::Notify,
}

impl Activity {
    /// Returns once no stream has been open for `timeout` (counted again from
    /// every stream's end).
    async fn idle_for(&self, timeout: Duration) {
        use std::sync::atomic::Ordering;
        loop {
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            // Registered before the count is read: a change after it wakes us.
            changed.as_mut().enable();
            if self.open.load(Ordering::Acquire) > 0 {
                changed.await;
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep(timeout) => return,
                () = changed => {}
            }
        }
    }
}

/// One open stream of an [`Activity`].
struct Open(Arc<Activity>);

impl Open {
    fn new(activity: &Arc<Activity>) -> Self {
        activity
            .open
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        activity.changed.notify_waiters();
        Self(activity.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

/// An answer's body that keeps its stream counted as open until it is dropped.
struct Counted {
    body: Body,
    _open: Open,
}

impl http_body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Shared {
    /// `timers`: the connection's, when it lends them (see [`h1::within`]); the
    /// answer's own fields may then come as lines beside it.
    async fn dispatch(
        &self,
        peer: SocketAddr,
        mut request: Request<Body>,
        timers: Option<h1::Timers<'_>>,
        https: bool,
    ) -> (Response, Option<Fields>) {
        if https {
            request.extensions_mut().insert(Https);
        }
        let path = request.uri().path();
        // The gateway's own metrics are for a scraper on this host; anyone else
        // scrapes the admin API's `/metrics` (the public port faces clients).
        if path == "/metrics" && !peer.ip().is_loopback() {
            let problem = Problem::new(StatusCode::NOT_FOUND, "no-route", "Not found")
                .with_detail("no route serves this path");
            return (problem.into_response(), None);
        }
        if self.own_paths.iter().any(|p| p == path) || path.starts_with("/admin/") {
            request.extensions_mut().insert(ConnectInfo(peer));
            // Boxed so the proxied path's future does not carry the router's.
            return match Box::pin(self.own.clone().oneshot(request)).await {
                Ok(r) => (r, None),
                Err(never) => match never {},
            };
        }
        self.proxied(peer, request, timers).await
    }

    /// The short path: context, limits, the proxy, metrics and the access log.
    async fn proxied(
        &self,
        peer: SocketAddr,
        request: Request<Body>,
        timers: Option<h1::Timers<'_>>,
    ) -> (Response, Option<Fields>) {
        let started = Instant::now();
        let ctx = RequestContext::from_headers(request.headers())
            .with_deadline_by(tokio::time::Instant::from_std(started) + self.request_timeout);
        let correlation = HeaderValue::from_str(&ctx.correlation_id).ok();
        let correlation_id = ctx.correlation_id.clone();
        let trace = ctx.trace;
        let method = request.method().clone();
        // A reference to the request's own bytes, not a copy: the path is needed
        // only for a problem or an access line.
        let uri = request.uri().clone();
        let limited = self.check_limits(&request);
        let mut log = AccessLog::default();
        let mut fields = None;
        let (mut response, route) = match limited {
            Some(problem) => (problem.into_response(), None),
            None => {
                let deadline = ctx.deadline;
                // Pinned where it is made: the forwarding future is kilobytes (every
                // path of the proxy is in its state), and each wrapper below would
                // copy it whole if it took it by value. (Boxing it cost an allocation
                // and a copy of it into the box, on every request; in place, it is
                // part of the connection's task, allocated once per connection.)
                let (request_timer, upstream_timer) =
                    timers.map(|t| (t.request, t.upstream)).unzip();
                let forward = std::pin::pin!(proxy::handle_request(
                    &self.proxy,
                    peer,
                    request,
                    &mut log,
                    upstream_timer,
                    &mut fields,
                    started,
                ));
                let forward = telemetry::context::scope(ctx, forward);
                let forward = AssertUnwindSafe(forward).catch_unwind();
                let outcome = match deadline {
                    Some(at) => h1::within(at, request_timer, std::pin::pin!(forward)).await,
                    None => Some(forward.await),
                };
                match outcome {
                    Some(Ok(answered)) => answered,
                    Some(Err(_)) => (
                        Problem::internal("the gateway failed on this request").into_response(),
                        None,
                    ),
                    None => (Problem::timed_out().into_response(), None),
                }
            }
        };
        let status = response.status();
        // A problem the gateway wrote itself names the request and its correlation id
        // (an upstream's error answers pass as they are).
        if response.extensions().get::<Problem>().is_some() {
            fields = None;
            response = chassis::problem::complete(
                response,
                uri.path().to_owned(),
                Some(correlation_id.to_string()),
            );
        }
        let route = route.as_ref().map_or(UNMATCHED_ROUTE, |r| &*r.0);
        let elapsed = started.elapsed();
        self.metrics
            .observe_http(method.as_str(), route, status.as_u16(), elapsed);
        match (correlation, &mut fields) {
            (Some(v), Some(lines)) => lines.push(&CORRELATION_ID, &v),
            (Some(v), None) => {
                response.headers_mut().insert(CORRELATION_ID, v);
            }
            (None, _) => {}
        }
        if self.access.logs(status.as_u16()) {
            let trace_id = trace.trace_id_bytes();
            log_access(
                &response,
                Some(&log),
                route,
                elapsed,
                Some(peer.ip()),
                Some(RequestIds {
                    correlation_id: &correlation_id,
                    trace_id: std::str::from_utf8(&trace_id).unwrap_or("-"),
                    method: method.as_str(),
                    path: uri.path(),
                }),
            );
        }
        (response, fields)
    }

    /// URI and body size limits (header limits are the connection's).
    fn check_limits(&self, request: &Request<Body>) -> Option<Problem> {
        let uri = request
            .uri()
            .path_and_query()
            .map_or(0, |p| p.as_str().len());
        if uri > self.limits.max_uri_bytes {
            return Some(
                Problem::new(StatusCode::URI_TOO_LONG, "uri-too-long", "URI too long").with_detail(
                    format!(
                        "the URI is {uri} bytes; at most {} are taken",
                        self.limits.max_uri_bytes
                    ),
                ),
            );
        }
        let length = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        // Refused before a byte of the body is read; a body without a length is
        // held to the same limit as the proxy reads it.
        if length.is_some_and(|l| l > self.proxy.max_body) {
            return Some(proxy::body_too_large(self.proxy.max_body));
        }
        None
    }
}
