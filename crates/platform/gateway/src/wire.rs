//! The upstream side of the proxy: HTTP/1.1 to service instances, written and read
//! by the request's own task, over connections pooled per worker thread.
//!
//! Why not hyper's client: it runs each connection as a task of its own and hands
//! requests and responses to it over channels, so a proxied request wakes two tasks
//! and crosses two queues. Here the task that has the request writes it (head and
//! body in one `writev`) and reads the answer on the same turn, as nginx's upstream
//! module does. A short read clears the socket's readiness at once (nginx's
//! `rev->ready = 0`), so no `recv` is spent learning that nothing more is there, and
//! an idle connection is checked for a close without a system call.
//!
//! Scope: plain HTTP/1.1 with keep-alive; `Content-Length`, chunked and
//! read-until-close bodies; 1xx answers skipped. Bodies up to [`READ_WHOLE`] bytes
//! are read before the answer is handed on, so their connection is back in the pool
//! before the client is written to; longer ones stream.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::{self, IoSlice, Read};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Method, Response, StatusCode, Uri, Version};
use http_body::{Frame, SizeHint};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::message::{self, BadLength, Chunk, MAX_LINE, Step};
use telemetry::context::{CORRELATION_ID, DEADLINE, RequestContext, TRACEPARENT};

/// A connection's read buffer to begin with; it grows for a long head.
pub(crate) const BUFFER: usize = 8 * 1024;
/// Past this, an answer's head is refused.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// Bodies of at most this many bytes are read whole before the answer goes on.
pub const READ_WHOLE: u64 = 64 * 1024;
const MAX_IDLE_PER_HOST: usize = 256;
/// An idle connection older than this is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Nothing was sent: the instance could not be reached.
    #[error("{0}")]
    Connect(String),
    /// The exchange started and failed.
    #[error("{0}")]
    Failed(String),
}

impl WireError {
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_))
    }
}

/// A byte stream a [`Conn`] reads and writes: a TCP socket, read with the
/// short-read rule and written with `writev` straight from the reactor's readiness,
/// or a TLS session over one (the client side of a TLS listener), through tokio's
/// `AsyncRead` and `AsyncWrite`. Generic, not a trait object: the plain path is
/// compiled for `TcpStream` alone and pays nothing for TLS.
pub trait Transport: Send + Unpin {
    /// One read into `into`; `Ok(0)` at the end of the stream.
    fn poll_read_into(&mut self, cx: &mut Context<'_>, into: &mut [u8]) -> Poll<io::Result<usize>>;

    /// Writes `head` then `body` whole (and out of any buffer of the transport's);
    /// on failure, whether any byte had gone out.
    fn send<'a>(
        &'a mut self,
        head: &'a [u8],
        body: &'a [u8],
    ) -> impl Future<Output = Result<(), (io::Error, bool)>> + Send + 'a;

    /// Ends the sending side (TLS: with its `close_notify`), leaving the
    /// receiving side open.
    fn shutdown_write(&mut self) -> impl Future<Output = ()> + Send + '_;

    /// What ends a connection about to be dropped: TLS's `close_notify` (within
    /// a moment: the client may not be reading); nothing for TCP, whose drop
    /// closes it.
    fn finish(&mut self) -> impl Future<Output = ()> + Send + '_;
}

impl Transport for TcpStream {
    fn poll_read_into(&mut self, cx: &mut Context<'_>, into: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.poll_read_ready(cx))?;
            match read_some(self, into) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn send<'a>(
        &'a mut self,
        head: &'a [u8],
        body: &'a [u8],
    ) -> impl Future<Output = Result<(), (io::Error, bool)>> + Send + 'a {
        write_all(self, head, body)
    }

    async fn shutdown_write(&mut self) {
        let _ = socket2::SockRef::from(&*self).shutdown(std::net::Shutdown::Write);
    }

    async fn finish(&mut self) {}
}

impl<S> Transport for tokio_rustls::server::TlsStream<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin,
{
    fn poll_read_into(&mut self, cx: &mut Context<'_>, into: &mut [u8]) -> Poll<io::Result<usize>> {
        let mut buf = tokio::io::ReadBuf::new(into);
        ready!(tokio::io::AsyncRead::poll_read(
            Pin::new(self),
            cx,
            &mut buf
        ))?;
        Poll::Ready(Ok(buf.filled().len()))
    }

    async fn send<'a>(
        &'a mut self,
        head: &'a [u8],
        body: &'a [u8],
    ) -> Result<(), (io::Error, bool)> {
        use tokio::io::AsyncWriteExt;
        let mut at = Sent::default();
        while !at.all(head, body) {
            let slices = [
                IoSlice::new(&head[at.head..]),
                IoSlice::new(&body[at.body..]),
            ];
            match self.write_vectored(&slices).await {
                Ok(0) => return Err((io::ErrorKind::WriteZero.into(), at.started())),
                Ok(n) => at.advance(n, head),
                Err(e) => return Err((e, at.started())),
            }
        }
        // rustls holds records until flushed.
        self.flush().await.map_err(|e| (e, true))
    }

    async fn shutdown_write(&mut self) {
        use tokio::io::AsyncWriteExt;
        let _ = self.shutdown().await;
    }

    async fn finish(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.shutdown_write()).await;
    }
}

/// A connection and what has been read from it but not consumed.
pub(crate) struct Conn<S = TcpStream> {
    pub(crate) stream: S,
    /// Always initialized (the crate forbids `unsafe`): `start..end` is unread.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The head being written, reused across messages.
    pub(crate) out: Vec<u8>,
}

impl<S: Transport> Conn<S> {
    pub(crate) fn new(stream: S) -> Self {
        Self {
            stream,
            buf: vec![0; BUFFER],
            start: 0,
            end: 0,
            out: Vec::with_capacity(1024),
        }
    }

    pub(crate) fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Up to `at_most` of the unread bytes, as the body's next piece.
    pub(crate) fn take(&mut self, at_most: u64) -> Bytes {
        let pending = self.pending();
        let n = usize::try_from(at_most).map_or(pending.len(), |m| m.min(pending.len()));
        let data = Bytes::copy_from_slice(&pending[..n]);
        self.consume(n);
        data
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start >= self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Gives back a buffer grown for a long message once it is empty, so an idle
    /// connection holds no more than [`BUFFER`].
    pub(crate) fn shrink(&mut self) {
        if self.buf.len() > BUFFER && self.pending().is_empty() {
            self.buf = vec![0; BUFFER];
        }
    }

    /// The stream and the bytes read from it but not consumed.
    pub(crate) fn into_parts(self) -> (S, Bytes) {
        let read = Bytes::copy_from_slice(self.pending());
        (self.stream, read)
    }

    /// Reads more into the buffer, growing it up to `limit`; `Ok(0)` at the end of
    /// the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>, limit: usize) -> Poll<io::Result<usize>> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < limit {
                let grown = (self.buf.len() * 2).min(limit);
                self.buf.resize(grown, 0);
            } else {
                return Poll::Ready(Err(io::Error::other(format!(
                    "more than {limit} bytes without an end of line or head"
                ))));
            }
        }
        let n = ready!(self.stream.poll_read_into(cx, &mut self.buf[self.end..]))?;
        self.end += n;
        Poll::Ready(Ok(n))
    }

    pub(crate) async fn fill(&mut self, limit: usize) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx, limit)).await
    }

    /// Reads into `into`, past the buffer (whose unread bytes the caller has
    /// taken first, or does not want): a body's bytes going straight to where they
    /// are kept.
    pub(crate) async fn read_into(&mut self, into: &mut [u8]) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.stream.poll_read_into(cx, into)).await
    }
}

impl Conn<TcpStream> {
    /// Whether an idle connection is still open and silent, without a system call
    /// unless the reactor saw an event on it (a close, a reset, stray bytes).
    fn idle_and_open(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

/// One `recv`; a read that fills less than `into` drained the socket, so its
/// readiness is cleared now instead of by a further `recv` that would block. The
/// reactor keeps a close (it never clears one), and data arriving after the read
/// raises a new edge.
fn read_some(stream: &TcpStream, into: &mut [u8]) -> io::Result<usize> {
    let want = into.len();
    let mut got = 0;
    let result = stream.try_io(Interest::READABLE, || {
        let n = (&*socket2::SockRef::from(stream)).read(into)?;
        got = n;
        if n > 0 && n < want {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match result {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        other => other,
    }
}

/// How much of a head and a body written one after the other has gone out.
#[derive(Default)]
struct Sent {
    head: usize,
    body: usize,
}

impl Sent {
    fn all(&self, head: &[u8], body: &[u8]) -> bool {
        self.head == head.len() && self.body == body.len()
    }

    fn started(&self) -> bool {
        self.head > 0 || self.body > 0
    }

    /// `n` more bytes went out: the head's first.
    fn advance(&mut self, n: usize, head: &[u8]) {
        let from_head = n.min(head.len() - self.head);
        self.head += from_head;
        self.body += n - from_head;
    }
}

/// Writes head and body; on failure, whether any byte had gone out.
pub(crate) async fn write_all(
    stream: &TcpStream,
    head: &[u8],
    body: &[u8],
) -> Result<(), (io::Error, bool)> {
    let mut at = Sent::default();
    while !at.all(head, body) {
        let written = if at.body == body.len() {
            stream.try_write(&head[at.head..])
        } else {
            stream.try_write_vectored(&[
                IoSlice::new(&head[at.head..]),
                IoSlice::new(&body[at.body..]),
            ])
        };
        let started = at.started();
        match written {
            Ok(0) => return Err((io::ErrorKind::WriteZero.into(), started)),
            Ok(n) => at.advance(n, head),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                stream.writable().await.map_err(|e| (e, started))?;
            }
            Err(e) => return Err((e, started)),
        }
    }
    Ok(())
}

thread_local! {
    /// Idle connections of this thread by authority, the most recent last: a gateway
    /// worker keeps its upstream connections to itself.
    static IDLE: RefCell<HashMap<Box<str>, VecDeque<Idle>, foldhash::fast::RandomState>> =
        RefCell::new(HashMap::default());
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// An idle connection to `key` as of `now` (the caller's reading of the clock).
fn checkout(key: &str, now: Instant) -> Option<Conn> {
    IDLE.with_borrow_mut(|idle| {
        let queue = idle.get_mut(key)?;
        while let Some(Idle { conn, since }) = queue.pop_back() {
            if now.saturating_duration_since(since) < IDLE_TIMEOUT && conn.idle_and_open() {
                return Some(conn);
            }
        }
        None
    })
}

thread_local! {
    /// When this thread's pool was last swept of expired connections.
    static SWEPT: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// Gives back a connection, idle since `now` (the caller's reading of the clock
/// as its answer arrived).
fn checkin(key: &str, conn: Conn, now: Instant) {
    IDLE.with_borrow_mut(|idle| {
        // Every idle timeout, the whole pool is swept: an instance discovery no
        // longer names is never taken from again, and its connections would stay.
        if SWEPT
            .get()
            .is_none_or(|at| now.saturating_duration_since(at) >= IDLE_TIMEOUT)
        {
            SWEPT.set(Some(now));
            idle.retain(|_, queue| {
                queue.retain(|i| now.saturating_duration_since(i.since) < IDLE_TIMEOUT);
                !queue.is_empty()
            });
        }
        let queue = match idle.get_mut(key) {
            Some(q) => q,
            None => idle.entry(key.into()).or_default(),
        };
        while queue
            .front()
            .is_some_and(|i| now.saturating_duration_since(i.since) >= IDLE_TIMEOUT)
        {
            queue.pop_front();
        }
        if queue.len() < MAX_IDLE_PER_HOST {
            queue.push_back(Idle { conn, since: now });
        }
    });
}

/// How an answer's body ends (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    Close,
}

struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    /// The answer's own fields as lines, in place of `headers`, when asked for.
    fields: Option<Fields>,
    framing: Framing,
    reusable: bool,
}

/// An answer's own fields as its client gets them, for a server that writes the
/// client's answer itself: each `name: value\r\n` as the upstream sent it, without
/// the framing fields, the hop-by-hop ones (with those `Connection` names) and
/// those the proxy sets itself. A header map built for an answer cost about 2,000
/// instructions a request (a name parsed and hashed, a value copied and checked,
/// for each field), for fields that are only written out again.
#[derive(Clone, Debug, Default)]
pub struct Fields {
    pub lines: Vec<u8>,
    /// Whether one of them is `Date`.
    pub dated: bool,
}

impl Fields {
    /// `h` as a line, unless it is a framing or hop-by-hop field (`special`; a
    /// length is kept where it describes the representation), named in `replaced`
    /// or in `named` (by `Connection`).
    fn add(
        &mut self,
        head: &[u8],
        h: &httparse::Header<'_>,
        special: Option<Special>,
        keep_length: bool,
        replaced: &[HeaderName],
        named: &[Vec<u8>],
    ) {
        let name = h.name.as_bytes();
        let passed = match special {
            Some(Special::ContentLength) => keep_length,
            Some(Special::Date) => true,
            Some(_) => false,
            None => !named.iter().any(|n| name.eq_ignore_ascii_case(n)),
        } && !replaced
            .iter()
            .any(|r| name.eq_ignore_ascii_case(r.as_str().as_bytes()));
        if passed {
            self.dated |= special == Some(Special::Date);
            match raw_line(head, h) {
                Some(raw) => {
                    self.lines.reserve(raw.len() + 2);
                    self.lines.extend_from_slice(raw);
                    self.lines.extend_from_slice(b"\r\n");
                }
                None => line(&mut self.lines, h.name, h.value),
            }
        }
    }

    /// One more field, after the others (`value` from a `HeaderValue`, so without
    /// CR or LF).
    pub fn push(&mut self, name: &HeaderName, value: &HeaderValue) {
        line(&mut self.lines, name.as_str(), value.as_bytes());
    }

    /// The fields as a header map's entries (for a server that cannot take lines).
    pub fn into_map(self, headers: &mut HeaderMap) {
        let mut rest = &self.lines[..];
        while let Some(end) = rest.windows(2).position(|w| w == b"\r\n") {
            let line = &rest[..end];
            rest = &rest[end + 2..];
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let value = line[colon + 1..].trim_ascii_start();
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(&line[..colon]),
                HeaderValue::from_bytes(value),
            ) {
                headers.append(name, value);
            }
        }
    }
}

/// A field's line as the upstream wrote it in `head`, from its name to the end of
/// its value (the colon and the spaces around it included), without the line's
/// end: one copy where name, colon and value were three. `None` where the parser's
/// slices do not lie so in `head` (an empty value need not point into it).
fn raw_line<'a>(head: &'a [u8], h: &httparse::Header<'_>) -> Option<&'a [u8]> {
    let base = head.as_ptr() as usize;
    let start = (h.name.as_ptr() as usize).checked_sub(base)?;
    let end = (h.value.as_ptr() as usize + h.value.len()).checked_sub(base)?;
    let raw = head.get(start..end)?;
    let colon = h.name.len();
    (!h.value.is_empty() && raw.get(colon) == Some(&b':') && raw.ends_with(h.value)).then_some(raw)
}

/// A failed exchange, and whether it failed before a byte of the answer came
/// (a pooled connection the upstream had closed).
struct Broken {
    error: String,
    before_answer: bool,
    written: bool,
}

/// Fields a proxy adds to a request it forwards, written after the head's own
/// (see [`crate::upstream::Call::added`]).
pub type Added = [Option<(HeaderName, HeaderValue)>];

/// Sends a request to the instance at `base` (an `http://` URI) and returns its
/// answer; the body streams unless it was short enough to read whole. With a
/// `context`, the request carries its correlation id, a child `traceparent` and the
/// time left, in place of any the head holds. `added` goes after the head's fields.
/// With `as_fields` the answer's own fields come back as [`Fields`] (the response's
/// map left empty), without those named in `as_fields`. `now`:
/// the caller's reading of the clock as the exchange starts (for the pool's idle
/// times and the deadline the request carries; a reading costs about 100
/// instructions, and a request made 20). Returns, beside the answer, when its head
/// had arrived.
#[allow(clippy::too_many_arguments)]
pub async fn send_with(
    base: &Uri,
    head: &Parts,
    added: &Added,
    body: &Bytes,
    connect_timeout: Duration,
    context: Option<&RequestContext>,
    as_fields: Option<&[HeaderName]>,
    now: Instant,
) -> Result<(Response<Body>, Option<Fields>, Instant), WireError> {
    if base.scheme_str().is_some_and(|s| s != "http") {
        return Err(WireError::Connect(format!(
            "{base}: only http:// instances are spoken to"
        )));
    }
    let Some(authority) = base.authority() else {
        return Err(WireError::Connect(format!("{base}: no host")));
    };
    let key = authority.as_str();
    let idempotent = resilience::retry::is_idempotent(&head.method);
    let mut pooled = checkout(key, now);
    loop {
        let reused = pooled.is_some();
        let mut conn = match pooled.take() {
            Some(conn) => conn,
            // Boxed: the rare path would otherwise double the size of every
            // request's future, which each wrapper above copies.
            None => Box::pin(connect(authority, connect_timeout)).await?,
        };
        // A new connection took time to make: the deadline sent counts from after.
        let sending = match reused {
            true => now,
            false => Instant::now(),
        };
        encode(&mut conn.out, head, added, key, body, context, sending);
        match exchange(&mut conn, body, head.method == Method::HEAD, as_fields).await {
            Ok(answer) => {
                // One reading for the answer: when the connection went idle, and
                // (returned) the end of the exchange for the caller's latencies.
                let answered = Instant::now();
                let (response, fields) = respond(conn, key, answer, answered).await?;
                return Ok((response, fields, answered));
            }
            // The upstream closed a pooled connection as it was taken: nothing was
            // done with a request it never read, and an idempotent one may be sent
            // again in any case.
            Err(broken) if reused && broken.before_answer && (!broken.written || idempotent) => {
                tracing::debug!(error = %broken.error, "pooled upstream connection was closed; reconnecting");
            }
            Err(broken) => return Err(WireError::Failed(broken.error)),
        }
    }
}

async fn connect(authority: &http::uri::Authority, timeout: Duration) -> Result<Conn, WireError> {
    let target = match authority.port_u16() {
        Some(_) => authority.as_str().to_owned(),
        None => format!("{}:80", authority.host()),
    };
    let attempt = async {
        let mut last = None;
        for addr in tokio::net::lookup_host(&target).await? {
            match TcpStream::connect(addr).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("the name resolves to no address")))
    };
    let stream = match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(WireError::Connect(format!("connect to {target}: {e}"))),
        Err(_) => {
            return Err(WireError::Connect(format!(
                "connect to {target}: no answer within {timeout:?}"
            )));
        }
    };
    // Requests are small and latency-bound.
    let _ = stream.set_nodelay(true);
    // Urgent data inline: `recv` stops short at an urgent mark, which would break
    // the rule that a short read drained the socket.
    let _ = socket2::SockRef::from(&stream).set_out_of_band_inline(true);
    Ok(Conn::new(stream))
}

/// Hop-by-hop framing and what the proxy has already answered for: never written;
/// cookies are written together after the rest.
fn skipped(name: &HeaderName) -> bool {
    *name == header::CONTENT_LENGTH
        || *name == header::TRANSFER_ENCODING
        || *name == header::HOST
        || *name == header::EXPECT
        || *name == header::COOKIE
}

/// What a request context writes itself.
fn from_context(name: &HeaderName) -> bool {
    *name == CORRELATION_ID || *name == TRACEPARENT || *name == DEADLINE
}

/// The request head: the proxy's headers as they are (the `http` types hold no
/// CR or LF), `Host` for the instance, the context's headers and the length of the
/// buffered body. The context's are written here rather than put in the header
/// map first: three values made, checked and hashed into the map for every
/// request, only to be read back out at once.
fn encode(
    out: &mut Vec<u8>,
    head: &Parts,
    added: &Added,
    authority: &str,
    body: &Bytes,
    context: Option<&RequestContext>,
    now: Instant,
) {
    out.clear();
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    let target = head.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(authority.as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut cookied = false;
    for (name, value) in &head.headers {
        if skipped(name) || (context.is_some() && from_context(name)) {
            cookied |= *name == header::COOKIE;
            continue;
        }
        line(out, name.as_str(), value.as_bytes());
    }
    for (name, value) in added.iter().flatten() {
        line(out, name.as_str(), value.as_bytes());
    }
    if let Some(context) = context {
        let now = tokio::time::Instant::from_std(now);
        context.outgoing_at(now, |name, value| line(out, name.as_str(), value));
    }
    // HTTP/2 clients send each cookie as a field of its own; an HTTP/1.1 message
    // carries them in one, joined by "; " (RFC 9113 §8.2.3). (Looked up only when
    // the pass above met one.)
    let mut cookies = cookied
        .then(|| head.headers.get_all(header::COOKIE).iter())
        .into_iter()
        .flatten();
    if let Some(first) = cookies.next() {
        out.extend_from_slice(b"cookie: ");
        out.extend_from_slice(first.as_bytes());
        for more in cookies {
            out.extend_from_slice(b"; ");
            out.extend_from_slice(more.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
    if !body.is_empty() || matches!(head.method, Method::POST | Method::PUT | Method::PATCH) {
        line(
            out,
            "content-length",
            itoa::Buffer::new().format(body.len()).as_bytes(),
        );
    }
    out.extend_from_slice(b"\r\n");
}

/// One `name: value` line of a head (requests here, answers in `h1`).
pub(crate) fn line(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.reserve(name.len() + value.len() + 4);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes the request and reads the answer's head.
async fn exchange(
    conn: &mut Conn,
    body: &Bytes,
    head_request: bool,
    as_fields: Option<&[HeaderName]>,
) -> Result<Head, Broken> {
    let out = std::mem::take(&mut conn.out);
    let written = write_all(&conn.stream, &out, body).await;
    conn.out = out;
    if let Err((e, started)) = written {
        // Part of a request may be acted on by some upstreams: it counts as sent.
        return Err(Broken {
            error: format!("sending the request: {e}"),
            before_answer: true,
            written: started,
        });
    }
    loop {
        match parse_head(conn.pending(), head_request, as_fields) {
            Ok(Some((answer, used))) => {
                conn.consume(used);
                // 1xx answers are interim (the body was sent with the head, so a
                // `100 Continue` has nothing to release); the final one follows.
                if answer.status.is_informational() {
                    continue;
                }
                return Ok(answer);
            }
            Ok(None) => {}
            Err(error) => {
                return Err(Broken {
                    error,
                    before_answer: false,
                    written: true,
                });
            }
        }
        let before_answer = conn.pending().is_empty();
        match conn.fill(MAX_HEAD).await {
            Ok(0) => {
                return Err(Broken {
                    error: "the upstream closed the connection before answering".into(),
                    before_answer,
                    written: true,
                });
            }
            Ok(_) => {}
            Err(e) => {
                return Err(Broken {
                    error: format!("reading the answer: {e}"),
                    before_answer,
                    written: true,
                });
            }
        }
    }
}

/// An answer's head from the start of `bytes`, with the bytes it took; `None` until
/// the head is complete. With `as_fields`, the answer's own fields come as
/// [`Fields`] (without those `as_fields` names) and its map stays empty.
fn parse_head(
    bytes: &[u8],
    head_request: bool,
    as_fields: Option<&[HeaderName]>,
) -> Result<Option<(Head, usize)>, String> {
    // Uninitialized slots: filling 128 empty headers first cost about 700
    // instructions an answer, more than parsing the handful an answer has.
    let mut slots = [std::mem::MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let used = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        bytes,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("the upstream's answer is malformed: {e}")),
    };
    let code = parsed.code.unwrap_or(0);
    let status = StatusCode::from_u16(code)
        .map_err(|_| format!("the upstream answered with status {code}"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err("the upstream switched protocols, which is not proxied".into());
    }
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let fields = parsed.headers;
    // A client's server writes the body's length itself, except where the answer
    // has no body and its length describes the representation.
    let keep_length = head_request || status == StatusCode::NOT_MODIFIED;
    // What framing needs is noted in one pass over the fields, by their names'
    // bytes, and the lines are written in the same pass (again, without the
    // fields it names, only when the answer has a `Connection`).
    let (mut lengths, mut length, mut framed, mut close, mut connection) =
        (0, None, false, false, false);
    let mut lines = as_fields.map(|_| Fields {
        // Room for the fields the proxy adds after them.
        lines: Vec::with_capacity(used + 256),
        dated: false,
    });
    for h in fields.iter() {
        let special = Special::of(h.name.as_bytes());
        match special {
            Some(Special::ContentLength) => {
                lengths += 1;
                // A single field of digits, the usual case, is read here.
                length = digits(h.value);
            }
            Some(Special::TransferEncoding) => framed = true,
            Some(Special::Connection) => {
                connection = true;
                close |= message::list_has(h.value, "close");
            }
            _ => {}
        }
        if let (Some(out), Some(replaced)) = (&mut lines, as_fields) {
            out.add(bytes, h, special, keep_length, replaced, &[]);
        }
    }
    if connection && let (Some(out), Some(replaced)) = (&mut lines, as_fields) {
        let named = named_by_connection(fields);
        out.lines.clear();
        out.dated = false;
        for h in fields.iter() {
            out.add(
                bytes,
                h,
                Special::of(h.name.as_bytes()),
                keep_length,
                replaced,
                &named,
            );
        }
    }
    let values = |name: HeaderName| -> Vec<HeaderValue> {
        fields
            .iter()
            .filter(|h| {
                h.name
                    .as_bytes()
                    .eq_ignore_ascii_case(name.as_str().as_bytes())
            })
            .filter_map(|h| HeaderValue::from_bytes(h.value).ok())
            .collect()
    };
    let mut reusable = version == Version::HTTP_11 && !close;
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    // The length the client is told, when it is not the one the upstream sent as it
    // is: `5, 5` is one length, and a suspect message's length is not passed on.
    let mut told: Option<Option<u64>> = None;
    let framing = if bodiless {
        // A body where none can be (a broken upstream) would be read as the next
        // request's answer: such a connection is not reused.
        // (A 304's or a HEAD answer's Content-Length describes the representation.)
        if framed
            || (status == StatusCode::NO_CONTENT
                && lengths > 0
                && content_length(&values(header::CONTENT_LENGTH)).is_ok_and(|n| n > 0))
        {
            reusable = false;
        }
        Framing::Length(0)
    } else if framed {
        // Only `chunked` is decoded; a coding the client would have to be told of
        // (`gzip, chunked`) cannot be passed on once the proxy has removed the
        // hop-by-hop `Transfer-Encoding`.
        let codings = values(header::TRANSFER_ENCODING);
        let codings = message::transfer_codings(&codings);
        if !codings.is_some_and(|c| matches!(c[..], [only] if only.eq_ignore_ascii_case("chunked")))
        {
            return Err("the upstream used a transfer coding other than chunked".into());
        }
        // With a Content-Length as well, the message is suspect (RFC 9112 §6.3):
        // it is read as chunked, its length is not passed on, and the connection
        // is not reused.
        if lengths > 0 {
            told = Some(None);
            reusable = false;
        }
        Framing::Chunked(Chunk::Size)
    } else if lengths > 0 {
        let n = match (lengths, length) {
            (1, Some(n)) => n,
            // `5, 5` is one length; the client gets it once.
            _ => {
                let n = content_length(&values(header::CONTENT_LENGTH))?;
                told = Some(Some(n));
                n
            }
        };
        Framing::Length(n)
    } else {
        reusable = false;
        Framing::Close
    };
    let (headers, fields) = match lines {
        Some(lines) => (HeaderMap::new(), Some(lines)),
        None => {
            let mut headers = message::header_map(fields.len());
            for h in fields.iter() {
                let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
                    format!("the upstream sent an invalid header name `{}`", h.name)
                })?;
                let value = HeaderValue::from_bytes(h.value)
                    .map_err(|_| format!("the upstream sent an invalid value for `{}`", h.name))?;
                headers.append(name, value);
            }
            match told {
                Some(None) => {
                    headers.remove(header::CONTENT_LENGTH);
                }
                Some(Some(n)) => {
                    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
                }
                None => {}
            }
            (headers, None)
        }
    };
    Ok(Some((
        Head {
            status,
            version,
            headers,
            fields,
            framing,
            reusable,
        },
        used,
    )))
}

/// The fields an answer's framing and forwarding treat apart, told by their
/// names' bytes (any case) without making a `HeaderName`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Special {
    ContentLength,
    TransferEncoding,
    Connection,
    Date,
    /// Meaningful for one connection only (RFC 9110 §7.6.1), never passed on.
    HopByHop,
}

impl Special {
    fn of(name: &[u8]) -> Option<Special> {
        let is = |known: &str| name.eq_ignore_ascii_case(known.as_bytes());
        // The length first: most names are ruled out by it alone.
        match name.len() {
            2 if is("te") => Some(Special::HopByHop),
            4 if is("date") => Some(Special::Date),
            7 if is("trailer") || is("upgrade") => Some(Special::HopByHop),
            10 if is("connection") => Some(Special::Connection),
            10 if is("keep-alive") => Some(Special::HopByHop),
            14 if is("content-length") => Some(Special::ContentLength),
            16 if is("proxy-connection") => Some(Special::HopByHop),
            17 if is("transfer-encoding") => Some(Special::TransferEncoding),
            18 if is("proxy-authenticate") => Some(Special::HopByHop),
            19 if is("proxy-authorization") => Some(Special::HopByHop),
            _ => None,
        }
    }
}

/// The field names the `Connection` fields of `fields` list.
fn named_by_connection(fields: &[httparse::Header<'_>]) -> Vec<Vec<u8>> {
    fields
        .iter()
        .filter(|h| Special::of(h.name.as_bytes()) == Some(Special::Connection))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(|t| t.trim_ascii().to_vec())
        .filter(|t| !t.is_empty())
        .collect()
}

/// `value` as a decimal number when it is nothing but digits (and fits).
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// Every `Content-Length` of an answer must be the same number.
fn content_length(values: &[HeaderValue]) -> Result<u64, String> {
    message::content_length(values).map_err(|e| match e {
        BadLength::Invalid => "the upstream sent an invalid Content-Length".into(),
        BadLength::Conflicting => "the upstream sent conflicting Content-Lengths".into(),
    })
}

/// The answer with its body: read whole when short (the connection goes back to
/// the pool before the client is written to), else streamed from the connection,
/// which returns to the pool once the body has been read.
async fn respond(
    mut conn: Conn,
    key: &str,
    answer: Head,
    now: Instant,
) -> Result<(Response<Body>, Option<Fields>), WireError> {
    let Head {
        status,
        version,
        headers,
        fields,
        framing,
        reusable,
    } = answer;
    let body = match framing {
        Framing::Length(n) if n <= READ_WHOLE => {
            let len = usize::try_from(n).unwrap_or(usize::MAX);
            while conn.pending().len() < len {
                match conn.fill(BUFFER.max(len)).await {
                    Ok(0) => {
                        return Err(WireError::Failed(
                            "the upstream closed the connection mid-body".into(),
                        ));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return Err(WireError::Failed(format!(
                            "reading the upstream's body: {e}"
                        )));
                    }
                }
            }
            let data = conn.take(n);
            if reusable && conn.pending().is_empty() {
                checkin(key, conn, now);
            }
            match data.is_empty() {
                true => Body::empty(),
                false => Body::from(data),
            }
        }
        framing => Body::new(Streamed {
            conn: Some(conn),
            framing,
            key: key.into(),
            reusable,
            home: std::thread::current().id(),
        }),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    Ok((response, fields))
}

/// A body read from the upstream connection as the client takes it.
struct Streamed {
    /// `None` once the body has ended.
    conn: Option<Conn>,
    framing: Framing,
    key: Box<str>,
    reusable: bool,
    /// The thread whose pool the connection belongs to.
    home: ThreadId,
}

impl Streamed {
    /// The body has been read: the connection goes back to its pool if it can carry
    /// another request.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.reusable
            && conn.pending().is_empty()
            && std::thread::current().id() == self.home
        {
            checkin(&self.key, conn, Instant::now());
        }
    }

    fn fail(&mut self, error: impl Into<String>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.conn = None;
        Poll::Ready(Some(Err(io::Error::other(error.into()))))
    }
}

impl http_body::Body for Streamed {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let pending = conn.pending();
            match this.framing {
                Framing::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(left) if !pending.is_empty() => {
                    let data = conn.take(left);
                    this.framing = Framing::Length(left - data.len() as u64);
                    if this.framing == Framing::Length(0) {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Close if !pending.is_empty() => {
                    let data = conn.take(u64::MAX);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked(mut chunk) => {
                    let step = chunk.step(pending);
                    this.framing = Framing::Chunked(chunk);
                    match step {
                        Step::Data(n) => {
                            return Poll::Ready(Some(Ok(Frame::data(conn.take(n as u64)))));
                        }
                        Step::Framing(n) => {
                            conn.consume(n);
                            continue;
                        }
                        // Trailer fields are not passed on.
                        Step::End(n) => {
                            conn.consume(n);
                            this.finish();
                            return Poll::Ready(None);
                        }
                        Step::More => {}
                        Step::Invalid(what) => {
                            return this.fail(format!("the upstream sent {what}"));
                        }
                    }
                }
                _ => {}
            }
            let limit = BUFFER.max(MAX_LINE * 2);
            match ready!(conn.poll_fill(cx, limit)) {
                Ok(0) if this.framing == Framing::Close => {
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail("the upstream closed the connection mid-body"),
                Ok(_) => {}
                Err(e) => return this.fail(format!("reading the upstream's body: {e}")),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || self.framing == Framing::Length(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            _ if self.conn.is_none() => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A scripted upstream: each accepted connection answers its requests with the
    /// next of `answers` (whole byte strings), counting connections, and closes after
    /// `per_connection` answers.
    async fn upstream(
        answers: Vec<&'static [u8]>,
        per_connection: usize,
    ) -> (Uri, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base: Uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let answers = Arc::new(answers);
        let next = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                let (answers, next) = (answers.clone(), next.clone());
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    for _ in 0..per_connection {
                        // One request per answer: wait for the end of a head.
                        loop {
                            if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                                seen.drain(..end + 4);
                                break;
                            }
                            let mut buf = [0u8; 4096];
                            match socket.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => seen.extend_from_slice(&buf[..n]),
                            }
                        }
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let answer = answers[i.min(answers.len() - 1)];
                        if socket.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (base, accepted)
    }

    fn get(path: &str) -> Parts {
        http::Request::get(path).body(()).unwrap().into_parts().0
    }

    async fn text(response: Response<Body>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    const SECOND: Duration = Duration::from_secs(1);

    /// [`send_with`] of `head` and `body` alone, for an answer with its fields in
    /// its map.
    async fn send(base: &Uri, head: &Parts, body: &Bytes) -> Result<Response<Body>, WireError> {
        let now = Instant::now();
        send_with(base, head, &[], body, SECOND, None, None, now)
            .await
            .map(|(response, _, _)| response)
    }

    #[tokio::test]
    async fn a_sized_answer_is_read_and_its_connection_reused() {
        let (base, accepted) = upstream(
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello"],
            10,
        )
        .await;
        for lines in [false, true, false] {
            // As a map, or as lines (the length left to the client's server).
            let as_fields = lines.then_some(&[][..]);
            let now = Instant::now();
            let (r, fields, answered) = send_with(
                &base,
                &get("/x?y=1"),
                &[],
                &Bytes::new(),
                SECOND,
                None,
                as_fields,
                now,
            )
            .await
            .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            assert!(answered >= now);
            match fields {
                Some(fields) => {
                    assert!(r.headers().is_empty());
                    assert_eq!(fields.lines, b"x-a: 1\r\n");
                    assert_eq!(http_body::Body::size_hint(r.body()).exact(), Some(5));
                }
                None => assert_eq!(r.headers()["x-a"], "1"),
            }
            assert_eq!(text(r).await, "hello");
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection for three requests"
        );
    }

    #[tokio::test]
    async fn chunked_answers_are_decoded_with_extensions_and_trailers() {
        let (base, accepted) = upstream(
            vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\n"],
            10,
        )
        .await;
        for _ in 0..2 {
            let r = send(&base, &get("/"), &Bytes::new()).await.unwrap();
            assert_eq!(text(r).await, "hello world");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_long_answer_streams() {
        static LONG: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
            let body = vec![b'z'; 200_000];
            let mut a =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
            a.extend_from_slice(&body);
            a
        });
        let (base, _) = upstream(vec![LONG.as_slice()], 10).await;
        let r = send(&base, &get("/"), &Bytes::new()).await.unwrap();
        assert_eq!(http_body::Body::size_hint(r.body()).exact(), Some(200_000));
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 200_000);
        assert!(body.iter().all(|&b| b == b'z'));
    }

    #[tokio::test]
    async fn an_answer_without_length_is_read_until_close() {
        let (base, accepted) = upstream(vec![b"HTTP/1.1 200 OK\r\n\r\nuntil the end"], 1).await;
        for _ in 0..2 {
            let r = send(&base, &get("/"), &Bytes::new()).await.unwrap();
            assert_eq!(text(r).await, "until the end");
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "such a connection is not reused"
        );
    }

    /// The names the lines leave out by their bytes are the ones the map form strips
    /// by `HeaderName` (`proxy::HOP_BY_HOP` and `Upgrade`), in any case.
    #[test]
    fn the_lines_know_every_hop_by_hop_name_the_map_form_strips() {
        for name in crate::proxy::HOP_BY_HOP.iter().chain([&header::UPGRADE]) {
            for spelled in [name.as_str().to_owned(), name.as_str().to_ascii_uppercase()] {
                let special = Special::of(spelled.as_bytes());
                assert!(
                    matches!(
                        special,
                        Some(Special::HopByHop | Special::Connection | Special::TransferEncoding)
                    ),
                    "{spelled}: {special:?}"
                );
            }
        }
    }

    /// An answer's fields as lines: as the upstream wrote them, without framing,
    /// hop-by-hop fields, those `Connection` names and those asked to be left out;
    /// the framing read from them as from a map.
    #[test]
    fn fields_as_lines_leave_out_framing_hop_by_hop_and_replaced_names() {
        let answer =
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: x-secret, keep-alive\r\n\
            X-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: h2c\r\nTrailer: x\r\n\
            Proxy-Authenticate: Basic\r\nProxy-Authorization: x\r\nProxy-Connection: y\r\n\
            Transfer-Encoding: chunked\r\nDate: Sat, 28 Nov 2026 12:00:00 GMT\r\n\
            x-correlation-id: upstream-own\r\nRateLimit: r=1\r\nx-kept:  a b \r\nx-empty:\r\n\r\n\
            5\r\nhello\r\n0\r\n\r\n";
        let replaced = [CORRELATION_ID, HeaderName::from_static("ratelimit")];
        let (head, used) = parse_head(answer, false, Some(&replaced)).unwrap().unwrap();
        assert_eq!(&answer[used..used + 3], b"5\r\n");
        assert!(head.headers.is_empty(), "the map stays empty");
        assert_eq!(head.framing, Framing::Chunked(Chunk::Size));
        // `Connection: keep-alive` on HTTP/1.1 keeps the connection.
        assert!(head.reusable);
        let fields = head.fields.unwrap();
        assert!(fields.dated);
        // Each line as the upstream wrote it, up to the end of its value (an
        // empty value's line is written anew).
        assert_eq!(
            String::from_utf8(fields.lines.clone()).unwrap(),
            "Content-Type: text/plain\r\nDate: Sat, 28 Nov 2026 12:00:00 GMT\r\nx-kept:  a b\r\n\
             x-empty: \r\n"
        );
        // The same fields, for a server that needs a map.
        let mut map = HeaderMap::new();
        fields.into_map(&mut map);
        assert_eq!(map.len(), 4);
        assert_eq!(map["x-kept"], "a b");
        assert_eq!(map["x-empty"], "");

        // A sized answer's length is the client's server's to write; a HEAD
        // answer's describes the representation and stays; `close` is heeded.
        let sized = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";
        let (head, _) = parse_head(sized, false, Some(&[])).unwrap().unwrap();
        assert_eq!(head.framing, Framing::Length(2));
        assert!(!head.reusable);
        assert!(head.fields.unwrap().lines.is_empty());
        let (head, _) = parse_head(sized, true, Some(&[])).unwrap().unwrap();
        assert_eq!(head.framing, Framing::Length(0));
        assert_eq!(head.fields.unwrap().lines, b"content-length: 2\r\n");
        let unchanged = b"HTTP/1.1 304 Not Modified\r\ncontent-length: 2\r\netag: \"a\"\r\n\r\n";
        let (head, _) = parse_head(unchanged, false, Some(&[])).unwrap().unwrap();
        assert_eq!(head.framing, Framing::Length(0));
        assert_eq!(
            head.fields.unwrap().lines,
            b"content-length: 2\r\netag: \"a\"\r\n"
        );

        // What the map form refuses, the lines form refuses too.
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2, 3\r\n\r\nok"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
        ] {
            assert!(parse_head(bad, false, Some(&[])).is_err());
            assert!(parse_head(bad, false, None).is_err());
        }
    }

    #[tokio::test]
    async fn interim_answers_are_skipped_and_head_answers_have_no_body() {
        let (base, _) = upstream(
            vec![
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
            ],
            10,
        )
        .await;
        let mut post = http::Request::post("/orders")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        post.headers
            .insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        let r = send(&base, &post, &Bytes::from_static(b"{}"))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(text(r).await, "ok");

        let (base, _) = upstream(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n"], 10).await;
        let head = http::Request::head("/").body(()).unwrap().into_parts().0;
        let r = send(&base, &head, &Bytes::new()).await.unwrap();
        assert_eq!(r.headers()[header::CONTENT_LENGTH], "99");
        assert_eq!(text(r).await, "");
    }

    #[tokio::test]
    async fn a_pooled_connection_the_upstream_closed_is_replaced() {
        // One answer per connection, but the answer claims keep-alive: the pooled
        // connection is found closed when the next request takes it.
        let (base, accepted) =
            upstream(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"], 1).await;
        for _ in 0..3 {
            let r = send(&base, &get("/"), &Bytes::new()).await.unwrap();
            assert_eq!(text(r).await, "ok");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn malformed_answers_fail_and_refused_connections_are_connect_errors() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
        ] {
            let (base, _) = upstream(vec![bad], 10).await;
            let e = send(&base, &get("/"), &Bytes::new()).await.unwrap_err();
            assert!(!e.is_connect(), "{e}");
        }
        let (base, _) = upstream(
            vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"],
            10,
        )
        .await;
        let r = send(&base, &get("/"), &Bytes::new()).await.unwrap();
        assert!(
            r.into_body().collect().await.is_err(),
            "a bad chunk size fails the body"
        );

        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base: Uri = format!("http://{}", closed.local_addr().unwrap())
            .parse()
            .unwrap();
        drop(closed);
        let e = send(&base, &get("/"), &Bytes::new()).await.unwrap_err();
        assert!(e.is_connect(), "{e}");
    }

    #[tokio::test]
    async fn transfer_codings_and_lengths_are_not_passed_on_wrongly() {
        // Chunked with a Content-Length too: read as chunked, the length dropped,
        // the connection not reused.
        let (base, accepted) = upstream(
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"],
            10,
        )
        .await;
        for _ in 0..2 {
            let r = send(&base, &get("/"), &Bytes::new()).await.unwrap();
            assert!(!r.headers().contains_key(header::CONTENT_LENGTH));
            assert_eq!(text(r).await, "hello");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);

        // A coding the client would need to know of is refused.
        let (base, _) = upstream(
            vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n"],
            10,
        )
        .await;
        assert!(send(&base, &get("/"), &Bytes::new()).await.is_err());

        // A repeated length is passed on once.
        let (base, _) = upstream(
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\nok"],
            10,
        )
        .await;
        let r = send(&base, &get("/"), &Bytes::new()).await.unwrap();
        assert_eq!(r.headers()[header::CONTENT_LENGTH], "2");
        assert_eq!(text(r).await, "ok");
        let lines = Some(&[][..]);
        let (r, fields, _) = send_with(
            &base,
            &get("/"),
            &[],
            &Bytes::new(),
            SECOND,
            None,
            lines,
            Instant::now(),
        )
        .await
        .unwrap();
        assert!(fields.unwrap().lines.is_empty(), "the length is not a line");
        assert_eq!(http_body::Body::size_hint(r.body()).exact(), Some(2));
        assert_eq!(text(r).await, "ok");

        // A 204 that claims a body is not trusted with another request.
        let (base, accepted) = upstream(
            vec![b"HTTP/1.1 204 No Content\r\ncontent-length: 4\r\n\r\njunk"],
            10,
        )
        .await;
        for _ in 0..2 {
            let r = send(&base, &get("/"), &Bytes::new()).await.unwrap();
            assert_eq!(r.status(), StatusCode::NO_CONTENT);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn the_request_head_carries_the_instance_host_and_the_body_length() {
        let mut head = http::Request::post("/a?b=c")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        head.headers
            .insert(header::HOST, HeaderValue::from_static("client.example"));
        head.headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        head.headers.insert("x-one", HeaderValue::from_static("1"));
        head.headers
            .append(header::COOKIE, HeaderValue::from_static("a=1"));
        head.headers
            .append(header::COOKIE, HeaderValue::from_static("b=2"));
        let mut out = Vec::new();
        let added = [
            None,
            Some((
                HeaderName::from_static("x-forwarded-for"),
                HeaderValue::from_static("10.1.1.1"),
            )),
        ];
        encode(
            &mut out,
            &head,
            &added,
            "10.0.0.1:8080",
            &Bytes::from_static(b"{\"n\":12}"),
            None,
            Instant::now(),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /a?b=c HTTP/1.1\r\nhost: 10.0.0.1:8080\r\nx-one: 1\r\nx-forwarded-for: 10.1.1.1\r\ncookie: a=1; b=2\r\ncontent-length: 8\r\n\r\n"
        );
    }

    #[test]
    fn a_context_replaces_the_trace_headers_a_client_sent() {
        let mut head = get("/");
        for (name, value) in [
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            ("x-correlation-id", "forged"),
            ("x-bazaar-deadline", "999999"),
        ] {
            head.headers.insert(name, HeaderValue::from_static(value));
        }
        let mut context = RequestContext::new_root();
        context.correlation_id = "abc-123".into();
        context.deadline = Some(tokio::time::Instant::now() + Duration::from_secs(2));
        let mut out = Vec::new();
        encode(
            &mut out,
            &head,
            &[],
            "10.0.0.1:8080",
            &Bytes::new(),
            Some(&context),
            Instant::now(),
        );
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.split("\r\n").collect();
        let field = |name: &str| {
            let found: Vec<&str> = lines
                .iter()
                .filter_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
                .collect();
            assert_eq!(found.len(), 1, "one {name} in {text}");
            found[0].to_owned()
        };
        assert_eq!(field("x-correlation-id"), "abc-123");
        let left: u64 = field("x-bazaar-deadline").parse().unwrap();
        assert!((1_000..=2_000).contains(&left), "{left}");
        let parent = telemetry::context::TraceContext::parse(&field("traceparent")).unwrap();
        assert_eq!(parent.trace_id, context.trace.trace_id, "the same trace");
        assert_ne!(parent.span_id, context.trace.span_id, "a child span");
    }

    #[test]
    fn chunk_sizes_are_strict() {
        use crate::message::chunk_size;
        assert_eq!(chunk_size(b"1a\r\n"), Some(26));
        assert_eq!(chunk_size(b"5 ;name=value\r\n"), Some(5));
        assert_eq!(chunk_size(b"\r\n"), None);
        assert_eq!(chunk_size(b"5x\r\n"), None);
        assert_eq!(chunk_size(b"fffffffffffffffff\r\n"), None);
    }
}
