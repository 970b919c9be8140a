//! The gateway's configuration: process settings (`[gateway]`: ports, keys, the
//! token issuer) and the declarative part that can change while it runs
//! ([`Declarative`]: routes, rate-limit policies, path policy), read either from
//! `[gateway]` itself or from the file `gateway.config_file` names, which is
//! watched and reloaded. docs/gateway.md has a complete example.

use std::collections::BTreeMap;
use std::path::PathBuf;

use chassis::config::HumanDuration;
use chassis::config_section;
use serde::Deserialize;

use crate::normalize::SlashPolicy;

/// Who may use a route.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthPolicy {
    /// No token needed; a token sent anyway is ignored.
    #[default]
    Anonymous,
    /// A valid token, if present, is forwarded as identity; an invalid one is a 401.
    Optional,
    /// A valid token is needed.
    Required,
}

/// Headers a route sets or removes on the way to the upstream or back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderTransform {
    /// Set (replacing any value the message had).
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Removed.
    #[serde(default)]
    pub remove: Vec<String>,
}

impl HeaderTransform {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }
}

/// One route. Exactly one of `prefix`, `exact` and `template` says which paths it
/// takes: `prefix = "/orders"` takes `/orders` and what is under it (on a `/`
/// boundary), `exact = "/health"` that path only, `template = "/orders/{id}"` one
/// value per `{name}` segment (a last `{*name}` takes the rest of the path).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Shown in logs, metrics and the admin API; defaults to the path pattern.
    #[serde(default)]
    pub name: Option<String>,
    /// `shop.example.com` or `*.example.com`; unset takes any host.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub template: Option<String>,
    /// Methods taken (`GET`, `POST`...); empty takes all. A path matched by routes
    /// none of which takes the method is a 405 with `Allow`.
    #[serde(default)]
    pub methods: Vec<String>,
    /// The upstream service (resolved through discovery); empty for a route that
    /// aggregates.
    #[serde(default)]
    pub service: String,
    /// Fan out to these in parallel and merge their JSON answers (GET only), instead
    /// of forwarding to `service`.
    #[serde(default)]
    pub aggregate: Vec<AggregatePart>,
    /// The path sent upstream: replaces the matched prefix, or for a template is a
    /// template itself (`/v2/orders/{id}`), or for an exact route the whole path.
    #[serde(default)]
    pub rewrite: Option<String>,
    /// Deadline for the upstream's response head; the gateway's default otherwise.
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
    #[serde(default)]
    pub auth: AuthPolicy,
    /// Only these API-key consumers (of `api_keys`) may use the route, as Kong's ACL
    /// `allow`: any other caller, a signed-in user included, gets a 403. Needs
    /// `auth = "required"`. Empty: every caller the auth policy lets in.
    #[serde(default)]
    pub consumers: Vec<String>,
    /// A policy of `rate_limits`.
    #[serde(default)]
    pub rate_limit: Option<String>,
    /// A policy of `cors`.
    #[serde(default)]
    pub cors: Option<String>,
    /// A policy of `caches`: GET and HEAD answers are cached as RFC 9111 says.
    #[serde(default)]
    pub cache: Option<String>,
    /// Extra attempts for this route, in place of its upstream's `retries` (the
    /// same rules: failed connects, or idempotent requests without a body).
    #[serde(default)]
    pub retries: Option<u32>,
    #[serde(default)]
    pub request_headers: HeaderTransform,
    #[serde(default)]
    pub response_headers: HeaderTransform,
}

impl RouteConfig {
    /// A prefix route, the common case.
    pub fn prefix(prefix: &str, service: &str, auth: AuthPolicy) -> Self {
        Self {
            prefix: Some(prefix.to_owned()),
            service: service.to_owned(),
            auth,
            ..Self::default()
        }
    }
}

/// One backend of an aggregating route.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatePart {
    pub service: String,
    /// The path asked of it; `{name}`s take the route template's values. The
    /// client's query string is passed on.
    pub path: String,
    /// The answer goes under this key; without one, its object is merged into the
    /// top level (later parts win on a clash).
    #[serde(default)]
    pub key: Option<String>,
    /// This part's deadline (answer and body); the route's timeout otherwise.
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
    /// Without this part there is no answer: its failure fails the request (502 or
    /// 504) instead of being marked missing.
    #[serde(default)]
    pub required: bool,
}

/// What a rate limit counts requests by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitKey {
    /// The client's address (as trusted-proxy rules reveal it).
    #[default]
    Ip,
    /// The authenticated user (`sub`); anonymous requests count by address.
    User,
    /// The API key's consumer; otherwise the user, otherwise the address.
    Consumer,
    /// The whole route, all clients together.
    Route,
}

/// A GCRA policy: `rate` requests per `per`, with up to `burst` at once.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitPolicy {
    pub rate: u32,
    #[serde(default = "one_second")]
    pub per: HumanDuration,
    /// Requests admitted at once after a quiet spell; defaults to `rate`.
    #[serde(default)]
    pub burst: Option<u32>,
    #[serde(default)]
    pub key: LimitKey,
    /// `local` (this gateway's memory) or `redis` (shared by every gateway on
    /// `gateway.redis_url`).
    #[serde(default)]
    pub store: LimitStore,
}

/// Where a rate limit's state lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitStore {
    #[default]
    Local,
    Redis,
}

/// What a Redis-backed limit does while Redis cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisFallback {
    /// Count in this gateway's memory meanwhile (each gateway admits the full
    /// rate: the limit loosens by the number of gateways, and no one is locked out).
    #[default]
    Local,
    /// Admit everything.
    Allow,
    /// Refuse with a 503 (for limits that protect something that must not be
    /// overrun).
    Deny,
}

fn one_second() -> HumanDuration {
    HumanDuration::secs(1)
}

/// The declarative, reloadable configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Declarative {
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub rate_limits: BTreeMap<String, RateLimitPolicy>,
    /// Repeated slashes in paths: `merge` (default), `reject` or `keep`.
    #[serde(default)]
    pub slashes: SlashPolicy,
    /// API keys by consumer name, as the hex SHA-256 of the key (sent in `X-Api-Key`).
    #[serde(default)]
    pub api_keys: BTreeMap<String, ApiKeyConfig>,
    /// Per upstream service: balancing, retries, outlier ejection.
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// CORS policies routes name.
    #[serde(default)]
    pub cors: BTreeMap<String, crate::cors::CorsPolicy>,
    /// Cache policies routes name.
    #[serde(default)]
    pub caches: BTreeMap<String, CachePolicy>,
}

/// Whether answers to authenticated requests are cached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthenticatedCaching {
    /// Requests with a caller (token or API key) bypass the cache.
    #[default]
    Never,
    /// One copy for every caller: for answers that do not depend on who asks.
    Shared,
    /// One copy per caller (`sub`).
    PerUser,
}

/// Where cached answers live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheStore {
    /// This gateway's memory, bounded by `gateway.cache_max_bytes`.
    #[default]
    Memory,
    /// `gateway.redis_url`, shared by every gateway (memory when none is set).
    Redis,
}

/// `[caches.<name>]`: a shared HTTP cache (RFC 9111) for the routes naming it.
/// Freshness comes from the upstream (`s-maxage`, `max-age`, `Expires`); `no-store`,
/// `private`, `Set-Cookie` and `Vary: *` keep an answer out.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CachePolicy {
    /// Freshness for answers that state none; `0s` stores only answers that do.
    pub default_ttl: HumanDuration,
    /// No answer is fresh for longer than this, whatever it says.
    pub max_ttl: HumanDuration,
    /// How long past its freshness an answer may still be served while the upstream
    /// fails (5xx, unreachable, timed out), unless it says `must-revalidate`; its
    /// own `stale-if-error=N` wins.
    pub stale_if_error: HumanDuration,
    /// Larger answers are forwarded, not stored.
    pub max_object_bytes: u64,
    pub authenticated: AuthenticatedCaching,
    pub store: CacheStore,
}

impl Default for CachePolicy {
    fn default() -> Self {
        Self {
            default_ttl: HumanDuration::secs(0),
            max_ttl: HumanDuration::secs(86_400),
            stale_if_error: HumanDuration::secs(0),
            max_object_bytes: 1024 * 1024,
            authenticated: AuthenticatedCaching::Never,
            store: CacheStore::Memory,
        }
    }
}

/// How an upstream's instance is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    /// Power of two choices: of two random instances, the one with fewer requests
    /// outstanding times its recent (EWMA) latency.
    P2c,
    /// The same key always reaches the same instance while it is up (rendezvous
    /// hashing: an instance leaving moves only its own keys).
    ConsistentHash,
}

/// What consistent hashing hashes: `header:<name>`, `cookie:<name>` or
/// `param:<name>` (a `{name}` of the route's template).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum HashOn {
    Header(String),
    Cookie(String),
    Param(String),
}

impl TryFrom<String> for HashOn {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("header", n)) if !n.is_empty() => Ok(Self::Header(n.to_ascii_lowercase())),
            Some(("cookie", n)) if !n.is_empty() => Ok(Self::Cookie(n.to_owned())),
            Some(("param", n)) if !n.is_empty() => Ok(Self::Param(n.to_owned())),
            _ => Err(format!(
                "`{s}`: hash_on is `header:<name>`, `cookie:<name>` or `param:<name>`"
            )),
        }
    }
}

/// `[upstreams.<service>]`: balancing, retries and outlier ejection for one
/// upstream service; services not listed get the defaults.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub lb: LbPolicy,
    pub hash_on: Option<HashOn>,
    /// Extra attempts (on another instance) for a failed connect, or for an
    /// idempotent request without a body that got 502/503/504 or no answer.
    pub retries: u32,
    /// Retries allowed as a share of requests, in percent (a budget, so retries
    /// cannot multiply an outage).
    pub retry_budget_percent: u8,
    /// Consecutive failures (5xx, connect errors, timeouts) that eject an instance.
    pub outlier_consecutive_failures: u32,
    /// First ejection; each further one of the same instance doubles it...
    pub outlier_base_ejection: HumanDuration,
    /// ...up to this.
    pub outlier_max_ejection: HumanDuration,
    /// Most instances ejected at once, in percent (at least one of two or more).
    pub outlier_max_ejected_percent: u8,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            lb: LbPolicy::RoundRobin,
            hash_on: None,
            retries: 1,
            retry_budget_percent: 20,
            outlier_consecutive_failures: 5,
            outlier_base_ejection: HumanDuration::secs(10),
            outlier_max_ejection: HumanDuration::secs(300),
            outlier_max_ejected_percent: 50,
        }
    }
}

impl UpstreamConfig {
    pub fn retry_budget(&self) -> f32 {
        f32::from(self.retry_budget_percent) / 100.0
    }
}

/// One consumer's API key, stored hashed: `sha256 = "<sha256sum of the key>"`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub sha256: String,
}

impl ApiKeyConfig {
    /// The entry for `key`, as `sha256sum` gives it (for a program that makes keys).
    pub fn of_key(key: &str) -> Self {
        use sha2::Digest;
        Self {
            sha256: hex::encode(sha2::Sha256::digest(key.as_bytes())),
        }
    }
}

/// A token verification key from configuration, pinned to one algorithm.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Tokens naming this `kid` use this key; without it, the key serves tokens that
    /// name none (and whose `alg` is this key's).
    #[serde(default)]
    pub kid: Option<String>,
    /// `HS256` (the guide's shared secret), `RS256`, `ES256`, `EdDSA`...
    pub alg: String,
    /// The HMAC secret, for HS256/384/512.
    #[serde(default)]
    pub secret: Option<chassis::secrecy::SecretString>,
    /// A PEM public key, for the others.
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
}

impl Declarative {
    /// Parses a configuration file's text (TOML); every problem is named: each
    /// route, policy and section is read on its own, so a mistyped field in one
    /// does not hide the mistakes of the others (only a TOML syntax error stops the
    /// reading where it is).
    pub fn from_toml(text: &str) -> Result<Self, Vec<String>> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| vec![e.to_string()])?;
        let mut errors = Vec::new();
        let mut parsed = Self::default();
        for (key, value) in table {
            match key.as_str() {
                "routes" => match value {
                    toml::Value::Array(routes) => {
                        for (i, route) in routes.into_iter().enumerate() {
                            if let Some(route) = read(route, &format!("routes[{i}]"), &mut errors) {
                                parsed.routes.push(route);
                            }
                        }
                    }
                    _ => errors.push("`routes` must be an array of tables ([[routes]])".into()),
                },
                "rate_limits" => read_each(value, &key, &mut parsed.rate_limits, &mut errors),
                "api_keys" => read_each(value, &key, &mut parsed.api_keys, &mut errors),
                "upstreams" => read_each(value, &key, &mut parsed.upstreams, &mut errors),
                "cors" => read_each(value, &key, &mut parsed.cors, &mut errors),
                "caches" => read_each(value, &key, &mut parsed.caches, &mut errors),
                "slashes" => {
                    if let Some(policy) = read(value, "slashes", &mut errors) {
                        parsed.slashes = policy;
                    }
                }
                _ => errors.push(format!(
                    "`{key}` is not a setting of this file (routes, rate_limits, slashes, \
                     api_keys, upstreams, cors, caches)"
                )),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let errors = parsed.validate();
        if errors.is_empty() {
            Ok(parsed)
        } else {
            Err(errors)
        }
    }

    /// Every problem, so they are reported together.
    pub fn validate(&self) -> Vec<String> {
        self.compile().err().unwrap_or_default()
    }

    /// The route table and the API keys indexed by hash, or every problem in both.
    pub fn compile(
        &self,
    ) -> Result<(crate::routes::RouteTable, crate::auth::ApiKeys), Vec<String>> {
        let table = crate::routes::RouteTable::compile(self);
        let keys =
            crate::auth::ApiKeys::new(self.api_keys.iter().map(|(name, k)| (name, &k.sha256)));
        match (table, keys) {
            (Ok(table), Ok(keys)) => Ok((table, keys)),
            (table, keys) => {
                let mut errors = table.err().unwrap_or_default();
                errors.extend(keys.err().unwrap_or_default());
                Err(errors)
            }
        }
    }
}

/// `value` as a `T`, or an error naming `at` in `errors`.
fn read<T: serde::de::DeserializeOwned>(
    value: toml::Value,
    at: &str,
    errors: &mut Vec<String>,
) -> Option<T> {
    value
        .try_into()
        .map_err(|e: toml::de::Error| errors.push(format!("{at}: {}", e.message().trim_end())))
        .ok()
}

/// Each entry of the table `value` (section `at`) as a `T`, into `into`; every
/// entry that is not one named in `errors`.
fn read_each<T: serde::de::DeserializeOwned>(
    value: toml::Value,
    at: &str,
    into: &mut BTreeMap<String, T>,
    errors: &mut Vec<String>,
) {
    let toml::Value::Table(entries) = value else {
        errors.push(format!("`{at}` must be a table ([{at}.NAME] sections)"));
        return;
    };
    for (name, entry) in entries {
        if let Some(v) = read(entry, &format!("{at}.{name}"), errors) {
            into.insert(name, v);
        }
    }
}

config_section! {
    /// `[gateway.auth]`: the issuer of the access tokens clients present.
    pub struct AuthSettings {
        /// Service serving the issuer's JWKS (found through discovery); empty for
        /// none.
        pub jwks_service: String = "users".to_owned(),
        pub jwks_path: String = "/.well-known/jwks.json".to_owned(),
        /// The JWKS at an absolute URL instead of a service.
        pub jwks_url: Option<String> = None,
        /// Keys from configuration, tried before the JWKS: `[[gateway.auth.keys]]`.
        pub keys: Vec<KeyConfig> = Vec::new(),
        /// The claim forwarded as the caller's identity.
        pub subject_claim: String = "sub".to_owned(),
        /// The claim forwarded as the caller's e-mail, when present.
        pub email_claim: String = "email".to_owned(),
        /// More claims passed on in the forwarded identity: the name a service
        /// reads (`Identity::claims`) -> where it is in the access token, dots
        /// going into objects (`roles = "realm_access.roles"`). A claim the token
        /// lacks is left out.
        pub forward_claims: BTreeMap<String, String> = BTreeMap::new(),
        /// Expected `iss`.
        pub issuer: String = "bazaar-users".to_owned(),
        /// Expected `aud`.
        pub audience: String = "bazaar".to_owned(),
        /// Clock skew tolerated on `exp` and `nbf`.
        pub leeway: HumanDuration = HumanDuration::secs(30),
    }
}

/// `[[gateway.listeners]]`: a listener besides the main one (`gateway.port`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// The address to bind; all interfaces by default.
    #[serde(default = "any_address")]
    pub address: String,
    /// `0` picks a free port (logged at start).
    pub port: u16,
    /// Terminate TLS here (HTTP/2 through ALPN, HTTP/1.1 otherwise).
    #[serde(default)]
    pub tls: Option<crate::tls::TlsConfig>,
}

fn any_address() -> String {
    "0.0.0.0".to_owned()
}

config_section! {
    /// `[gateway]`
    pub struct Settings {
        /// The public port.
        pub port: u16 = 8080,
        /// TLS on the main port: `tls = { cert_file = "...", key_file = "..." }`.
        pub tls: Option<crate::tls::TlsConfig> = None,
        /// More listeners, each plain or TLS.
        pub listeners: Vec<ListenerConfig> = Vec::new(),
        /// The admin API's port, on loopback (`0` picks a free one).
        pub admin_port: u16 = 8081,
        /// The admin API's address; loopback unless you mean to expose it.
        pub admin_address: String = "127.0.0.1".to_owned(),
        /// Threads serving requests, each with its own connections; 0: one per core.
        pub workers: usize = 0,
        /// Request line and headers, in bytes; past it, 431.
        pub max_header_bytes: usize = 16 * 1024,
        /// Header fields per request; past it, 431.
        pub max_headers: usize = 100,
        /// Path and query, in bytes; past it, 414.
        pub max_uri_bytes: usize = 8 * 1024,
        /// A client has this long to send its request head (slow clients).
        pub header_timeout: HumanDuration = HumanDuration::secs(10),
        /// HTTP/2 streams a connection may have open at once.
        pub h2_max_concurrent_streams: u32 = 100,
        /// HTTP/2 streams a client may reset before the server caught up (rapid
        /// reset); past it the connection is closed.
        pub h2_max_pending_resets: usize = 20,
        /// An HTTP/2 connection with no open stream for this long is closed
        /// gracefully (GOAWAY); HTTP/1.1 connections idle out after
        /// `header_timeout`.
        pub h2_idle_timeout: HumanDuration = HumanDuration::secs(60),
        /// Deadline for an upstream's response head: past it the client gets a 504.
        /// Below `http.request_timeout` so the gateway answers before its own limit.
        pub upstream_timeout: HumanDuration = HumanDuration::secs(15),
        /// PKCS#8 PEM key that signs forwarded identities; created on first start.
        /// Unset means `<data_dir>/gateway/identity-key.pem`.
        pub identity_key_file: Option<PathBuf> = None,
        /// A TOML file holding the declarative configuration (routes, rate limits,
        /// slashes), watched and reloaded on change, SIGHUP or `POST /reload` on the
        /// admin port. When set, the inline `routes` and `rate_limits` are ignored.
        pub config_file: Option<PathBuf> = None,
        /// Routes; `bazaar` fills in the shop's when none are configured.
        pub routes: Vec<RouteConfig> = Vec::new(),
        pub rate_limits: BTreeMap<String, RateLimitPolicy> = BTreeMap::new(),
        pub slashes: SlashPolicy = SlashPolicy::Merge,
        /// Redis for `store = "redis"` rate limits (one round trip per request) and
        /// caches. The gateway starts without it and reconnects when it returns.
        pub redis_url: Option<chassis::secrecy::SecretString> = None,
        /// Key prefix in Redis, so gateways of different shops can share one.
        pub redis_prefix: String = "bazaar:gateway".to_owned(),
        /// What Redis-backed limits do while Redis is unreachable.
        pub redis_fallback: RedisFallback = RedisFallback::Local,
        /// Proxies in front of the gateway whose `X-Forwarded-*` are believed:
        /// addresses or CIDR ranges. Empty: the peer is the client.
        pub trusted_proxies: Vec<String> = Vec::new(),
        pub api_keys: BTreeMap<String, ApiKeyConfig> = BTreeMap::new(),
        pub upstreams: BTreeMap<String, UpstreamConfig> = BTreeMap::new(),
        pub cors: BTreeMap<String, crate::cors::CorsPolicy> = BTreeMap::new(),
        pub caches: BTreeMap<String, CachePolicy> = BTreeMap::new(),
        /// Memory for cached answers (bodies, headers and keys), in bytes; the least
        /// useful entries go first past it.
        pub cache_max_bytes: u64 = 64 * 1024 * 1024,
        pub auth: AuthSettings,
    }
}

impl Settings {
    /// The inline declarative configuration.
    pub fn declarative(&self) -> Declarative {
        Declarative {
            routes: self.routes.clone(),
            rate_limits: self.rate_limits.clone(),
            slashes: self.slashes,
            api_keys: self.api_keys.clone(),
            upstreams: self.upstreams.clone(),
            cors: self.cors.clone(),
            caches: self.caches.clone(),
        }
    }
}

/// Every problem in a route table, so they are reported together.
pub fn validate_routes(routes: &[RouteConfig]) -> Vec<String> {
    Declarative {
        routes: routes.to_vec(),
        ..Declarative::default()
    }
    .validate()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Mistakes of shape (a misspelt field, a wrong type, an unknown section) in
    /// several places are all named, each with where it is, not only the first.
    #[test]
    fn every_mistake_of_a_files_shape_is_named_with_its_place() {
        let text = r#"
            slashes = "sometimes"
            colour = "blue"

            [[routes]]
            prefix = "/a"
            service = "a"
            timout = "1s"

            [[routes]]
            prefix = "/b"
            service = "b"

            [[routes]]
            prefix = "/c"
            service = 3

            [rate_limits.tight]
            rate = "many"

            [upstreams.b]
            retries = 1
        "#;
        let errors = Declarative::from_toml(text).unwrap_err();
        let named = |at: &str| errors.iter().any(|e| e.starts_with(at));
        assert_eq!(errors.len(), 5, "{errors:#?}");
        assert!(named("slashes:"), "{errors:#?}");
        assert!(
            errors.iter().any(|e| e.starts_with("`colour`")),
            "{errors:#?}"
        );
        assert!(named("routes[0]:") && errors.iter().any(|e| e.contains("timout")));
        assert!(named("routes[2]:"), "{errors:#?}");
        assert!(named("rate_limits.tight:"), "{errors:#?}");
        // A file whose shape is right still has its meaning checked whole.
        let errors = Declarative::from_toml(
            "[[routes]]\nprefix = \"a\"\nservice = \"\"\nmethods = [\"NOT A METHOD\"]\n",
        )
        .unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:#?}");
        // And a sound one reads as it did.
        let ok = Declarative::from_toml(
            "slashes = \"reject\"\n[[routes]]\nprefix = \"/a\"\nservice = \"a\"\n\
             [upstreams.a]\nretries = 2\n",
        )
        .unwrap();
        assert_eq!(ok.routes.len(), 1);
        assert_eq!(ok.slashes, SlashPolicy::Reject);
        assert_eq!(ok.upstreams["a"].retries, 2);
    }
}
