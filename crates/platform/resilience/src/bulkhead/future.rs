//! Waits for a slot, then drives the call while holding it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::sync::OwnedSemaphorePermit;
use tower::BoxError;

use super::error::Full;

type Enter = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, Full>> + Send>>;

pin_project! {
    pub struct ResponseFuture<F> {
        enter: Option<Enter>,
        permit: Option<OwnedSemaphorePermit>,
        #[pin]
        inner: F,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(enter: Enter, inner: F) -> Self {
        Self {
            enter: Some(enter),
            permit: None,
            inner,
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(enter) = this.enter.as_mut() {
            match std::task::ready!(enter.as_mut().poll(cx)) {
                Ok(permit) => {
                    *this.permit = Some(permit);
                    *this.enter = None;
                }
                Err(full) => {
                    *this.enter = None;
                    return Poll::Ready(Err(full.into()));
                }
            }
        }
        let result = std::task::ready!(this.inner.poll(cx));
        // Free the slot as soon as the call is done.
        this.permit.take();
        Poll::Ready(result.map_err(Into::into))
    }
}
