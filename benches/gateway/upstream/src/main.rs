//! `bench-upstream [PORT]`: answers every request with the same 1 KB JSON body, as
//! fast as hyper can, so a proxy's cost is what a benchmark in front of it measures.
//! Prints `listening on <addr>` once bound (port 0 picks a free one).

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

fn body() -> Bytes {
    // 1,024 bytes of JSON.
    let mut json = String::from("{\"items\":[");
    let mut n = 0;
    while json.len() < 980 {
        if n > 0 {
            json.push(',');
        }
        json.push_str(&format!("{{\"id\":{n},\"name\":\"item\"}}"));
        n += 1;
    }
    json.push_str("],\"pad\":\"");
    while json.len() < 1022 {
        json.push('x');
    }
    json.push_str("\"}");
    json.truncate(1024);
    Bytes::from(json)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on {}", listener.local_addr()?);
    let body = body();
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req: Request<hyper::body::Incoming>| {
                let body = body.clone();
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(body))
                            .unwrap_or_default(),
                    )
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
