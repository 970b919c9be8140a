//! HTTP/1.1 message framing shared by the gateway's server ([`crate::h1`]) and its
//! upstream client ([`crate::wire`]): the request-head parser and the chunked
//! decoder. Pure (httparse, http, bytes), so the fuzz target compiles this file alone.

use std::mem::MaybeUninit;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode, Uri, Version};

/// A chunk-size line or trailer line longer than this is refused.
pub const MAX_LINE: usize = 4 * 1024;
/// Header slots on the stack; a larger configured limit takes them from the heap.
const INLINE_HEADERS: usize = 128;

/// Why a request head is refused: the answer's status, problem type and title, and
/// what was wrong.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub slug: &'static str,
    pub title: &'static str,
    pub detail: String,
}

fn bad_request(detail: impl Into<String>) -> Refusal {
    Refusal {
        status: StatusCode::BAD_REQUEST,
        slug: "bad-request",
        title: "Bad request",
        detail: detail.into(),
    }
}

pub fn too_large_head(detail: impl Into<String>) -> Refusal {
    Refusal {
        status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        slug: "header-fields-too-large",
        title: "Request header fields too large",
        detail: detail.into(),
    }
}

/// A parsed request head.
pub struct Head {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    pub keep_alive: bool,
    pub expect_continue: bool,
}

/// How a request's body ends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Framing {
    Length(u64),
    Chunked,
}

/// Headers a proxy typically adds to a message it forwards (`X-Forwarded-*`,
/// `traceparent`, the correlation id and deadline, an identity, rate-limit state).
pub const ADDED_HEADERS: usize = 8;

thread_local! {
    /// Header maps of messages already written, cleared, for the next messages
    /// parsed on this thread: a map is two allocations (its index and its
    /// entries), and a proxied request made and freed two maps.
    static MAPS: std::cell::RefCell<Vec<HeaderMap>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// At most this many maps wait per thread (about 1 KiB each).
const POOLED_MAPS: usize = 32;
/// Maps with room for fewer fields than this (made small elsewhere) or more (grown
/// for a crowd of headers) are freed rather than kept.
const POOLED_CAPACITY: std::ops::RangeInclusive<usize> = ADDED_HEADERS + 4..=64;

/// An empty header map with room for `fields` and what a proxy adds: one given
/// back by [`recycle`] when there is one.
pub fn header_map(fields: usize) -> HeaderMap {
    let wanted = fields + ADDED_HEADERS;
    MAPS.try_with(|maps| maps.try_borrow_mut().ok()?.pop())
        .ok()
        .flatten()
        .filter(|map| map.capacity() >= wanted)
        .unwrap_or_else(|| HeaderMap::with_capacity(wanted))
}

/// Gives back the map of a message that has been written, for [`header_map`].
pub fn recycle(mut map: HeaderMap) {
    if !POOLED_CAPACITY.contains(&map.capacity()) {
        return;
    }
    map.clear();
    let _ = MAPS.try_with(|maps| {
        if let Ok(mut maps) = maps.try_borrow_mut()
            && maps.len() < POOLED_MAPS
        {
            maps.push(map);
        }
    });
}

/// A head from the start of `bytes`, with the bytes it took; `None` until complete.
pub fn parse(
    bytes: &[u8],
    max_header_bytes: usize,
    max_headers: usize,
) -> Result<Option<(Head, usize)>, Refusal> {
    let mut inline = [MaybeUninit::<httparse::Header<'_>>::uninit(); INLINE_HEADERS];
    let mut heap;
    let slots = match max_headers <= INLINE_HEADERS {
        true => &mut inline[..max_headers],
        false => {
            heap = vec![MaybeUninit::uninit(); max_headers];
            &mut heap[..]
        }
    };
    let mut parsed = httparse::Request::new(&mut []);
    let used = match parsed.parse_with_uninit_headers(bytes, slots) {
        // A whole head may arrive in one read past the limit.
        Ok(httparse::Status::Complete(n)) if n > max_header_bytes => {
            return Err(too_large_head(format!(
                "the request head is over {} bytes",
                max_header_bytes
            )));
        }
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(too_large_head(format!(
                "the request has more than {} header fields",
                max_headers
            )));
        }
        Err(e) => return Err(bad_request(format!("the request head is malformed: {e}"))),
    };
    let method = parsed
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .ok_or_else(|| bad_request("the request method is invalid"))?;
    // The head is copied once, and the target and each value share that copy: a
    // copy each cost an allocation, and cloning one (the proxy clones the URI and
    // `Host`) another, to share it.
    let block = Bytes::copy_from_slice(&bytes[..used]);
    let shared = |part: &[u8]| {
        let at = (part.as_ptr() as usize).wrapping_sub(bytes.as_ptr() as usize);
        match at.checked_add(part.len()) {
            Some(end) if !part.is_empty() && end <= block.len() => block.slice(at..end),
            // (The parser's slices all lie in the head; an empty one may not.)
            _ => Bytes::copy_from_slice(part),
        }
    };
    let uri = parsed
        .path
        .and_then(|p| Uri::from_maybe_shared(shared(p.as_bytes())).ok())
        .ok_or_else(|| bad_request("the request target is not a valid URI"))?;
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    // Room for what the proxy adds on the way up (forwarding, trace and deadline
    // headers): growing a header map rehashes it, several times a request.
    let mut headers = header_map(parsed.headers.len());
    // Framing fields are read once all are in (they may repeat); the others as
    // they come.
    let (mut sized, mut coded) = (false, false);
    let (mut hosts, mut close, mut keep_alive, mut expect_continue) = (0, false, false, false);
    for field in parsed.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| bad_request(format!("`{}` is not a valid field name", field.name)))?;
        let value = HeaderValue::from_maybe_shared(shared(field.value))
            .map_err(|_| bad_request(format!("the value of `{}` is invalid", field.name)))?;
        if name == header::CONTENT_LENGTH {
            sized = true;
        } else if name == header::TRANSFER_ENCODING {
            coded = true;
        } else if name == header::HOST {
            hosts += 1;
        } else if name == header::CONNECTION {
            close |= has_token([&value], "close");
            keep_alive |= has_token([&value], "keep-alive");
        } else if name == header::EXPECT {
            expect_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
        }
        headers.append(name, value);
    }
    let length = match sized {
        false => None,
        true => Some(
            content_length(headers.get_all(header::CONTENT_LENGTH)).map_err(|e| {
                bad_request(match e {
                    BadLength::Invalid => "Content-Length is not a number",
                    BadLength::Conflicting => "the request carries conflicting Content-Lengths",
                })
            })?,
        ),
    };
    let codings = match coded {
        false => None,
        true => Some(
            transfer_codings(headers.get_all(header::TRANSFER_ENCODING))
                .ok_or_else(|| bad_request("Transfer-Encoding is invalid"))?,
        ),
    };
    if version == Version::HTTP_11 && hosts == 0 {
        return Err(bad_request("an HTTP/1.1 request must carry Host"));
    }
    if hosts > 1 {
        return Err(bad_request("the request carries Host more than once"));
    }
    let framing = match codings {
        None => Framing::Length(length.unwrap_or(0)),
        Some(_) if version == Version::HTTP_10 => {
            return Err(bad_request(
                "an HTTP/1.0 request cannot carry Transfer-Encoding",
            ));
        }
        // Two framings are how requests are smuggled (RFC 9112 §6.1): refused,
        // whichever comes first.
        Some(_) if length.is_some() => {
            return Err(bad_request(
                "the request carries both Content-Length and Transfer-Encoding; send one",
            ));
        }
        Some(codings) => transfer_coding(&codings)?,
    };
    let keep_alive = match version {
        Version::HTTP_11 => !close,
        _ => keep_alive && !close,
    };
    let head = Head {
        method,
        uri,
        version,
        headers,
        framing,
        keep_alive,
        expect_continue: expect_continue && version == Version::HTTP_11,
    };
    Ok(Some((head, used)))
}

/// Why a `Content-Length` cannot be taken.
#[derive(Debug, PartialEq)]
pub enum BadLength {
    Invalid,
    Conflicting,
}

/// The length every `Content-Length` value gives: a list of one repeated number
/// (`5, 5`) is one length; anything else is refused (RFC 9112 §6.3). Both
/// directions of the proxy read lengths this way.
pub fn content_length<'a>(
    values: impl IntoIterator<Item = &'a HeaderValue>,
) -> Result<u64, BadLength> {
    let mut length = None;
    for value in values {
        for part in value.to_str().unwrap_or("x").split(',').map(str::trim) {
            let n = match !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
                true => part.parse::<u64>().ok(),
                false => None,
            }
            .ok_or(BadLength::Invalid)?;
            if length.is_some_and(|l| l != n) {
                return Err(BadLength::Conflicting);
            }
            length = Some(n);
        }
    }
    length.ok_or(BadLength::Invalid)
}

/// The transfer codings `values` list, in order; `None` when one is not text.
pub fn transfer_codings<'a>(
    values: impl IntoIterator<Item = &'a HeaderValue>,
) -> Option<Vec<&'a str>> {
    let mut codings = Vec::new();
    for value in values {
        let listed = value.to_str().ok()?.split(',').map(str::trim);
        codings.extend(listed.filter(|c| !c.is_empty()));
    }
    Some(codings)
}

/// Whether the comma-separated lists in `values` hold `token` (any case).
pub fn has_token<'a>(values: impl IntoIterator<Item = &'a HeaderValue>, token: &str) -> bool {
    values.into_iter().any(|v| list_has(v.as_bytes(), token))
}

/// Whether the comma-separated list in a field's `value` bytes holds `token` (any
/// case). A value with bytes other than visible ASCII holds none, as
/// `HeaderValue::to_str` refuses it.
pub fn list_has(value: &[u8], token: &str) -> bool {
    value.iter().all(|&b| b == b'\t' || (32..127).contains(&b))
        && value
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// The request's transfer codings: `chunked` alone is taken. Without `chunked`
/// last the body's end cannot be known (400, RFC 9112 §6.3); a coding before it
/// could not be passed on once the framing is removed (501).
fn transfer_coding(codings: &[&str]) -> Result<Framing, Refusal> {
    match codings.split_last() {
        Some((last, [])) if last.eq_ignore_ascii_case("chunked") => Ok(Framing::Chunked),
        Some((last, _)) if last.eq_ignore_ascii_case("chunked") => Err(Refusal {
            status: StatusCode::NOT_IMPLEMENTED,
            slug: "transfer-coding-unsupported",
            title: "Transfer coding not supported",
            detail: "only the chunked transfer coding is taken".into(),
        }),
        _ => Err(bad_request(
            "Transfer-Encoding must end with chunked for a request",
        )),
    }
}

/// Where a chunked decoder is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// One step of decoding a chunked body (RFC 9112 §7.1) from the bytes read so far.
pub enum Step {
    /// The first `n` bytes are body data.
    Data(usize),
    /// The first `n` bytes are framing: sizes, CRLFs, extensions, trailer fields.
    Framing(usize),
    /// The first `n` bytes end the body.
    End(usize),
    /// More bytes are needed.
    More,
    /// What is wrong, as "the peer sent ...".
    Invalid(&'static str),
}

impl Chunk {
    /// Decodes the next piece of `pending`, which starts where the last step ended.
    pub fn step(&mut self, pending: &[u8]) -> Step {
        match *self {
            Chunk::Size => match line_end(pending) {
                Line::Ends(end) => match chunk_size(&pending[..end]) {
                    Some(size) => {
                        *self = match size {
                            0 => Chunk::Trailers,
                            n => Chunk::Data(n),
                        };
                        Step::Framing(end)
                    }
                    None => Step::Invalid("an invalid chunk size"),
                },
                Line::BareLf => Step::Invalid(BARE_LF),
                Line::Open if pending.len() > MAX_LINE => {
                    Step::Invalid("a chunk-size line too long")
                }
                Line::Open => Step::More,
            },
            Chunk::Data(_) if pending.is_empty() => Step::More,
            Chunk::Data(left) => {
                let n = usize::try_from(left).map_or(pending.len(), |l| l.min(pending.len()));
                *self = match left - n as u64 {
                    0 => Chunk::DataEnd,
                    rest => Chunk::Data(rest),
                };
                Step::Data(n)
            }
            Chunk::DataEnd if pending.len() < 2 => Step::More,
            Chunk::DataEnd if pending.starts_with(b"\r\n") => {
                *self = Chunk::Size;
                Step::Framing(2)
            }
            Chunk::DataEnd => Step::Invalid("a chunk not ended by CRLF"),
            Chunk::Trailers => match line_end(pending) {
                Line::Ends(2) => Step::End(2),
                Line::Ends(end) => Step::Framing(end),
                Line::BareLf => Step::Invalid(BARE_LF),
                Line::Open if pending.len() > MAX_LINE => Step::Invalid("a trailer line too long"),
                Line::Open => Step::More,
            },
        }
    }
}

const BARE_LF: &str = "a line of chunked framing ended by LF without CR";

/// How the line at the start of some bytes stands.
enum Line {
    /// Ended by CRLF: where it ends, past the CRLF.
    Ends(usize),
    /// Ended by a LF without CR: refused at once rather than waited on until the
    /// body's timeout.
    BareLf,
    /// Not ended yet.
    Open,
}

/// The line at the start of `bytes`, by its first LF.
fn line_end(bytes: &[u8]) -> Line {
    match bytes.iter().position(|&b| b == b'\n') {
        Some(i) if i > 0 && bytes[i - 1] == b'\r' => Line::Ends(i + 1),
        Some(_) => Line::BareLf,
        None => Line::Open,
    }
}

/// A chunk-size line (RFC 9112 §7.1): hex digits, then extensions, which are ignored.
pub fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = &line[..line.len() - 2];
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return None;
    }
    let rest = &line[digits..];
    let rest_ok = rest.is_empty()
        || rest
            .iter()
            .position(|&b| b == b';')
            .is_some_and(|semi| rest[..semi].iter().all(|&b| b == b' ' || b == b'\t'));
    if !rest_ok || line.iter().any(|&b| b == b'\r' || b == b'\n') {
        return None;
    }
    std::str::from_utf8(&line[..digits])
        .ok()
        .and_then(|d| u64::from_str_radix(d, 16).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(bytes: &[u8]) -> Result<Option<(Head, usize)>, Refusal> {
        parse(bytes, 16 * 1024, 4)
    }

    /// The target and the values share one copy of the head: they read as sent,
    /// empty values included, after the connection's buffer has moved on.
    #[test]
    fn target_and_values_outlive_the_buffer_they_were_read_from() {
        let mut buffer =
            b"GET /orders/7?x=1 HTTP/1.1\r\nHost: shop.test\r\nX-Empty:\r\nX-Trace: a b\r\n\r\nNEXT"
                .to_vec();
        let (head, used) = parse(&buffer, 16 * 1024, 8).unwrap().unwrap();
        assert_eq!(&buffer[used..], b"NEXT");
        buffer.fill(b'#');
        assert_eq!(head.uri, "/orders/7?x=1");
        assert_eq!(head.headers["host"], "shop.test");
        assert_eq!(head.headers["x-empty"], "");
        assert_eq!(head.headers["x-trace"], "a b");
        // A clone shares the bytes and reads the same.
        assert_eq!(head.uri.clone().path(), "/orders/7");
    }

    /// A map given back never carries one message's fields into the next, and one
    /// too small for the next message is not handed out.
    #[test]
    fn recycled_header_maps_come_back_empty() {
        let mut map = header_map(2);
        map.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer a"));
        let room = map.capacity();
        recycle(map);
        let again = header_map(2);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), room, "the given-back map is reused");
        recycle(again);
        assert!(header_map(room).capacity() >= room + ADDED_HEADERS);
        // Small maps made elsewhere are not kept.
        recycle(HeaderMap::new());
        assert!(header_map(0).capacity() >= ADDED_HEADERS);
    }

    #[test]
    fn heads_parse_with_their_framing_and_keep_alive() {
        let bytes = b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\nConnection: close\r\n\r\nhello";
        let (head, used) = parsed(bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len() - 5);
        assert_eq!(head.method, Method::POST);
        assert_eq!(head.uri, "/a?b=1");
        assert_eq!(head.framing, Framing::Length(5));
        assert!(!head.keep_alive);
        let (head, _) = parsed(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(head.keep_alive);
        let (head, _) = parsed(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!head.keep_alive);
        assert!(matches!(parsed(b"GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None)));
    }

    #[test]
    fn ambiguous_heads_are_refused_with_their_status() {
        for (bytes, expected) in [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                400,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                501,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                400,
            ),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n",
                431,
            ),
        ] {
            let status = parsed(bytes).err().map(|r| r.status.as_u16());
            assert_eq!(status, Some(expected), "{}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn chunked_bodies_decode_step_by_step() {
        let body = b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\n";
        let (mut chunk, mut at, mut data) = (Chunk::Size, 0, Vec::new());
        loop {
            match chunk.step(&body[at..]) {
                Step::Data(n) => {
                    data.extend_from_slice(&body[at..at + n]);
                    at += n;
                }
                Step::Framing(n) => at += n,
                Step::End(n) => {
                    at += n;
                    break;
                }
                Step::More | Step::Invalid(_) => panic!("stuck at {at}"),
            }
        }
        assert_eq!((data.as_slice(), at), (&b"abcde"[..], body.len()));
        assert!(matches!(Chunk::DataEnd.step(b"xx"), Step::Invalid(_)));
        // A size or trailer line ended by a bare LF is refused at once, not waited
        // on; a line not yet ended is waited on.
        assert!(matches!(
            Chunk::Size.step(b"5\nhello"),
            Step::Invalid(BARE_LF)
        ));
        assert!(matches!(
            Chunk::Trailers.step(b"x: y\n"),
            Step::Invalid(BARE_LF)
        ));
        assert!(matches!(Chunk::Size.step(b"5"), Step::More));
        assert!(matches!(Chunk::Size.step(b"5\r"), Step::More));
    }
}
