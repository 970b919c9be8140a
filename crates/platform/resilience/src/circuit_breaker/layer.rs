//! The tower layer and service.

use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{BoxError, Layer, Service};

use super::error::Open;
use super::future::ResponseFuture;
use super::{Breaker, Classify};

/// Guards a service with a shared [`Breaker`].
#[derive(Clone, Debug)]
pub struct CircuitBreakerLayer<C> {
    breaker: Arc<Breaker>,
    classify: C,
}

impl<C> CircuitBreakerLayer<C> {
    pub fn new(breaker: Arc<Breaker>, classify: C) -> Self {
        Self { breaker, classify }
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreaker<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker {
            inner,
            breaker: self.breaker.clone(),
            classify: self.classify.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct CircuitBreaker<S, C> {
    inner: S,
    breaker: Arc<Breaker>,
    classify: C,
}

impl<S, C> CircuitBreaker<S, C> {
    pub fn breaker(&self) -> &Arc<Breaker> {
        &self.breaker
    }
}

impl<S, C, Req> Service<Req> for CircuitBreaker<S, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        // One clock reading serves the admission and the call's start.
        let now = tokio::time::Instant::now();
        match self.breaker.try_acquire_at(now) {
            Ok(permit) => ResponseFuture::running(
                self.inner.call(request),
                self.breaker.clone(),
                permit,
                now,
                self.classify.clone(),
            ),
            Err(rejected) => ResponseFuture::rejected(Open {
                name: self.breaker.name().clone(),
                state: rejected.state,
                retry_after: rejected.retry_after,
            }),
        }
    }
}
