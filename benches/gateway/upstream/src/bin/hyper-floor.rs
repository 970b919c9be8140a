//! `hyper-floor UPSTREAM_PORT`: the least a hyper-based reverse proxy can do, built
//! the way Bazaar's gateway is (a single-threaded runtime per core on a shared
//! listener, HTTP/1.1 server, hyper-util's pooled client per thread), with no
//! routing, auth, limits, headers, metrics or logs. The gateway benchmark runs it to
//! show how much of the gateway's cost per request is hyper and tokio themselves.
//! Prints `listening on <addr>` once bound.

use std::convert::Infallible;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

type Body = http_body_util::combinators::BoxBody<bytes::Bytes, hyper::Error>;

fn main() -> std::io::Result<()> {
    let upstream: u16 = match std::env::args().nth(1).and_then(|p| p.parse().ok()) {
        Some(port) => port,
        None => {
            eprintln!("usage: hyper-floor UPSTREAM_PORT");
            std::process::exit(2);
        }
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    println!("listening on {}", listener.local_addr()?);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let listener = listener.try_clone()?;
            Ok(std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .and_then(|rt| rt.block_on(worker(listener, upstream)))
            }))
        })
        .collect::<std::io::Result<_>>()?;
    for t in threads {
        t.join()
            .map_err(|_| std::io::Error::other("a worker panicked"))??;
    }
    Ok(())
}

async fn worker(listener: std::net::TcpListener, upstream: u16) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        tokio::spawn(async move {
            let service = service_fn(move |mut request: Request<Incoming>| {
                let client = client.clone();
                async move {
                    let target = format!(
                        "http://127.0.0.1:{upstream}{}",
                        request.uri().path_and_query().map_or("/", |p| p.as_str())
                    );
                    let response: Response<Body> = match target.parse() {
                        Ok(uri) => {
                            *request.uri_mut() = uri;
                            match client.request(request).await {
                                Ok(r) => r.map(BodyExt::boxed),
                                Err(_) => bad_gateway(),
                            }
                        }
                        Err(_) => bad_gateway(),
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn bad_gateway() -> Response<Body> {
    let mut response = Response::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}
