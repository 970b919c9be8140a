//! The tower layer: waits for the reserved slot, then calls.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::{BoxError, Layer, Service};

use super::Limiter;
use super::error::Limited;

#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    limiter: Arc<Limiter>,
}

impl RateLimitLayer {
    pub fn new(limiter: Arc<Limiter>) -> Self {
        Self { limiter }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Arc<Limiter>,
}

impl<S, Req> Service<Req> for RateLimit<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let now = Instant::now();
        match self.limiter.reserve(now) {
            Ok(delay) => ResponseFuture::Waiting {
                sleep: (!delay.is_zero()).then(|| Box::pin(tokio::time::sleep(delay))),
                inner: self.inner.call(request),
            },
            Err(retry_after) => ResponseFuture::Limited {
                error: Some(Limited {
                    name: self.limiter.name().clone(),
                    retry_after,
                }),
            },
        }
    }
}

pin_project! {
    #[project = Proj]
    pub enum ResponseFuture<F> {
        Waiting {
            sleep: Option<Pin<Box<Sleep>>>,
            #[pin]
            inner: F,
        },
        Limited {
            error: Option<Limited>,
        },
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Limited { error } => Poll::Ready(Err(crate::take_error(error))),
            Proj::Waiting { sleep, inner } => {
                if let Some(s) = sleep.as_mut() {
                    std::task::ready!(s.as_mut().poll(cx));
                    *sleep = None;
                }
                inner.poll(cx).map_err(Into::into)
            }
        }
    }
}
