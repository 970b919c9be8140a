//! A typed fallback: when the call fails, answer with what the fallback makes of the
//! error instead, marked degraded so callers and logs can tell.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower::{BoxError, Layer, Service};

/// Header set on HTTP responses a fallback produced.
pub const DEGRADED_HEADER: &str = "x-bazaar-degraded";

/// Responses that can say they came from a fallback.
pub trait MarkDegraded {
    fn mark_degraded(&mut self);
}

impl<B> MarkDegraded for http::Response<B> {
    fn mark_degraded(&mut self) {
        self.headers_mut()
            .insert(DEGRADED_HEADER, http::HeaderValue::from_static("true"));
    }
}

#[derive(Clone, Debug)]
pub struct FallbackLayer<F> {
    fallback: F,
}

impl<F> FallbackLayer<F> {
    /// `fallback` turns an error into a response, or passes an error on.
    pub fn new(fallback: F) -> Self {
        Self { fallback }
    }
}

impl<S, F: Clone> Layer<S> for FallbackLayer<F> {
    type Service = Fallback<S, F>;

    fn layer(&self, inner: S) -> Self::Service {
        Fallback {
            inner,
            fallback: self.fallback.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Fallback<S, F> {
    inner: S,
    fallback: F,
}

impl<S, F, Req> Service<Req> for Fallback<S, F>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    S::Response: MarkDegraded,
    F: Fn(BoxError) -> Result<S::Response, BoxError> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, F>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(request),
            fallback: Some(self.fallback.clone()),
        }
    }
}

pin_project! {
    pub struct ResponseFuture<Fut, F> {
        #[pin]
        inner: Fut,
        fallback: Option<F>,
    }
}

impl<Fut, F, T, E> Future for ResponseFuture<Fut, F>
where
    Fut: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    T: MarkDegraded,
    F: Fn(BoxError) -> Result<T, BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match std::task::ready!(this.inner.poll(cx)) {
            Ok(response) => Poll::Ready(Ok(response)),
            Err(error) => {
                let error = error.into();
                let Some(fallback) = this.fallback.take() else {
                    return Poll::Ready(Err(error));
                };
                tracing::warn!(error = %error, "call failed; answering from the fallback (degraded)");
                Poll::Ready(fallback(error).map(|mut response| {
                    response.mark_degraded();
                    response
                }))
            }
        }
    }
}
