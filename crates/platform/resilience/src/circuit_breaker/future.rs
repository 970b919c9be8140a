//! The response future: records the outcome when the call ends, and records a
//! failure if the call is dropped before it ends (an outer timeout cancelled it), so
//! a half-open trial slot is never lost.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::BoxError;

use super::error::Open;
use super::{Breaker, Classify, Outcome, Permit};

/// Records a failure unless the call finished: a call that never ends (an outer
/// timeout dropped it) is a failed one.
pub struct Guard {
    breaker: Arc<Breaker>,
    permit: Permit,
    started: Instant,
    finished: bool,
}

impl Guard {
    fn finish(mut self, outcome: Outcome) {
        self.finished = true;
        self.breaker
            .record(self.permit, outcome, self.started.elapsed());
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.finished {
            self.breaker
                .record(self.permit, Outcome::Failure, self.started.elapsed());
        }
    }
}

pin_project! {
    #[project = Proj]
    pub enum ResponseFuture<F, C> {
        Running {
            #[pin]
            future: F,
            guard: Option<Guard>,
            classify: C,
        },
        Rejected {
            error: Option<Open>,
        },
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(super) fn running(
        future: F,
        breaker: Arc<Breaker>,
        permit: Permit,
        started: Instant,
        classify: C,
    ) -> Self {
        ResponseFuture::Running {
            future,
            guard: Some(Guard {
                breaker,
                permit,
                started,
                finished: false,
            }),
            classify,
        }
    }

    pub(super) fn rejected(error: Open) -> Self {
        ResponseFuture::Rejected { error: Some(error) }
    }
}

impl<F, T, E, C> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T, E>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Rejected { error } => Poll::Ready(Err(crate::take_error(error))),
            Proj::Running {
                future,
                guard,
                classify,
            } => {
                let result = std::task::ready!(future.poll(cx));
                if let Some(g) = guard.take() {
                    g.finish(classify.classify(result.as_ref()));
                }
                Poll::Ready(result.map_err(Into::into))
            }
        }
    }
}
