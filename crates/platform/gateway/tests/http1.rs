//! The gateway's own HTTP/1.1 server, spoken to byte for byte over real sockets:
//! keep-alive, pipelining, HTTP/1.0, `Expect: 100-continue`, HEAD, long and
//! streamed answers, slow clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use chassis::config::HumanDuration;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn connect(gw: &Gw) -> TcpStream {
    TcpStream::connect(gw.url.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// Reads until `text` has been seen `times` times (or the connection closes, or
/// 5 s pass); everything read.
async fn read_until(stream: &mut TcpStream, text: &str, times: usize) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while String::from_utf8_lossy(&got).matches(text).count() < times {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Whether the gateway closed the connection (reads end with nothing more).
async fn closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn keep_alive_and_pipelined_requests_are_answered_in_order() {
    let gw = spawn().await;
    let mut stream = connect(&gw).await;
    // Three requests in one write: each answered, in order, on one connection.
    stream
        .write_all(
            b"GET /open/one HTTP/1.1\r\nHost: gw\r\n\r\n\
              POST /open/two HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\n\r\nabc\
              GET /open/three HTTP/1.1\r\nHost: gw\r\n\r\n",
        )
        .await
        .unwrap();
    let answers = read_until(&mut stream, "{\"ok\":true}", 3).await;
    assert_eq!(
        answers.matches("HTTP/1.1 200 OK\r\n").count(),
        3,
        "{answers}"
    );
    assert!(!answers.to_ascii_lowercase().contains("connection: close"));
    let seen: Vec<String> = gw
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.0.clone())
        .collect();
    assert_eq!(seen, ["/open/one", "/open/two", "/open/three"]);
    // Still open for the next one.
    stream
        .write_all(b"GET /open/four HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let last = read_until(&mut stream, "{\"ok\":true}", 1).await;
    assert!(last.starts_with("HTTP/1.1 200 OK\r\n"), "{last}");
    assert!(
        last.to_ascii_lowercase().contains("connection: close"),
        "{last}"
    );
    assert!(last.to_ascii_lowercase().contains("\r\ndate: "), "{last}");
    assert!(closed(&mut stream).await);
}

#[tokio::test]
async fn http_1_0_closes_unless_kept_alive() {
    let gw = spawn().await;
    let mut stream = connect(&gw).await;
    stream
        .write_all(b"GET /open/a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let first = read_until(&mut stream, "{\"ok\":true}", 1).await;
    assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
    assert!(
        first
            .to_ascii_lowercase()
            .contains("connection: keep-alive"),
        "{first}"
    );
    // Without keep-alive, HTTP/1.0 gets one answer and the close.
    stream
        .write_all(b"GET /open/b HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let second = read_until(&mut stream, "{\"ok\":true}", 1).await;
    assert!(second.starts_with("HTTP/1.1 200 OK\r\n"), "{second}");
    assert!(
        second.to_ascii_lowercase().contains("connection: close"),
        "{second}"
    );
    assert!(closed(&mut stream).await);
    assert_eq!(gw.seen_count(), 2);
}

#[tokio::test]
async fn expect_continue_is_answered_before_the_body_is_sent() {
    let gw = spawn().await;
    let mut stream = connect(&gw).await;
    stream
        .write_all(
            b"PUT /open/up HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let interim = read_until(&mut stream, "\r\n\r\n", 1).await;
    assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
    assert_eq!(gw.seen_count(), 0);
    stream.write_all(b"hello").await.unwrap();
    let answer = read_until(&mut stream, "{\"ok\":true}", 1).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert_eq!(gw.last_seen().0, "/open/up");

    // A body declared over the limit is refused before it is sent.
    let mut stream = connect(&gw).await;
    stream
        .write_all(
            b"PUT /open/up HTTP/1.1\r\nHost: gw\r\nContent-Length: 900000000\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let refused = read_until(&mut stream, "\r\n\r\n", 1).await;
    assert!(refused.starts_with("HTTP/1.1 413 "), "{refused}");
    assert_eq!(gw.seen_count(), 1);
}

#[tokio::test]
async fn head_answers_have_no_body_and_the_connection_goes_on() {
    let gw = spawn().await;
    let mut stream = connect(&gw).await;
    stream
        .write_all(
            b"HEAD /open/big HTTP/1.1\r\nHost: gw\r\n\r\nGET /open/x HTTP/1.1\r\nHost: gw\r\n\r\n",
        )
        .await
        .unwrap();
    let answers = read_until(&mut stream, "{\"ok\":true}", 1).await;
    let (head, get) = answers.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    // The length of what a GET would get.
    assert!(
        head.to_ascii_lowercase().contains("content-length: 200000"),
        "{head}"
    );
    assert!(get.starts_with("HTTP/1.1 200 OK\r\n"), "{get}");
}

#[tokio::test]
async fn long_and_streamed_answers_reach_the_client_whole() {
    let gw = spawn().await;
    let big = gw.get("/open/big").await;
    assert_eq!(big.content_length(), Some(200_000));
    assert_eq!(big.text().await.unwrap(), "b".repeat(200_000));

    // An answer of unknown length is chunked to an HTTP/1.1 client...
    let streamed = gw.get("/open/stream").await;
    assert_eq!(
        streamed.headers()["transfer-encoding"].to_str().unwrap(),
        "chunked"
    );
    let whole: String = (0..5).map(|i| format!("part {i};")).collect();
    assert_eq!(streamed.text().await.unwrap(), whole);

    // ...and ended by the close for an HTTP/1.0 one.
    let mut stream = connect(&gw).await;
    stream
        .write_all(b"GET /open/stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{head}"
    );
    assert_eq!(body, whole);
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_told_why() {
    let gw = spawn_with(|s| s.header_timeout = HumanDuration::millis(300)).await;
    // Half a head, then nothing: 408 once the head's time is up.
    let mut stream = connect(&gw).await;
    stream
        .write_all(b"GET /open/x HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let answer = read_until(&mut stream, "}", 1).await;
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(closed(&mut stream).await);
    // A connection quiet between requests is closed without a word.
    let mut stream = connect(&gw).await;
    get_ok(&mut stream).await;
    let mut rest = String::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "{read:?} {rest}");
    assert_eq!(gw.seen_count(), 1);
}

/// Sends a whole `GET /open/x` and expects its 200.
async fn get_ok(stream: &mut TcpStream) {
    stream
        .write_all(b"GET /open/x HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until(stream, "{\"ok\":true}", 1).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
}

/// The head timer of a kept-alive connection is set once and moved when it fires
/// before the head it watches is due: each head still gets its whole time, and a
/// stalled one is still cut.
#[tokio::test]
async fn each_head_has_its_whole_time_on_a_kept_alive_connection() {
    let gw = spawn_with(|s| s.header_timeout = HumanDuration::millis(1000)).await;
    let mut stream = connect(&gw).await;
    get_ok(&mut stream).await;
    // The second head arrives at 0.6 s: the third's time runs until about 1.6 s.
    tokio::time::sleep(Duration::from_millis(600)).await;
    get_ok(&mut stream).await;
    // Half of the third head, then the rest at about 1.3 s: past the first head's
    // deadline (1 s), within the third's.
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream
        .write_all(b"GET /open/x HTTP/1.1\r\nHo")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    stream.write_all(b"st: gw\r\n\r\n").await.unwrap();
    let answer = read_until(&mut stream, "{\"ok\":true}", 1).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    // A fourth head that stalls is cut after its own second, not at the third's
    // deadline (about 0.3 s from now).
    let stalled = std::time::Instant::now();
    stream
        .write_all(b"GET /open/x HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let answer = read_until(&mut stream, "}", 1).await;
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(
        stalled.elapsed() >= Duration::from_millis(800),
        "cut after {:?}",
        stalled.elapsed()
    );
    assert!(closed(&mut stream).await);
    assert_eq!(gw.seen_count(), 3);
}

#[tokio::test]
async fn shutdown_finishes_requests_in_flight_and_closes_idle_connections() {
    let gw = spawn_with(|s| s.upstream_timeout = HumanDuration::secs(10)).await;
    let mut idle = connect(&gw).await;
    get_ok(&mut idle).await;
    // The upstream takes 3 s to answer this one.
    let mut busy = connect(&gw).await;
    busy.write_all(b"GET /slow HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.stop.cancel();
    let started = std::time::Instant::now();
    assert!(closed(&mut idle).await, "the idle connection stayed open");
    assert!(started.elapsed() < Duration::from_secs(2));
    let answer = read_until(&mut busy, "late", 1).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.ends_with("late"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(closed(&mut busy).await);
}

#[tokio::test]
async fn refusals_are_counted_in_the_gateways_metrics() {
    let gw = spawn().await;
    let mut stream = connect(&gw).await;
    stream
        .write_all(
            b"POST /open/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
    let answer = read_until(&mut stream, "}", 1).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    // A body over the limit: the head was read, so the method is known.
    let mut stream = connect(&gw).await;
    stream
        .write_all(b"PUT /open/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 900000000\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until(&mut stream, "}", 1).await;
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    let metrics = gw.get("/metrics").await.text().await.unwrap();
    let count = |method: &str, status: u16| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("http_server_request_duration_seconds_count{")
                    && l.contains(&format!("method=\"{method}\""))
                    && l.contains("route=\"<unmatched>\"")
                    && l.contains(&format!("status=\"{status}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
    };
    assert_eq!(count("-", 400).as_deref(), Some("1"), "{metrics}");
    assert_eq!(count("PUT", 413).as_deref(), Some("1"), "{metrics}");
}

/// An upstream answering every request with `answer`, byte for byte.
async fn scripted(answer: &'static [u8]) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        if socket.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    url
}

/// An upstream's answer reaches the client with its own fields as it wrote them,
/// but never its hop-by-hop fields (nor those its `Connection` names), its framing,
/// or a correlation id or date beside the gateway's: each field the client gets
/// once.
#[tokio::test]
async fn an_upstreams_answer_loses_its_hop_by_hop_fields_and_nothing_else() {
    let raw = scripted(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: x-secret, keep-alive\r\n\
          X-Secret: 1\r\nKeep-Alive: timeout=5\r\nTrailer: x-sum\r\nUpgrade: h2c\r\n\
          TE: trailers\r\nProxy-Authenticate: Basic\r\nProxy-Connection: keep-alive\r\n\
          Date: Sat, 28 Nov 2026 12:00:00 GMT\r\nX-Correlation-Id: the-upstreams-own\r\n\
          RateLimit: \"upstream\";r=1;t=1\r\nRateLimit-Policy: \"upstream\";q=1\r\n\
          X-Kept: yes\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    let gw = spawn_full(
        |s| {
            s.routes.push(gateway::RouteConfig {
                rate_limit: Some("roomy".into()),
                ..gateway::RouteConfig::prefix(
                    "/scripted",
                    "scripted",
                    gateway::AuthPolicy::Anonymous,
                )
            });
            s.rate_limits = [(
                "roomy".to_owned(),
                gateway::configuration::RateLimitPolicy {
                    rate: 1000,
                    per: HumanDuration::secs(60),
                    burst: None,
                    key: gateway::configuration::LimitKey::Ip,
                    store: Default::default(),
                },
            )]
            .into();
        },
        vec![("scripted".to_owned(), raw)],
    )
    .await;
    let mut stream = connect(&gw).await;
    for method in ["GET", "GET", "HEAD"] {
        let request = format!(
            "{method} /scripted HTTP/1.1\r\nHost: gw\r\nX-Correlation-Id: the-clients\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = match method {
            "GET" => read_until(&mut stream, "hello", 1).await,
            _ => read_until(&mut stream, "\r\n\r\n", 1).await,
        };
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert_eq!(body, if method == "GET" { "hello" } else { "" });
        let head = head.to_ascii_lowercase();
        let count = |field: &str| head.matches(&format!("\r\n{field}:")).count();
        for gone in [
            "x-secret",
            "keep-alive",
            "trailer",
            "upgrade",
            "transfer-encoding",
            "connection",
            "te",
            "proxy-authenticate",
            "proxy-connection",
        ] {
            assert_eq!(count(gone), 0, "{gone} passed: {head}");
        }
        for once in [
            "content-type",
            "date",
            "x-kept",
            "x-correlation-id",
            "content-length",
            "ratelimit",
            "ratelimit-policy",
        ] {
            assert_eq!(count(once), 1, "{once} not once: {head}");
        }
        assert!(
            head.contains("\r\ndate: sat, 28 nov 2026 12:00:00 gmt"),
            "{head}"
        );
        assert!(head.contains("\r\nx-correlation-id: the-clients"), "{head}");
        assert!(head.contains("\r\ncontent-length: 5"), "{head}");
        assert!(head.contains("\r\nratelimit-policy: \"roomy\""), "{head}");
    }
}
