//! Correlation id and W3C `traceparent`, taken from an incoming request or generated,
//! and propagated on outgoing calls.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::time::Instant;

/// Header carrying the correlation id end to end.
pub const CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");
/// W3C Trace Context header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// The time the caller still waits for this request, in milliseconds. Relative (like
/// gRPC's `grpc-timeout`), so clocks need not agree.
pub const DEADLINE: HeaderName = HeaderName::from_static("x-bazaar-deadline");
/// Longest deadline honoured from a header: beyond it the value is a mistake.
const MAX_DEADLINE: Duration = Duration::from_secs(3600);
/// Longest correlation id accepted from a client; longer ones are replaced, because an
/// unbounded value would let a client bloat every log line.
const MAX_CORRELATION_ID_LEN: usize = 128;

/// A W3C trace context (version 00): trace id, this hop's span id, and flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceContext {
    /// A new trace, sampled.
    pub fn new_root() -> Self {
        // Ids need to be unique, not unguessable: a thread-local wyrand costs a few
        // instructions where the cryptographic generator cost hundreds per request.
        let mut trace_id = fastrand::u128(..).to_be_bytes();
        if trace_id == [0; 16] {
            trace_id[15] = 1;
        }
        Self {
            trace_id,
            span_id: new_span_id(),
            flags: 0x01,
        }
    }

    /// The context for a call made from this one: same trace, a new span id.
    pub fn child(&self) -> Self {
        Self {
            span_id: new_span_id(),
            ..*self
        }
    }

    /// Parses a `traceparent` header value per W3C Trace Context level 1; `None` for
    /// anything malformed, in which case the caller starts a new trace.
    pub fn parse(value: &str) -> Option<Self> {
        let parts: Vec<&str> = value.trim().split('-').collect();
        if parts.len() < 4 {
            return None;
        }
        let version = decode_hex::<1>(parts[0])?[0];
        // Version ff is forbidden; version 00 has exactly four fields. Higher versions
        // may append fields, which we ignore as the spec asks.
        if version == 0xff || (version == 0 && parts.len() != 4) {
            return None;
        }
        let trace_id = decode_hex::<16>(parts[1])?;
        let span_id = decode_hex::<8>(parts[2])?;
        let flags = decode_hex::<1>(parts[3])?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    pub fn trace_id_hex(&self) -> String {
        encode_hex(&self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        encode_hex(&self.span_id)
    }

    /// The `traceparent` header value for this context.
    pub fn to_header(&self) -> String {
        String::from_utf8_lossy(&self.traceparent()).into_owned()
    }

    /// The `traceparent` value as bytes, on the stack: the gateway makes a header
    /// value of it on every request, and a `String` on the way would be one more
    /// allocation and a UTF-8 check.
    pub fn traceparent(&self) -> [u8; 55] {
        let mut out = [b'-'; 55];
        out[..2].copy_from_slice(b"00");
        hex_into(&self.trace_id, &mut out[3..35]);
        hex_into(&self.span_id, &mut out[36..52]);
        hex_into(&[self.flags], &mut out[53..]);
        out
    }

    /// The trace id in hex, on the stack.
    pub fn trace_id_bytes(&self) -> [u8; 32] {
        let mut out = [0; 32];
        hex_into(&self.trace_id, &mut out);
        out
    }
}

fn new_span_id() -> [u8; 8] {
    let mut id = fastrand::u64(..).to_be_bytes();
    if id == [0; 8] {
        id[7] = 1;
    }
    id
}

fn decode_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    // Upper-case hex is invalid in traceparent.
    if s.len() != N * 2
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

fn encode_hex(bytes: &[u8]) -> String {
    let mut hex = vec![0; bytes.len() * 2];
    hex_into(bytes, &mut hex);
    String::from_utf8(hex).unwrap_or_default()
}

/// Each byte's two lowercase hex digits: one lookup a byte where splitting it into
/// nibbles took two (trace ids are written twice a proxied request).
const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut table = [[0u8; 2]; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = [DIGITS[b >> 4], DIGITS[b & 0x0f]];
        b += 1;
    }
    table
};

/// Lowercase hex of `bytes` into `out`, which is twice as long.
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(b)]);
    }
}

/// What one request carries across every hop.
#[derive(Clone, Debug)]
pub struct RequestContext {
    pub correlation_id: Arc<str>,
    /// This hop's trace context (the incoming parent's trace id, a new span id).
    pub trace: TraceContext,
    /// When the caller stops waiting: work past it is wasted.
    pub deadline: Option<Instant>,
}

impl RequestContext {
    /// Takes the correlation id and trace from incoming headers, generating what is
    /// missing or malformed.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        // One pass over the few headers a request has, taking each name's first
        // value as `get` would: three lookups hashed three names every request.
        let (mut correlation, mut parent, mut deadline) = (None, None, None);
        for (name, value) in headers {
            if *name == CORRELATION_ID {
                correlation = correlation.or(Some(value));
            } else if *name == TRACEPARENT {
                parent = parent.or(Some(value));
            } else if *name == DEADLINE {
                deadline = deadline.or(Some(value));
            }
        }
        let correlation_id = correlation
            .and_then(|v| v.to_str().ok())
            .filter(|v| valid_correlation_id(v))
            .map(Arc::from)
            .unwrap_or_else(new_correlation_id);
        let trace = parent
            .and_then(|v| v.to_str().ok())
            .and_then(TraceContext::parse)
            .map(|parent| parent.child())
            .unwrap_or_else(TraceContext::new_root);
        let deadline = deadline
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|ms| Instant::now() + Duration::from_millis(ms).min(MAX_DEADLINE));
        Self {
            correlation_id,
            trace,
            deadline,
        }
    }

    /// Tightens the deadline to at most `limit` from now (a service's own timeout).
    pub fn with_deadline_within(self, limit: Duration) -> Self {
        self.with_deadline_by(Instant::now() + limit)
    }

    /// Tightens the deadline to `at` at the latest (for a caller that has just read
    /// the clock).
    pub fn with_deadline_by(mut self, at: Instant) -> Self {
        self.deadline = Some(self.deadline.map_or(at, |d| d.min(at)));
        self
    }

    /// Time left before the deadline, if there is one.
    pub fn remaining(&self) -> Option<Duration> {
        self.remaining_at(Instant::now())
    }

    /// Time left before the deadline as of `now`, if there is one.
    pub fn remaining_at(&self, now: Instant) -> Option<Duration> {
        self.deadline.map(|d| d.saturating_duration_since(now))
    }

    /// A context for work not started by a request (startup, background jobs).
    pub fn new_root() -> Self {
        Self {
            correlation_id: new_correlation_id(),
            trace: TraceContext::new_root(),
            deadline: None,
        }
    }

    /// Writes the correlation id, a child `traceparent` and the time left into
    /// outgoing headers.
    pub fn inject(&self, headers: &mut HeaderMap) {
        self.outgoing(|name, value| {
            if let Ok(v) = HeaderValue::from_bytes(value) {
                headers.insert(name.clone(), v);
            }
        });
    }

    /// Hands `put` each header an outgoing request carries for this context: the
    /// time left in whole milliseconds, the correlation id (of the conservative
    /// alphabet: one set by hand is checked again, as it goes into a head as it is)
    /// and a child `traceparent`. [`RequestContext::inject`] puts them in a header
    /// map; a client writing its own request heads writes them straight in.
    pub fn outgoing(&self, put: impl FnMut(&HeaderName, &[u8])) {
        self.outgoing_at(Instant::now(), put);
    }

    /// [`RequestContext::outgoing`], with the time left counted from `now` (a
    /// caller that has just read the clock saves a reading).
    pub fn outgoing_at(&self, now: Instant, mut put: impl FnMut(&HeaderName, &[u8])) {
        if let Some(left) = self.remaining_at(now) {
            let millis = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
            put(&DEADLINE, itoa::Buffer::new().format(millis).as_bytes());
        }
        if valid_correlation_id(&self.correlation_id) {
            put(&CORRELATION_ID, self.correlation_id.as_bytes());
        }
        put(&TRACEPARENT, &self.trace.child().traceparent());
    }
}

/// A UUIDv7 (time-ordered, so ids sort by when requests came in), its random bits
/// from the same thread-local generator as trace ids.
fn new_correlation_id() -> Arc<str> {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let random = fastrand::u128(..).to_be_bytes();
    let mut rand_bytes = [0u8; 10];
    rand_bytes.copy_from_slice(&random[..10]);
    let id = uuid::Builder::from_unix_timestamp_millis(millis, &rand_bytes).into_uuid();
    let mut buf = uuid::Uuid::encode_buffer();
    Arc::from(&*id.hyphenated().encode_lower(&mut buf))
}

/// Writes the deadline header: `left`, in whole milliseconds.
pub fn set_deadline(headers: &mut HeaderMap, left: Duration) {
    headers.insert(
        DEADLINE,
        HeaderValue::from(u64::try_from(left.as_millis()).unwrap_or(u64::MAX)),
    );
}

/// Correlation ids are echoed into logs and headers, so only a conservative alphabet
/// is accepted: no spaces, quotes or control characters that could forge log fields.
pub fn valid_correlation_id(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_CORRELATION_ID_LEN
        && v.bytes().all(|b| ID_BYTES[usize::from(b)])
}

/// The bytes a correlation id may hold, as a table: the id is checked on every
/// outgoing request, and testing each byte against the list of symbols cost more
/// than the rest of the header's writing.
const ID_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(c, b'-' | b'_' | b'.' | b':' | b'/' | b'+' | b'=' | b'@');
        b += 1;
    }
    table
};

tokio::task_local! {
    static CURRENT: RequestContext;
}

/// The context of the request this task is serving, if any.
pub fn current() -> Option<RequestContext> {
    CURRENT.try_with(Clone::clone).ok()
}

/// Runs `fut` with `ctx` as the current request context.
pub async fn scope<F: Future>(ctx: RequestContext, fut: F) -> F::Output {
    CURRENT.scope(ctx, fut).await
}

/// Injects the current context (or a fresh root one) into outgoing headers.
pub fn inject_current(headers: &mut HeaderMap) {
    current()
        .unwrap_or_else(RequestContext::new_root)
        .inject(headers);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_children_keep_the_trace() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tc = TraceContext::parse(v).unwrap();
        assert_eq!(tc.to_header(), v);
        let child = tc.child();
        assert_eq!(child.trace_id, tc.trace_id);
        assert_ne!(child.span_id, tc.span_id);
    }

    #[test]
    fn malformed_traceparents_are_rejected() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad:?} accepted");
        }
        // A future version may carry more fields.
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz")
                .is_some()
        );
    }

    #[test]
    fn correlation_id_is_kept_when_safe_and_replaced_otherwise() {
        let mut h = HeaderMap::new();
        h.insert(CORRELATION_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(&*RequestContext::from_headers(&h).correlation_id, "abc-123");
        h.insert(
            CORRELATION_ID,
            HeaderValue::from_static("evil\" level=\"error"),
        );
        let ctx = RequestContext::from_headers(&h);
        assert_ne!(&*ctx.correlation_id, "evil\" level=\"error");
        assert!(valid_correlation_id(&ctx.correlation_id));
    }

    /// The tables hold exactly the alphabet and digits they stand for.
    #[test]
    fn every_byte_is_judged_and_written_as_the_rules_say() {
        for b in 0..=255u8 {
            let allowed = b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(&b);
            let id = format!("a{}b", b as char);
            assert_eq!(
                valid_correlation_id(&id),
                allowed && b.is_ascii(),
                "byte {b:#04x}"
            );
            let mut hex = [0u8; 2];
            hex_into(&[b], &mut hex);
            assert_eq!(&hex, format!("{b:02x}").as_bytes());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_are_read_tightened_and_passed_on_as_time_left() {
        let mut h = HeaderMap::new();
        h.insert(DEADLINE, HeaderValue::from_static("800"));
        let ctx = RequestContext::from_headers(&h).with_deadline_within(Duration::from_secs(2));
        assert_eq!(
            ctx.remaining(),
            Some(Duration::from_millis(800)),
            "the caller's is tighter"
        );
        tokio::time::advance(Duration::from_millis(300)).await;
        let mut out = HeaderMap::new();
        ctx.inject(&mut out);
        assert_eq!(out[&DEADLINE], "500");
        let own = RequestContext::from_headers(&HeaderMap::new())
            .with_deadline_within(Duration::from_secs(2));
        assert_eq!(own.remaining(), Some(Duration::from_secs(2)));
        h.insert(DEADLINE, HeaderValue::from_static("soon"));
        assert_eq!(
            RequestContext::from_headers(&h).deadline,
            None,
            "garbage is ignored"
        );
    }

    #[tokio::test]
    async fn inject_uses_the_scoped_context() {
        let ctx = RequestContext::new_root();
        let id = ctx.correlation_id.clone();
        let trace = ctx.trace.trace_id_hex();
        let headers = scope(ctx, async {
            let mut h = HeaderMap::new();
            inject_current(&mut h);
            h
        })
        .await;
        assert_eq!(headers[&CORRELATION_ID], &*id);
        let tp = TraceContext::parse(headers[&TRACEPARENT].to_str().unwrap()).unwrap();
        assert_eq!(tp.trace_id_hex(), trace);
    }
}
