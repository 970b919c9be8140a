//! The tower layer for HTTP requests.

use std::task::{Context, Poll};
use std::time::Duration;

use tower::{BoxError, Layer, Service};

use super::error::Elapsed;
use super::future::ResponseFuture;

#[derive(Clone, Copy, Debug)]
pub struct DeadlineLayer {
    limit: Duration,
}

impl DeadlineLayer {
    /// Calls take at most `limit`, less if the request being served has less left.
    pub fn new(limit: Duration) -> Self {
        Self { limit }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            limit: self.limit,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Deadline<S> {
    inner: S,
    limit: Duration,
}

impl<S, B> Service<http::Request<B>> for Deadline<S>
where
    S: Service<http::Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match super::effective(self.limit) {
            Some(limit) => {
                telemetry::context::set_deadline(request.headers_mut(), limit);
                ResponseFuture::running(self.inner.call(request), limit)
            }
            None => ResponseFuture::expired(Elapsed(Duration::ZERO)),
        }
    }
}
