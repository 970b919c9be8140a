//! `tower::retry` policy for HTTP requests with a cloneable body.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::{RetryPolicy, is_idempotent, is_retryable_status, retry_after};

/// Per-request retry state around a shared [`RetryPolicy`]; use with
/// `tower::retry::RetryLayer::new(HttpRetry::new(policy))`.
#[derive(Clone, Debug)]
pub struct HttpRetry {
    policy: Arc<RetryPolicy>,
    attempt: u32,
}

impl HttpRetry {
    pub fn new(policy: Arc<RetryPolicy>) -> Self {
        Self { policy, attempt: 1 }
    }
}

/// Errors that are the resilience stack shedding load: retrying them would defeat it.
fn is_rejection(error: &tower::BoxError) -> bool {
    error.is::<crate::circuit_breaker::error::Open>()
        || error.is::<crate::bulkhead::error::Full>()
        || error.is::<crate::rate_limit::error::Limited>()
}

impl<B: Clone, R> tower::retry::Policy<http::Request<B>, http::Response<R>, tower::BoxError>
    for HttpRetry
{
    type Future = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn retry(
        &mut self,
        request: &mut http::Request<B>,
        result: &mut Result<http::Response<R>, tower::BoxError>,
    ) -> Option<Self::Future> {
        if self.attempt == 1 {
            self.policy.on_request();
        }
        let wait = match result {
            Ok(r) if is_retryable_status(r.status()) => retry_after(r.headers()),
            Ok(_) => return None,
            Err(e) if is_rejection(e) => return None,
            Err(_) => None,
        };
        if self.policy.idempotent_only && !is_idempotent(request.method()) {
            return None;
        }
        let left = telemetry::context::current().and_then(|c| c.remaining());
        let delay = self.policy.next_delay(self.attempt, wait, left)?;
        self.attempt += 1;
        Some(Box::pin(tokio::time::sleep(delay)))
    }

    fn clone_request(&mut self, request: &http::Request<B>) -> Option<http::Request<B>> {
        if self.policy.idempotent_only && !is_idempotent(request.method()) {
            return None;
        }
        let mut clone = http::Request::new(request.body().clone());
        *clone.method_mut() = request.method().clone();
        *clone.uri_mut() = request.uri().clone();
        *clone.version_mut() = request.version();
        *clone.headers_mut() = request.headers().clone();
        Some(clone)
    }
}
