//! `[gateway]` settings.

use std::path::PathBuf;

use chassis::config::HumanDuration;
use chassis::config_section;
use serde::Deserialize;

/// Who may use a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthPolicy {
    /// No token needed; a token sent anyway is ignored.
    Anonymous,
    /// A valid token, if present, is forwarded as identity; an invalid one is a 401.
    Optional,
    /// A valid token is needed.
    Required,
}

/// One route: requests whose path is `prefix` or under it (on a `/` boundary) go to
/// `service`. The longest matching prefix wins.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub prefix: String,
    pub service: String,
    pub auth: AuthPolicy,
}

config_section! {
    /// `[gateway.auth]`: the issuer of the access tokens clients present.
    pub struct AuthSettings {
        /// Service serving the issuer's JWKS.
        pub jwks_service: String = "users".to_owned(),
        pub jwks_path: String = "/.well-known/jwks.json".to_owned(),
        /// Expected `iss`.
        pub issuer: String = "bazaar-users".to_owned(),
        /// Expected `aud`.
        pub audience: String = "bazaar".to_owned(),
        /// Clock skew tolerated on `exp` and `nbf`.
        pub leeway: HumanDuration = HumanDuration::secs(30),
    }
}

config_section! {
    /// `[gateway]`
    pub struct Settings {
        /// The public port.
        pub port: u16 = 8080,
        /// Deadline for an upstream's response head: past it the client gets a 504.
        /// Below `http.request_timeout` so the gateway answers before its own limit.
        pub upstream_timeout: HumanDuration = HumanDuration::secs(15),
        /// PKCS#8 PEM key that signs forwarded identities; created on first start.
        /// Unset means `<data_dir>/gateway/identity-key.pem`.
        pub identity_key_file: Option<PathBuf> = None,
        /// Routes; `bazaar` fills in the shop's when none are configured.
        pub routes: Vec<RouteConfig> = Vec::new(),
        pub auth: AuthSettings,
    }
}

/// Every problem in a route table, so they are reported together.
pub fn validate_routes(routes: &[RouteConfig]) -> Vec<String> {
    let mut errors = Vec::new();
    if routes.is_empty() {
        errors.push("gateway.routes: no routes; add at least one [[gateway.routes]]".to_owned());
    }
    for (i, r) in routes.iter().enumerate() {
        let at = format!("gateway.routes[{i}]");
        if !r.prefix.starts_with('/') {
            errors.push(format!("{at}.prefix `{}` must start with `/`", r.prefix));
        }
        if r.prefix.len() > 1 && r.prefix.ends_with('/') {
            errors.push(format!("{at}.prefix `{}` must not end with `/`", r.prefix));
        }
        if r.service.trim().is_empty() {
            errors.push(format!("{at}.service must name a service"));
        }
        if routes[..i].iter().any(|o| o.prefix == r.prefix) {
            errors.push(format!("{at}.prefix `{}` is defined twice", r.prefix));
        }
    }
    errors
}
