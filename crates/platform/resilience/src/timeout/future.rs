//! Races the call against its deadline.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::BoxError;

use super::error::Elapsed;

pin_project! {
    #[project = Proj]
    pub enum ResponseFuture<F> {
        Running {
            #[pin]
            inner: F,
            #[pin]
            sleep: Sleep,
            limit: Duration,
        },
        Expired {
            error: Option<Elapsed>,
        },
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn running(inner: F, limit: Duration) -> Self {
        ResponseFuture::Running {
            inner,
            sleep: tokio::time::sleep(limit),
            limit,
        }
    }

    pub(super) fn expired(error: Elapsed) -> Self {
        ResponseFuture::Expired { error: Some(error) }
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
            Proj::Expired { error } => Poll::Ready(Err(crate::take_error(error))),
            Proj::Running {
                inner,
                sleep,
                limit,
            } => {
                if let Poll::Ready(result) = inner.poll(cx) {
                    return Poll::Ready(result.map_err(Into::into));
                }
                match sleep.poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(Elapsed(*limit).into())),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}
