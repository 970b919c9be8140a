//! The gateway's HTTP/1.1 request-head parser and chunked decoder
//! (crates/platform/gateway/src/message.rs) on arbitrary bytes, with the gateway's
//! default limits: never a panic; a head that is taken is unambiguous (one framing,
//! the one its headers say; one Host in HTTP/1.1; within the byte limit); a chunked
//! body after it decodes without reading past the input.
#![no_main]

#[path = "../../crates/platform/gateway/src/message.rs"]
#[allow(dead_code)]
mod message;

use message::{Chunk, Framing, Step};

/// The gateway's defaults (`[gateway]` max_header_bytes, max_headers).
const MAX_HEADER_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 100;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(Some((head, used))) = message::parse(data, MAX_HEADER_BYTES, MAX_HEADERS) else {
        return;
    };
    assert!(used <= data.len() && used <= MAX_HEADER_BYTES);
    let lengths: Vec<&[u8]> = head
        .headers
        .get_all(http::header::CONTENT_LENGTH)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    let coded = head.headers.contains_key(http::header::TRANSFER_ENCODING);
    match head.framing {
        Framing::Chunked => assert!(coded && lengths.is_empty(), "chunked with a length"),
        Framing::Length(n) => {
            assert!(!coded, "a length with Transfer-Encoding");
            for value in lengths {
                let text = std::str::from_utf8(value).expect("an accepted length is ASCII");
                assert!(text.split(',').all(|part| part.trim().parse::<u64>() == Ok(n)));
            }
        }
    }
    if head.version == http::Version::HTTP_11 {
        assert_eq!(head.headers.get_all(http::header::HOST).iter().count(), 1);
    }
    if head.framing == Framing::Chunked {
        let body = &data[used..];
        let (mut chunk, mut at) = (Chunk::Size, 0);
        loop {
            match chunk.step(&body[at..]) {
                Step::Data(n) | Step::Framing(n) => {
                    assert!(n > 0, "a step that takes nothing");
                    at += n;
                }
                Step::End(n) => {
                    at += n;
                    break;
                }
                Step::More | Step::Invalid(_) => break,
            }
            assert!(at <= body.len());
        }
    }
});
