//! Request-head parsing with the gateway's protocol limits (crates/platform/gateway/src/server.rs,
//! `builder`): arbitrary bytes sent to an HTTP/1.1 server connection never panic, and
//! every answer is a well-formed status line; what parses as a request reaches the
//! service with one `Content-Length` at most and no `Transfer-Encoding` besides a
//! final `chunked`.
#![no_main]

use std::convert::Infallible;
use std::time::Duration;

use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The gateway's defaults (`[gateway]` max_header_bytes, max_headers, header_timeout).
const MAX_HEADER_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 100;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(exchange(data));
});

async fn exchange(data: &[u8]) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let service = hyper::service::service_fn(|request: http::Request<hyper::body::Incoming>| async move {
        let lengths = request.headers().get_all(http::header::CONTENT_LENGTH).iter().count();
        assert!(lengths <= 1, "a request with {lengths} Content-Length headers was accepted");
        if let Some(te) = request.headers().get(http::header::TRANSFER_ENCODING) {
            let te = te.to_str().unwrap_or("").to_ascii_lowercase();
            assert!(te.trim_end().ends_with("chunked"), "accepted Transfer-Encoding: {te}");
        }
        // Reading the body exercises the chunked decoder.
        let _ = request.into_body().collect().await;
        Ok::<_, Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_millis(200))
        .max_buf_size(MAX_HEADER_BYTES.max(8192))
        .max_headers(MAX_HEADERS);
    let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(server), service);
    let serving = tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(1), connection).await;
    });
    let (mut read, mut write) = tokio::io::split(client);
    let input = data.to_vec();
    let writer = tokio::spawn(async move {
        let _ = write.write_all(&input).await;
        let _ = write.shutdown().await;
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), read.read_to_end(&mut answer)).await;
    let _ = writer.await;
    let _ = serving.await;
    // Every answer starts with a status line.
    if !answer.is_empty() {
        assert!(answer.starts_with(b"HTTP/1."), "not a status line: {:?}", String::from_utf8_lossy(&answer[..answer.len().min(40)]));
    }
}
