//! The tower layer and service.

use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{BoxError, Layer, Service};

use super::Compartment;
use super::future::ResponseFuture;

#[derive(Clone, Debug)]
pub struct BulkheadLayer {
    compartment: Arc<Compartment>,
}

impl BulkheadLayer {
    pub fn new(compartment: Arc<Compartment>) -> Self {
        Self { compartment }
    }
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = Bulkhead<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Bulkhead {
            inner,
            compartment: self.compartment.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Bulkhead<S> {
    inner: S,
    compartment: Arc<Compartment>,
}

impl<S, Req> Service<Req> for Bulkhead<S>
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
        // The inner future is created now but only polled once a slot is held:
        // tower futures do their work when polled.
        let compartment = self.compartment.clone();
        ResponseFuture::new(
            Box::pin(async move { compartment.enter().await }),
            self.inner.call(request),
        )
    }
}
