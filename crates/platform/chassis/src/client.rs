//! The one HTTP client every service-to-service call (and the gateway) goes through:
//! discovery -> instance choice -> context propagation (correlation id, traceparent)
//! -> deadline. The resilience layers (breaker, retry budget) slot in here, so every
//! caller gets them at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
pub use discovery::Instance;
use discovery::{ResolveError, Resolver};
use resilience::circuit_breaker::Outcome;

use crate::downstreams::{Downstream, Downstreams};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;

/// Largest response body [`HttpClient::get_json`] buffers; a peer sending more is
/// treated as broken rather than allowed to exhaust memory.
const MAX_JSON_BODY: usize = 8 * 1024 * 1024;
/// Idle pooled connections are closed after this; below typical server keep-alive
/// (hyper's default is none, nginx 75 s) so we close first and never reuse a dead one.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("cannot connect to {service}: {source}")]
    Connect {
        service: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("{service} did not answer within {after:?}")]
    Timeout { service: String, after: Duration },
    #[error("{service} failed: {source}")]
    Request {
        service: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("{service} answered {status}: {body}")]
    Status {
        service: String,
        status: StatusCode,
        body: String,
        retry_after: Option<Duration>,
    },
    #[error("{service} sent an unreadable body: {reason}")]
    Body { service: String, reason: String },
    #[error("invalid request URI: {0}")]
    InvalidUri(String),
    /// Not attempted: the breaker in front of `service` is open.
    #[error("{service} is failing; calls are paused by its circuit breaker")]
    CircuitOpen {
        service: String,
        retry_after: Option<Duration>,
    },
    /// Not attempted: too many calls to `service` are in flight already.
    #[error("too many calls to {service} are in flight")]
    BulkheadFull { service: String },
    /// Not attempted: this client's rate limit for `service` is used up.
    #[error("calls to {service} are over this client's rate limit")]
    RateLimited {
        service: String,
        retry_after: Duration,
    },
}

impl ClientError {
    /// Whether another attempt may succeed: the call failed on the way, or the
    /// server said it could not serve this time. Fast rejections (open breaker, full
    /// bulkhead) are not retried: they exist to shed load.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::Timeout { .. }
            | ClientError::Request { .. } => true,
            ClientError::Status { status, .. } => resilience::retry::is_retryable_status(*status),
            _ => false,
        }
    }

    /// The server's `Retry-After`, when it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Status { retry_after, .. }
            | ClientError::CircuitOpen { retry_after, .. } => *retry_after,
            ClientError::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Whether the dependency is down or slow (as opposed to answering with an error).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            ClientError::Resolve(_)
                | ClientError::Connect { .. }
                | ClientError::Timeout { .. }
                | ClientError::Request { .. }
                | ClientError::CircuitOpen { .. }
                | ClientError::BulkheadFull { .. }
                | ClientError::RateLimited { .. }
        ) || matches!(self, ClientError::Status { status, .. } if status.is_server_error())
    }
}

/// Cheap to clone; clones share the connection pool.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Body>,
    resolver: Arc<dyn Resolver>,
    downstreams: Arc<Downstreams>,
    timeout: Duration,
    next: Arc<AtomicUsize>,
}

impl HttpClient {
    pub fn new(
        resolver: Arc<dyn Resolver>,
        downstreams: Arc<Downstreams>,
        timeout: Duration,
        connect_timeout: Duration,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);
        Self {
            inner,
            resolver,
            downstreams,
            timeout,
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn resolver(&self) -> &Arc<dyn Resolver> {
        &self.resolver
    }

    /// The resilience state (breakers, retry budgets, bulkheads) per downstream.
    pub fn downstreams(&self) -> &Arc<Downstreams> {
        &self.downstreams
    }

    /// Round robin over the resolved instances.
    fn pick(&self, service: &str) -> Result<Instance, ClientError> {
        let instances = self.resolver.resolve(service)?;
        let i = self.next.fetch_add(1, Ordering::Relaxed) % instances.len();
        Ok(instances[i].clone())
    }

    /// Sends `request`, whose URI is a path and query, to an instance of `service`,
    /// with the current request context injected and the client deadline applied to
    /// the response head.
    pub async fn send(
        &self,
        service: &str,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, ClientError> {
        let timeout = self
            .downstreams
            .get(service)
            .timeout
            .unwrap_or(self.timeout);
        self.send_with_timeout(service, request, timeout).await
    }

    /// [`send`](Self::send) with an explicit deadline, through `service`'s bulkhead
    /// and circuit breaker (errors, timeouts and 5xx answers count as failures).
    /// Not retried: the body streams and cannot be sent twice.
    pub async fn send_with_timeout(
        &self,
        service: &str,
        request: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, ClientError> {
        let downstream = self.downstreams.get(service);
        self.pace(service, &downstream).await?;
        self.attempt(service, &downstream, request, timeout).await
    }

    /// The rate limiter, once per call (before retries): waits for the call's turn,
    /// or rejects it when the turn is too far.
    async fn pace(&self, service: &str, downstream: &Downstream) -> Result<(), ClientError> {
        let Some(limiter) = &downstream.limiter else {
            return Ok(());
        };
        match limiter.reserve(tokio::time::Instant::now()) {
            Ok(delay) if delay.is_zero() => Ok(()),
            Ok(delay) => {
                tokio::time::sleep(delay).await;
                Ok(())
            }
            Err(retry_after) => Err(ClientError::RateLimited {
                service: service.to_owned(),
                retry_after,
            }),
        }
    }

    /// One attempt: bulkhead -> breaker -> deadline.
    async fn attempt(
        &self,
        service: &str,
        downstream: &Downstream,
        request: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, ClientError> {
        let instance = self.pick(service)?;
        let _slot = downstream
            .bulkhead
            .enter()
            .await
            .map_err(|_| ClientError::BulkheadFull {
                service: service.to_owned(),
            })?;
        let Some(breaker) = &downstream.breaker else {
            return self.send_to(service, &instance, request, timeout).await;
        };
        let permit = breaker
            .try_acquire()
            .map_err(|rejected| ClientError::CircuitOpen {
                service: service.to_owned(),
                retry_after: rejected.retry_after,
            })?;
        // If the caller gives up (drops this future), the guard records a failure.
        let guard = RecordOnDrop {
            breaker,
            permit: Some(permit),
            started: tokio::time::Instant::now(),
        };
        let result = self.send_to(service, &instance, request, timeout).await;
        let outcome = match &result {
            Ok(r) => downstream.classification.classify(r.status()),
            Err(_) => Outcome::Failure,
        };
        guard.finish(outcome);
        result
    }

    /// The status `instance` answers to `GET path` (health probes of one instance).
    pub async fn probe(
        &self,
        instance: &Instance,
        path: &str,
        timeout: Duration,
    ) -> Result<StatusCode, ClientError> {
        let request = Request::get(path)
            .body(Body::empty())
            .map_err(|e| ClientError::InvalidUri(e.to_string()))?;
        let response = self
            .send_to(&instance.id, instance, request, timeout)
            .await?;
        Ok(response.status())
    }

    async fn send_to(
        &self,
        service: &str,
        instance: &Instance,
        mut request: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, ClientError> {
        let path_and_query = request
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned());
        let authority = instance
            .base_url
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let uri = Uri::builder()
            .scheme(instance.base_url.scheme_str().unwrap_or("http"))
            .authority(authority.as_str())
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| ClientError::InvalidUri(e.to_string()))?;
        *request.uri_mut() = uri;
        telemetry::context::inject_current(request.headers_mut());
        // Never wait past the request's own deadline, and tell the callee how long
        // this call will wait so it can stop in time.
        let Some(timeout) = resilience::timeout::effective(timeout) else {
            return Err(ClientError::Timeout {
                service: service.to_owned(),
                after: Duration::ZERO,
            });
        };
        telemetry::context::set_deadline(request.headers_mut(), timeout);
        match tokio::time::timeout(timeout, self.inner.request(request)).await {
            Err(_) => Err(ClientError::Timeout {
                service: service.to_owned(),
                after: timeout,
            }),
            Ok(Err(e)) if e.is_connect() => Err(ClientError::Connect {
                service: service.to_owned(),
                source: e,
            }),
            Ok(Err(e)) => Err(ClientError::Request {
                service: service.to_owned(),
                source: e,
            }),
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// GETs JSON from `service`; a non-2xx answer is [`ClientError::Status`]. Being
    /// idempotent, the read is retried on connect errors, timeouts and 502/503/504/429
    /// answers, with backoff, within the request's deadline and the retry budget.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        service: &str,
        path_and_query: &str,
    ) -> Result<T, ClientError> {
        let downstream = self.downstreams.get(service);
        self.pace(service, &downstream).await?;
        let attempt_timeout = downstream.timeout.unwrap_or(self.timeout);
        let total = downstream
            .total_timeout
            .unwrap_or(attempt_timeout * downstream.retry.max_attempts);
        let attempts = async {
            downstream.retry.on_request();
            let mut attempt = 1;
            loop {
                let result = self
                    .get_json_once(service, &downstream, path_and_query, attempt_timeout)
                    .await;
                let retry_after = match &result {
                    Err(e) if e.is_retryable() => e.retry_after(),
                    _ => return result,
                };
                let left = telemetry::context::current().and_then(|c| c.remaining());
                match downstream.retry.next_delay(attempt, retry_after, left) {
                    Some(delay) => {
                        if let Err(e) = &result {
                            tracing::info!(upstream = service, attempt, ?delay, error = %e, "retrying");
                        }
                        tokio::time::sleep(delay).await;
                        attempt += 1;
                    }
                    None => return result,
                }
            }
        };
        tokio::time::timeout(total, attempts)
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::Timeout {
                    service: service.to_owned(),
                    after: total,
                })
            })
    }

    async fn get_json_once<T: DeserializeOwned>(
        &self,
        service: &str,
        downstream: &Downstream,
        path_and_query: &str,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let request = Request::get(path_and_query)
            .header(http::header::ACCEPT, "application/json")
            .body(Body::empty())
            .map_err(|e| ClientError::InvalidUri(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + timeout;
        let response = self.attempt(service, downstream, request, timeout).await?;
        let status = response.status();
        let retry_after = resilience::retry::retry_after(response.headers());
        let body = tokio::time::timeout_at(deadline, read_limited(response.into_body()))
            .await
            .map_err(|_| ClientError::Timeout {
                service: service.to_owned(),
                after: timeout,
            })?
            .map_err(|reason| ClientError::Body {
                service: service.to_owned(),
                reason,
            })?;
        if !status.is_success() {
            return Err(ClientError::Status {
                service: service.to_owned(),
                status,
                body: String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
                retry_after,
            });
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Body {
            service: service.to_owned(),
            reason: e.to_string(),
        })
    }
}

/// Records a failure if the call is abandoned before it ends (its future dropped),
/// so a half-open breaker never loses a trial slot.
struct RecordOnDrop<'a> {
    breaker: &'a resilience::circuit_breaker::Breaker,
    permit: Option<resilience::circuit_breaker::Permit>,
    started: tokio::time::Instant,
}

impl RecordOnDrop<'_> {
    fn finish(mut self, outcome: Outcome) {
        if let Some(permit) = self.permit.take() {
            self.breaker.record(permit, outcome, self.started.elapsed());
        }
    }
}

impl Drop for RecordOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.breaker
                .record(permit, Outcome::Failure, self.started.elapsed());
        }
    }
}

async fn read_limited(body: Incoming) -> Result<Bytes, String> {
    let limited = http_body_util::Limited::new(body, MAX_JSON_BODY);
    limited
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string())
}
