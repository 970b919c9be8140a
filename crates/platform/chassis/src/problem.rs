//! RFC 9457 problem details: the one error shape of every Bazaar HTTP API.
//!
//! Handlers return [`Problem`]; the chassis's [`render`] middleware fills `instance` and
//! `correlation_id` and turns any other error response (an unmatched route, a 405, a
//! body over the limit) into a problem too, so clients only ever parse one shape.
//! Internal errors are logged with their cause and answered with a generic 500 that
//! leaks nothing but the correlation id.

use std::borrow::Cow;
use std::fmt;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use serde::Serialize;
use serde_json::{Map, Value};

pub const CONTENT_TYPE_PROBLEM: &str = "application/problem+json";
const TYPE_PREFIX: &str = "tag:bazaar.dev,2026:problem/";

/// One invalid field of a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// Path of the field in the request, e.g. `items[2].quantity`.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// An RFC 9457 problem.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_uri: Cow<'static, str>,
    pub title: Cow<'static, str>,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Field errors, for validation problems.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Further extension members.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extensions: Map<String, Value>,
    #[serde(skip)]
    #[schema(ignore)]
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Problem {
    /// A problem of a given kind (`slug` names the type, documented in docs/problems.md).
    pub fn new(status: StatusCode, slug: &str, title: &'static str) -> Self {
        Self {
            type_uri: Cow::Owned(format!("{TYPE_PREFIX}{slug}")),
            title: Cow::Borrowed(title),
            status: status.as_u16(),
            detail: None,
            instance: None,
            errors: Vec::new(),
            correlation_id: None,
            extensions: Map::new(),
            headers: Vec::new(),
        }
    }

    /// A problem that says no more than its status code (`about:blank`).
    pub fn from_status(status: StatusCode) -> Self {
        let mut p = Self::new(status, "", "");
        p.type_uri = Cow::Borrowed("about:blank");
        p.title = Cow::Borrowed(status.canonical_reason().unwrap_or("Error"));
        p
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn with_extension(mut self, key: &str, value: Value) -> Self {
        self.extensions.insert(key.to_owned(), value);
        self
    }

    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// 422 with field errors.
    pub fn validation(errors: Vec<FieldError>) -> Self {
        let mut p = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            "Your request is not valid",
        )
        .with_detail("one or more fields are invalid; see `errors`");
        p.errors = errors;
        p
    }

    /// 400: a request that could not be read at all.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", "Bad request").with_detail(detail)
    }

    /// 404 for a resource that does not exist (or is not the caller's).
    pub fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found")
            .with_detail(format!("{what} was not found"))
    }

    /// 401 with `WWW-Authenticate: Bearer`.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Authentication required",
        )
        .with_detail(detail)
        .with_header(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        )
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", "Conflict").with_detail(detail)
    }

    /// 503 for a dependency that is down or too slow.
    /// 503 for a request whose deadline passed before it was done.
    pub fn timed_out() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            "Request timed out",
        )
        .with_detail("the request's deadline passed before it was done; its work was stopped")
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
        )
        .with_detail(detail)
        .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("1"))
    }

    /// Logs `error` with its cause chain and returns a 500 that reveals nothing.
    pub fn internal(error: impl fmt::Display) -> Self {
        tracing::error!(error = %error, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal server error",
        )
        .with_detail("an unexpected error occurred; quote the correlation id when reporting it")
    }

    fn render(&self) -> Response {
        let body = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        let mut response = (self.status_code(), body).into_response();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_PROBLEM));
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
        response
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status, self.title)?;
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problem {}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut response = self.render();
        response.extensions_mut().insert(self);
        response
    }
}

impl From<sqlx::Error> for Problem {
    fn from(e: sqlx::Error) -> Self {
        Problem::internal(format_args!("database: {e}"))
    }
}

/// Middleware: every error response leaves as a complete problem document.
pub async fn render(request: Request, next: Next) -> Response {
    let instance = request.uri().path().to_owned();
    let correlation_id = telemetry::context::current().map(|c| c.correlation_id.to_string());
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    if response.extensions().get::<Problem>().is_none() && is_problem(response.headers()) {
        // Already a problem document from elsewhere (e.g. proxied): keep it whole.
        return response;
    }
    complete(response, instance, correlation_id)
}

/// An error response as a complete problem document: its [`Problem`] (or one made
/// from its status) naming the request path and correlation id, with the headers and
/// extensions the response already had.
pub fn complete(response: Response, instance: String, correlation_id: Option<String>) -> Response {
    let status = response.status();
    let (parts, _) = response.into_parts();
    let mut problem = parts
        .extensions
        .get::<Problem>()
        .cloned()
        .unwrap_or_else(|| Problem::from_status(status));
    problem.instance.get_or_insert(instance);
    if problem.correlation_id.is_none() {
        problem.correlation_id = correlation_id;
    }
    let mut rendered = problem.render();
    // Keep headers a handler or layer set (Allow on 405, Retry-After...).
    for (name, value) in parts.headers.iter() {
        if name != CONTENT_TYPE && name != http::header::CONTENT_LENGTH {
            rendered.headers_mut().entry(name).or_insert(value.clone());
        }
    }
    // Keep extensions too (the gateway's route label for metrics).
    let mut extensions = parts.extensions;
    extensions.insert(problem);
    *rendered.extensions_mut() = extensions;
    rendered
}

fn is_problem(headers: &http::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(CONTENT_TYPE_PROBLEM))
}
