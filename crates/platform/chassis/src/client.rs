//! The one HTTP client every service-to-service call (and the gateway) goes through:
//! discovery -> instance choice -> context propagation (correlation id, traceparent)
//! -> deadline. The resilience layers (breaker, retry budget) slot in here, so every
//! caller gets them at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
pub use discovery::Instance;
use discovery::{ResolveError, Resolver};
use resilience::circuit_breaker::Outcome;

use resilience::bulkhead::BulkheadLayer;
use resilience::circuit_breaker::CircuitBreakerLayer;
use resilience::rate_limit::RateLimitLayer;
use resilience::retry::HttpRetry;
use tower::retry::RetryLayer;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceBuilder, ServiceExt};

use crate::downstreams::{Downstream, Downstreams};

/// One attempt at a downstream service, as a boxed tower stack.
type Attempt = BoxCloneSyncService<Request<Body>, Response<Incoming>, BoxError>;
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
    /// Any other failure of the call stack.
    #[error("{service}: {reason}")]
    Other { service: String, reason: String },
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

/// The pooled client's settings.
fn client_builder() -> hyper_util::client::legacy::Builder {
    let mut builder = Client::builder(TokioExecutor::new());
    builder.pool_idle_timeout(POOL_IDLE_TIMEOUT);
    builder
}

/// A TCP connector with `connect_timeout` and Nagle off (requests are small and
/// latency-bound).
fn connector(connect_timeout: Duration) -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    connector
}

/// `target`'s path and query (`/` when it has none) on `base`'s scheme and authority.
pub fn instance_uri(base: &Uri, target: &Uri) -> Result<Uri, http::uri::InvalidUriParts> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = base.scheme().cloned();
    parts.authority = base.authority().cloned();
    parts.path_and_query = Some(
        target
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts)
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
        let inner = client_builder().build(connector(connect_timeout));
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

    /// [`send`](Self::send) with an explicit deadline, through `service`'s stack of
    /// resilience layers: rate limit -> bulkhead -> circuit breaker -> the attempt.
    /// Not retried: the body streams and cannot be sent twice.
    pub async fn send_with_timeout(
        &self,
        service: &str,
        request: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, ClientError> {
        let downstream = self.downstreams.get(service);
        let stack = ServiceBuilder::new()
            .option_layer(downstream.limiter.clone().map(RateLimitLayer::new))
            .service(self.attempt_stack(service, &downstream, timeout));
        // Boxed with its types spelled out (see `get_json`).
        let call: Pin<Box<dyn Future<Output = Result<Response<Incoming>, BoxError>> + Send>> =
            Box::pin(stack.oneshot(request));
        call.await.map_err(|e| client_error(service, e))
    }

    /// One attempt as a tower stack of the resilience layers: bulkhead -> circuit
    /// breaker (classifying answers as configured) -> pick an instance and send with
    /// the deadline.
    fn attempt_stack(&self, service: &str, downstream: &Downstream, timeout: Duration) -> Attempt {
        let client = self.clone();
        let name: Arc<str> = Arc::from(service);
        let send = tower::service_fn(move |request: Request<Body>| {
            let (client, name) = (client.clone(), name.clone());
            async move {
                let instance = client.pick(&name)?;
                client.send_to(&name, &instance, request, timeout).await
            }
        });
        let bulkhead = BulkheadLayer::new(downstream.bulkhead.clone());
        match &downstream.breaker {
            Some(breaker) => {
                let settings = downstream.classification.clone();
                let classify = move |result: Result<&Response<Incoming>, &ClientError>| match result
                {
                    Ok(r) => settings.classify(r.status()),
                    Err(_) => Outcome::Failure,
                };
                BoxCloneSyncService::new(
                    ServiceBuilder::new()
                        .layer(bulkhead)
                        .layer(CircuitBreakerLayer::new(breaker.clone(), classify))
                        .service(send),
                )
            }
            None => BoxCloneSyncService::new(ServiceBuilder::new().layer(bulkhead).service(send)),
        }
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
        let uri = instance_uri(&instance.base_url, request.uri())
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
    /// idempotent, the read goes through the retry layer too: rate limit -> total
    /// timeout -> retry (connect errors, timeouts, 502/503/504/429, with backoff,
    /// within the request's deadline and the budget) -> bulkhead -> breaker -> attempt.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        service: &str,
        path_and_query: &str,
    ) -> Result<T, ClientError> {
        let downstream = self.downstreams.get(service);
        let attempt_timeout = downstream.timeout.unwrap_or(self.timeout);
        let total = downstream
            .total_timeout
            .unwrap_or(attempt_timeout * downstream.retry.max_attempts);
        let stack = ServiceBuilder::new()
            .option_layer(downstream.limiter.clone().map(RateLimitLayer::new))
            .layer(RetryLayer::new(HttpRetry::new(downstream.retry.clone())))
            .map_request(|request: Request<Bytes>| request.map(Body::from))
            .service(self.attempt_stack(service, &downstream, attempt_timeout));
        let request = Request::get(path_and_query)
            .header(http::header::ACCEPT, "application/json")
            .body(Bytes::new())
            .map_err(|e| ClientError::InvalidUri(e.to_string()))?;
        // Boxed with its types spelled out: `Send` inference through the layers'
        // `BoxError` trips rustc's higher-ranked lifetime check in callers otherwise.
        let call: Pin<Box<dyn Future<Output = Result<Response<Incoming>, BoxError>> + Send>> =
            Box::pin(stack.oneshot(request));
        let read = async {
            let response = call.await.map_err(|e| client_error(service, e))?;
            let status = response.status();
            let retry_after = resilience::retry::retry_after(response.headers());
            let body =
                read_limited(response.into_body())
                    .await
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
        };
        tokio::time::timeout(total, read).await.unwrap_or_else(|_| {
            Err(ClientError::Timeout {
                service: service.to_owned(),
                after: total,
            })
        })
    }
}

/// The [`ClientError`] a failure of the layer stack stands for.
fn client_error(service: &str, error: BoxError) -> ClientError {
    let error = match error.downcast::<ClientError>() {
        Ok(e) => return *e,
        Err(e) => e,
    };
    if let Some(open) = error.downcast_ref::<resilience::circuit_breaker::error::Open>() {
        return ClientError::CircuitOpen {
            service: service.to_owned(),
            retry_after: open.retry_after,
        };
    }
    if error.is::<resilience::bulkhead::error::Full>() {
        return ClientError::BulkheadFull {
            service: service.to_owned(),
        };
    }
    if let Some(limited) = error.downcast_ref::<resilience::rate_limit::error::Limited>() {
        return ClientError::RateLimited {
            service: service.to_owned(),
            retry_after: limited.retry_after,
        };
    }
    ClientError::Other {
        service: service.to_owned(),
        reason: error.to_string(),
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
