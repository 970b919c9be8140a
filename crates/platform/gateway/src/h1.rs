//! The gateway's HTTP/1.1 server, for plain connections and TLS ones alike
//! (HTTP/2 stays with hyper's server).
//!
//! Why our own: the proxy buffers every request body and most answers anyway, so
//! the general machinery of a server (a body channel per request, a dispatcher
//! state machine, an encoder queue) is cost with nothing to carry. Here the
//! connection's task reads a head into the connection's buffer (the short-read rule
//! of [`crate::wire`]), parses it with `httparse`, reads a body whole, calls the
//! handler and writes the answer's head and body in one `writev`, as nginx does.
//!
//! Strict by design (RFC 9112): `Content-Length` together with `Transfer-Encoding`,
//! conflicting or invalid lengths, a coding other than `chunked` last, invalid chunk
//! sizes, obsolete line folding, a missing or repeated `Host` are refused with 400
//! and the connection closed, so nothing smuggled behind a request is ever read as
//! the next one. Heads past the byte or field limits get 431, bodies past the limit
//! 413, clients too slow with a head or body 408.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use chassis::Problem;
use http::header;
use http::{Method, Request, StatusCode, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::message::{self, Chunk, Framing, Head, Refusal, Step, parse};
use crate::wire::{BUFFER, Conn, Fields, Transport, line};

/// The client preface of HTTP/2 with prior knowledge (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection is held to.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Request line plus header fields, in bytes: past it, 431.
    pub max_header_bytes: usize,
    /// Header fields: past it, 431.
    pub max_headers: usize,
    /// A head must arrive whole within this of the wait for it (idle keep-alive
    /// connections included).
    pub header_timeout: Duration,
    /// A body must arrive whole, and an answer be taken by the client, within this.
    pub body_timeout: Duration,
    /// Largest request body, in bytes: past it, 413.
    pub max_body: u64,
}

/// What answers a connection's requests.
pub trait Handler {
    /// `timers` are the connection's, for [`within`]: a handler that sets a
    /// deadline on them leaves them set for the next request. The answer may come
    /// with fields as lines, written after those of its map.
    fn handle(
        &self,
        request: Request<Body>,
        timers: Timers<'_>,
    ) -> impl Future<Output = (Response, Option<Fields>)> + Send;

    /// A request the connection answered itself, refusing it (a malformed or
    /// oversized head or body, a slow client), before the answer is written: for
    /// the handler's access log and metrics. `method` and `path` when the head
    /// was parsed; `elapsed` since the wait for the head began.
    fn refused(
        &self,
        answer: &Response,
        method: Option<&str>,
        path: Option<&str>,
        elapsed: Duration,
    ) {
        let _ = (answer, method, path, elapsed);
    }
}

/// How a connection ended.
pub enum Ended<S> {
    Closed,
    /// The client opened with HTTP/2's preface: the connection, the bytes read
    /// first included, for an HTTP/2 server.
    Http2(Prefixed<S>),
}

/// Serves HTTP/1.1 requests on `stream` (a plain TCP connection, or TLS over one)
/// until the client closes, a request asks for the close, a protocol error or
/// `shutdown` (between requests).
pub async fn serve<S: Transport>(
    stream: S,
    settings: &Settings,
    shutdown: &CancellationToken,
    handler: &impl Handler,
) -> Ended<S> {
    let mut conn = Conn::new(stream);
    let mut first = true;
    // The head deadline's timer, one for the connection (see `read_head`), and the
    // handler's two (see `within`), armed as late as a request's deadline.
    let head_timer = tokio::time::sleep(settings.header_timeout);
    let request_timer = tokio::time::sleep(settings.body_timeout);
    let upstream_timer = tokio::time::sleep(settings.body_timeout);
    tokio::pin!(head_timer, request_timer, upstream_timer);
    loop {
        let started = std::time::Instant::now();
        let head = match read_head(
            &mut conn,
            settings,
            shutdown,
            first,
            head_timer.as_mut(),
            started,
        )
        .await
        {
            Ok(Some(head)) => head,
            Ok(None) => return closed(conn).await,
            Err(Refused::Http2) => {
                let (stream, read) = conn.into_parts();
                return Ended::Http2(Prefixed { read, stream });
            }
            Err(Refused::Answer(problem)) => {
                let answer = problem.into_response();
                handler.refused(&answer, None, None, started.elapsed());
                // Boxed: the rare path would otherwise grow every connection's task.
                Box::pin(refuse(&mut conn, answer, settings)).await;
                return Ended::Closed;
            }
        };
        first = false;
        let exchange = Exchange {
            head_request: head.method == Method::HEAD,
            http11: head.version == Version::HTTP_11,
        };
        let keep_alive = head.keep_alive;
        let body = match read_body(&mut conn, &head, settings).await {
            Ok(body) => body,
            Err(problem) => {
                let answer = problem.into_response();
                let (method, path) = (head.method.as_str(), head.uri.path());
                handler.refused(&answer, Some(method), Some(path), started.elapsed());
                // Boxed: the rare path would otherwise grow every connection's task.
                Box::pin(refuse(&mut conn, answer, settings)).await;
                return Ended::Closed;
            }
        };
        let mut request = Request::new(body);
        *request.method_mut() = head.method;
        *request.uri_mut() = head.uri;
        *request.version_mut() = head.version;
        *request.headers_mut() = head.headers;
        let timers = Timers {
            request: request_timer.as_mut(),
            upstream: upstream_timer.as_mut(),
        };
        let (response, fields) = handler.handle(request, timers).await;
        let keep = keep_alive && !shutdown.is_cancelled();
        match write_response(&mut conn, response, fields, &exchange, keep, settings).await {
            Ok(true) => conn.shrink(),
            Ok(false) | Err(_) => return closed(conn).await,
        }
    }
}

/// Ends a connection that closes without a refusal: over TLS its `close_notify`
/// tells the client the stream ended whole (an answer ended by the close
/// included); a TCP connection is simply dropped.
async fn closed<S: Transport>(mut conn: Conn<S>) -> Ended<S> {
    conn.stream.finish().await;
    Ended::Closed
}

/// A connection's timers lent to the handler of one request: one for the whole
/// request, one for the upstream calls it makes.
pub struct Timers<'a> {
    pub request: Pin<&'a mut tokio::time::Sleep>,
    pub upstream: Pin<&'a mut tokio::time::Sleep>,
}

/// Runs `work` until `at`, timed by `timer`: one of a connection's, left where the
/// request before set it. A request's deadline is a fixed time after its start, so
/// it lies later than the last one's: the timer is moved only when it fires early
/// (once per timeout on a busy connection), or when `at` is earlier than it (a
/// client's own shorter deadline). A timer set and cleared for every request cost
/// about 500 instructions of the timer wheel's. `None` when `at` passed first.
///
/// `work` comes pinned by the caller: a future taken by value is moved into this
/// one's state, a copy of its whole size. Without a lent `timer` (HTTP/2, an
/// aggregated part), `work` gets a timeout of its own.
pub async fn within<F: Future>(
    at: Instant,
    timer: Option<Pin<&mut tokio::time::Sleep>>,
    mut work: Pin<&mut F>,
) -> Option<F::Output> {
    let Some(mut timer) = timer else {
        return tokio::time::timeout_at(at, work).await.ok();
    };
    if timer.deadline() > at {
        timer.as_mut().reset(at);
    }
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        while timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= at {
                return Poll::Ready(None);
            }
            timer.as_mut().reset(at);
        }
        Poll::Pending
    })
    .await
}

/// One request as it bears on its answer.
struct Exchange {
    head_request: bool,
    http11: bool,
}

enum Refused {
    /// Answered with this problem, then closed.
    Answer(Box<Problem>),
    /// Not HTTP/1 at all: HTTP/2 with prior knowledge.
    Http2,
}

impl From<Refusal> for Refused {
    fn from(r: Refusal) -> Self {
        Refused::Answer(Box::new(
            Problem::new(r.status, r.slug, r.title).with_detail(r.detail),
        ))
    }
}

fn too_large_head(max_header_bytes: usize) -> Refused {
    message::too_large_head(format!("the request head is over {max_header_bytes} bytes")).into()
}

fn timed_out(what: &str, after: Duration) -> Problem {
    Problem::new(
        StatusCode::REQUEST_TIMEOUT,
        "request-timeout",
        "Request timeout",
    )
    .with_detail(format!(
        "the request's {what} did not arrive within {after:?}"
    ))
}

/// Waits for the next request head: `None` when the client closed or went quiet
/// between requests, or on shutdown.
///
/// `timer` is the connection's, and may be set for an earlier deadline than this
/// head's: when it fires early it is moved to this one. Setting a timer for every
/// head registered it in tokio's wheel and took it out again on every request of a
/// keep-alive connection; this way a busy connection moves its timer once per
/// `header_timeout` (nginx's lazy timer updates, `ngx_event_timer` with a
/// threshold, save the same work).
async fn read_head<S: Transport>(
    conn: &mut Conn<S>,
    settings: &Settings,
    shutdown: &CancellationToken,
    first: bool,
    mut timer: Pin<&mut tokio::time::Sleep>,
    waiting_since: std::time::Instant,
) -> Result<Option<Head>, Refused> {
    let deadline = Instant::from_std(waiting_since) + settings.header_timeout;
    loop {
        let pending = conn.pending();
        // A connection's first bytes may be HTTP/2's preface, read whole first.
        let n = pending.len().min(PREFACE.len());
        let preface = first && n > 0 && pending[..n] == PREFACE[..n];
        if preface && n == PREFACE.len() {
            return Err(Refused::Http2);
        }
        if !preface
            && !pending.is_empty()
            && let Some((head, used)) =
                parse(pending, settings.max_header_bytes, settings.max_headers)?
        {
            conn.consume(used);
            return Ok(Some(head));
        }
        if conn.pending().len() >= settings.max_header_bytes {
            return Err(too_large_head(settings.max_header_bytes));
        }
        let idle = conn.pending().is_empty();
        let filled = tokio::select! {
            biased;
            () = shutdown.cancelled(), if idle => return Ok(None),
            filled = conn.fill(settings.max_header_bytes.max(BUFFER)) => filled,
            () = timer.as_mut() => {
                if Instant::now() < deadline {
                    timer.as_mut().reset(deadline);
                    continue;
                }
                // A connection quiet between requests is closed quietly; one that
                // started a head and stalled is told why.
                if conn.pending().is_empty() {
                    return Ok(None);
                }
                return Err(Refused::Answer(Box::new(timed_out(
                    "head",
                    settings.header_timeout,
                ))));
            }
        };
        match filled {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            // (The buffer cannot fill up: a head reaching the limit is refused
            // above.)
            Err(_) => return Ok(None),
        }
    }
}

/// The body, read whole within the body deadline.
async fn read_body<S: Transport>(
    conn: &mut Conn<S>,
    head: &Head,
    settings: &Settings,
) -> Result<Body, Problem> {
    if head.framing == Framing::Length(0) {
        return Ok(Body::empty());
    }
    if let Framing::Length(n) = head.framing
        && n > settings.max_body
    {
        return Err(crate::proxy::body_too_large(settings.max_body));
    }
    if head.expect_continue && conn.pending().is_empty() {
        write(conn, b"HTTP/1.1 100 Continue\r\n\r\n", b"", settings)
            .await
            .map_err(|_| Problem::bad_request("the client stopped reading"))?;
    }
    let read = async {
        match head.framing {
            Framing::Length(n) => read_sized(conn, n).await,
            Framing::Chunked => read_chunked(conn, settings.max_body).await,
        }
    };
    match tokio::time::timeout(settings.body_timeout, read).await {
        Ok(result) => result.map(Body::from),
        Err(_) => Err(timed_out("body", settings.body_timeout)),
    }
}

async fn read_sized<S: Transport>(conn: &mut Conn<S>, n: u64) -> Result<Bytes, Problem> {
    let n = usize::try_from(n).map_err(|_| Problem::bad_request("Content-Length is too large"))?;
    if conn.pending().len() >= n {
        return Ok(conn.take(n as u64));
    }
    // Reserved whole, but zeroed (the crate forbids `unsafe`) only a step ahead
    // of what arrived: a client that declares a large body and sends it slowly
    // does not make the gateway touch all of its memory at once.
    const STEP: usize = 64 * 1024;
    let mut body = BytesMut::with_capacity(n);
    body.extend_from_slice(conn.pending());
    conn.consume(body.len());
    while body.len() < n {
        let got = body.len();
        body.resize(got + (n - got).min(STEP), 0);
        match conn.read_into(&mut body[got..]).await {
            Ok(0) | Err(_) => return Err(cut_short()),
            Ok(read) => body.truncate(got + read),
        }
    }
    Ok(body.freeze())
}

fn cut_short() -> Problem {
    Problem::bad_request("the request body was cut short")
}

async fn read_chunked<S: Transport>(conn: &mut Conn<S>, max_body: u64) -> Result<Bytes, Problem> {
    let mut body = BytesMut::new();
    let mut chunk = Chunk::Size;
    loop {
        match chunk.step(conn.pending()) {
            Step::Data(n) => {
                if (body.len() + n) as u64 > max_body {
                    return Err(crate::proxy::body_too_large(max_body));
                }
                body.put_slice(&conn.pending()[..n]);
                conn.consume(n);
                continue;
            }
            Step::Framing(n) => {
                conn.consume(n);
                continue;
            }
            Step::End(n) => {
                conn.consume(n);
                return Ok(body.freeze());
            }
            Step::More => {}
            Step::Invalid(what) => {
                return Err(Problem::bad_request(format!(
                    "the request body is malformed: the client sent {what}"
                )));
            }
        }
        match conn.fill(BUFFER.max(crate::message::MAX_LINE * 2)).await {
            Ok(0) | Err(_) => return Err(cut_short()),
            Ok(_) => {}
        }
    }
}

/// Sends `answer`, then closes without cutting the answer off: whatever
/// the client still sends is read and dropped for a moment first (nginx's
/// lingering close), since closing on unread bytes resets the connection, and a
/// reset can destroy the answer before the client reads it.
async fn refuse<S: Transport>(conn: &mut Conn<S>, answer: Response, settings: &Settings) {
    let exchange = Exchange {
        head_request: false,
        http11: true,
    };
    if write_response(conn, answer, None, &exchange, false, settings)
        .await
        .is_err()
    {
        return;
    }
    let linger = async {
        // Inside the deadline: over TLS it writes, to a client that may not read.
        conn.stream.shutdown_write().await;
        let mut drained = 0usize;
        let mut sink = vec![0u8; 4096];
        // At most a few megabytes: a client that keeps sending is cut off.
        while drained < 4 << 20 {
            match conn.read_into(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => drained += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), linger).await;
}

/// Writes `response`, `fields` after its map's; `Ok(false)` when the connection
/// must close after it.
async fn write_response<S: Transport>(
    conn: &mut Conn<S>,
    response: Response,
    fields: Option<Fields>,
    exchange: &Exchange,
    mut keep: bool,
    settings: &Settings,
) -> io::Result<bool> {
    let (parts, mut body) = response.into_parts();
    let status = parts.status;
    let bodiless = exchange.head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let length = body.size_hint().exact();
    let chunked = !bodiless && length.is_none() && exchange.http11;
    // An HTTP/1.0 client learns where a body of unknown length ends by the close.
    if !bodiless && length.is_none() && !exchange.http11 {
        keep = false;
    }
    let mut out = std::mem::take(&mut conn.out);
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut dated = false;
    for (name, value) in &parts.headers {
        // Framing and connection handling are this connection's; a HEAD or 304
        // answer's Content-Length describes the representation and stays.
        if *name == header::TRANSFER_ENCODING
            || *name == header::CONNECTION
            || (*name == header::CONTENT_LENGTH
                && !(exchange.head_request || status == StatusCode::NOT_MODIFIED))
        {
            continue;
        }
        dated |= *name == header::DATE;
        line(&mut out, name.as_str(), value.as_bytes());
    }
    crate::message::recycle(parts.headers);
    if let Some(fields) = fields {
        out.extend_from_slice(&fields.lines);
        dated |= fields.dated;
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        date(&mut out);
        out.extend_from_slice(b"\r\n");
    }
    if !bodiless {
        match length {
            Some(n) => line(
                &mut out,
                "content-length",
                itoa::Buffer::new().format(n).as_bytes(),
            ),
            None if chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            None => {}
        }
    }
    match (keep, exchange.http11) {
        (false, _) => out.extend_from_slice(b"connection: close\r\n"),
        (true, false) => out.extend_from_slice(b"connection: keep-alive\r\n"),
        (true, true) => {}
    }
    out.extend_from_slice(b"\r\n");
    let result = write_body(conn, &out, &mut body, bodiless, chunked, settings).await;
    conn.out = out;
    result.map(|complete| keep && complete)
}

/// Writes the head in `out`, then the body: the head and a whole body in one
/// `writev`. `Ok(false)` when the body failed midway (the answer is cut short, so
/// the connection must close).
async fn write_body<S: Transport>(
    conn: &mut Conn<S>,
    head: &[u8],
    body: &mut Body,
    bodiless: bool,
    chunked: bool,
    settings: &Settings,
) -> io::Result<bool> {
    if bodiless {
        return write(conn, head, b"", settings).await.map(|()| true);
    }
    let mut head = Some(head);
    // A chunk's closing CRLF goes out with what follows it.
    let mut owed_crlf = false;
    loop {
        let data = match body.frame().await {
            None => break,
            Some(Err(_)) => {
                if let Some(head) = head {
                    write(conn, head, b"", settings).await?;
                }
                return Ok(false);
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                // Trailers and empty frames carry nothing to send.
                _ => continue,
            },
        };
        match chunked {
            false => write(conn, head.take().unwrap_or_default(), &data, settings).await?,
            true => {
                let framed = chunk_framing(head.take(), owed_crlf, Some(data.len()));
                write(conn, &framed, &data, settings).await?;
                owed_crlf = true;
            }
        }
    }
    match (head, chunked) {
        (head, true) => write(conn, &chunk_framing(head, owed_crlf, None), b"", settings).await?,
        (Some(head), false) => write(conn, head, b"", settings).await?,
        (None, false) => {}
    }
    Ok(true)
}

/// What goes out before a chunk of `size` bytes (`None`: the last, empty one):
/// the head if not yet written, the previous chunk's CRLF, the size line.
fn chunk_framing(head: Option<&[u8]>, owed_crlf: bool, size: Option<usize>) -> Vec<u8> {
    let mut framed = head.map(<[u8]>::to_vec).unwrap_or_default();
    if owed_crlf {
        framed.extend_from_slice(b"\r\n");
    }
    match size {
        Some(n) => framed.extend_from_slice(format!("{n:x}\r\n").as_bytes()),
        None => framed.extend_from_slice(b"0\r\n\r\n"),
    }
    framed
}

/// Writes `head` then `body`, held to the body deadline (a client that stops
/// reading cannot hold the connection forever).
async fn write<S: Transport>(
    conn: &mut Conn<S>,
    head: &[u8],
    body: &[u8],
    settings: &Settings,
) -> io::Result<()> {
    // Pinned where it is made: moved into the timeout, the send future was copied
    // on every answer.
    let send = std::pin::pin!(conn.stream.send(head, body));
    match tokio::time::timeout(settings.body_timeout, send).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

thread_local! {
    /// `Date` as last formatted, and the second it is for.
    static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
}

/// Appends the current `Date` (RFC 9110 §6.6.1), formatted once a second per thread.
fn date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != second || text.is_empty() {
            *at = second;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(text.as_bytes());
    });
}

/// A connection whose first bytes were already read: they are read again first.
pub struct Prefixed<S> {
    read: Bytes,
    stream: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            let first = self.read.split_to(n);
            buf.put_slice(&first);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_timer_that_fires_early_is_moved_to_the_deadline() {
        // Left by an earlier request at 10 ms; this request may take 2 s.
        let timer = std::pin::pin!(tokio::time::sleep(Duration::from_millis(10)));
        let at = Instant::now() + Duration::from_secs(2);
        let work = std::pin::pin!(async {
            tokio::time::sleep(Duration::from_millis(60)).await;
            7
        });
        assert_eq!(within(at, Some(timer), work).await, Some(7));
    }

    #[tokio::test]
    async fn work_past_the_deadline_is_cut_off_there() {
        let mut timer = std::pin::pin!(tokio::time::sleep(Duration::from_millis(10)));
        let started = Instant::now();
        let at = started + Duration::from_millis(80);
        let work = std::pin::pin!(std::future::pending::<()>());
        assert_eq!(within(at, Some(timer.as_mut()), work).await, None);
        assert!(started.elapsed() >= Duration::from_millis(80));
        // The timer stays where the deadline put it, for the next request.
        assert_eq!(timer.deadline(), at);
    }

    #[tokio::test]
    async fn without_a_lent_timer_the_deadline_holds_all_the_same() {
        let started = Instant::now();
        let at = started + Duration::from_millis(50);
        let done = std::pin::pin!(async { 7 });
        assert_eq!(within(at, None, done).await, Some(7));
        let work = std::pin::pin!(std::future::pending::<()>());
        assert_eq!(within(at, None, work).await, None);
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn a_deadline_earlier_than_the_timer_moves_it_back() {
        // A client's own deadline, shorter than the connection's timeout.
        let timer = std::pin::pin!(tokio::time::sleep(Duration::from_secs(30)));
        let started = Instant::now();
        let at = started + Duration::from_millis(50);
        let work = std::pin::pin!(std::future::pending::<()>());
        assert_eq!(within(at, Some(timer), work).await, None);
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
