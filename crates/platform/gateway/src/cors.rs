//! CORS per route: preflights are answered by the gateway (never forwarded), and
//! allowed origins get their `Access-Control-*` headers on the actual response.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use serde::Deserialize;

use chassis::config::HumanDuration;

/// `[cors.<name>]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsPolicy {
    /// Origins allowed (`https://shop.example.com`), or `["*"]` for any.
    pub allow_origins: Vec<String>,
    pub allow_methods: Vec<String>,
    /// Request headers a browser may send; `["*"]` for any.
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    /// Cookies and credentials; never with `*` origins.
    pub allow_credentials: bool,
    /// How long a browser may cache a preflight.
    pub max_age: HumanDuration,
}

impl Default for CorsPolicy {
    fn default() -> Self {
        Self {
            allow_origins: Vec::new(),
            allow_methods: ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
                .map(str::to_owned)
                .to_vec(),
            allow_headers: [
                "authorization",
                "content-type",
                "x-api-key",
                "x-correlation-id",
            ]
            .map(str::to_owned)
            .to_vec(),
            expose_headers: [
                "x-correlation-id",
                "ratelimit",
                "ratelimit-policy",
                "retry-after",
            ]
            .map(str::to_owned)
            .to_vec(),
            allow_credentials: false,
            max_age: HumanDuration::secs(600),
        }
    }
}

impl CorsPolicy {
    /// Every problem of the policy named `name`.
    pub fn validate(&self, name: &str) -> Vec<String> {
        let at = format!("cors.{name}");
        let mut errors = Vec::new();
        if self.allow_origins.is_empty() {
            errors.push(format!("{at}.allow_origins names no origin"));
        }
        let any = self.allow_origins.iter().any(|o| o == "*");
        if any && self.allow_credentials {
            errors.push(format!(
                "{at}: allow_credentials cannot go with the `*` origin (browsers refuse it); list the origins"
            ));
        }
        for o in self.allow_origins.iter().filter(|o| *o != "*") {
            if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
                errors.push(format!(
                    "{at}.allow_origins: `{o}` is not an origin like https://shop.example.com"
                ));
            }
        }
        for m in &self.allow_methods {
            if Method::from_bytes(m.as_bytes()).is_err() {
                errors.push(format!("{at}.allow_methods: `{m}` is not a method"));
            }
        }
        for h in self.allow_headers.iter().chain(&self.expose_headers) {
            if h != "*" && HeaderName::from_bytes(h.as_bytes()).is_err() {
                errors.push(format!("{at}: `{h}` is not a header name"));
            }
        }
        errors
    }

    fn allows(&self, origin: &str) -> bool {
        self.allow_origins.iter().any(|o| o == "*" || o == origin)
    }

    fn origin_value(&self, origin: &HeaderValue) -> HeaderValue {
        // With credentials the origin itself must be named, never `*`.
        if self.allow_origins.iter().any(|o| o == "*") && !self.allow_credentials {
            HeaderValue::from_static("*")
        } else {
            origin.clone()
        }
    }

    /// The answer to a preflight (`OPTIONS` with `Access-Control-Request-Method`):
    /// 204 with the grants, or 403 for an origin or method not allowed.
    pub fn preflight(&self, headers: &HeaderMap) -> (StatusCode, HeaderMap) {
        let mut out = HeaderMap::new();
        out.insert(header::VARY, HeaderValue::from_static("origin"));
        let Some(origin) = headers.get(header::ORIGIN) else {
            return (StatusCode::FORBIDDEN, out);
        };
        let method = headers
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|m| m.to_str().ok())
            .unwrap_or("");
        let allowed = origin.to_str().is_ok_and(|o| self.allows(o))
            && self
                .allow_methods
                .iter()
                .any(|m| m.eq_ignore_ascii_case(method));
        if !allowed {
            return (StatusCode::FORBIDDEN, out);
        }
        out.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            self.origin_value(origin),
        );
        if let Ok(v) = HeaderValue::from_str(&self.allow_methods.join(", ")) {
            out.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v);
        }
        let headers_value = if self.allow_headers.iter().any(|h| h == "*") {
            headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS).cloned()
        } else {
            HeaderValue::from_str(&self.allow_headers.join(", ")).ok()
        };
        if let Some(v) = headers_value {
            out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
        }
        if self.allow_credentials {
            out.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        out.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from(self.max_age.0.as_secs()),
        );
        (StatusCode::NO_CONTENT, out)
    }

    /// Adds the grants for the request's origin (if allowed) to a response.
    pub fn decorate(&self, request_origin: Option<&HeaderValue>, response: &mut HeaderMap) {
        response.append(header::VARY, HeaderValue::from_static("origin"));
        let Some(origin) = request_origin.filter(|o| o.to_str().is_ok_and(|o| self.allows(o)))
        else {
            return;
        };
        response.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            self.origin_value(origin),
        );
        if self.allow_credentials {
            response.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if !self.expose_headers.is_empty()
            && let Ok(v) = HeaderValue::from_str(&self.expose_headers.join(", "))
        {
            response.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
        }
    }
}

/// Whether a request is a CORS preflight.
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(header::ORIGIN)
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impossible_policies_are_named() {
        let policy = CorsPolicy {
            allow_origins: vec!["*".into(), "shop.example.com".into()],
            allow_credentials: true,
            allow_methods: vec!["GE T".into()],
            ..CorsPolicy::default()
        };
        let errors = policy.validate("web");
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(CorsPolicy::default().validate("x")[0].contains("names no origin"));
    }

    #[test]
    fn any_origin_without_credentials_is_a_star() {
        let policy = CorsPolicy {
            allow_origins: vec!["*".into()],
            ..CorsPolicy::default()
        };
        let mut out = HeaderMap::new();
        policy.decorate(
            Some(&HeaderValue::from_static("https://a.example")),
            &mut out,
        );
        assert_eq!(out[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert_eq!(out[header::VARY], "origin");
    }
}
