//! The route table, compiled from [`Declarative`] once per (re)load: host, path
//! pattern and methods pick a route; its rewrite, timeout, policies and header
//! transforms say what happens next.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method};

use crate::configuration::{AuthPolicy, Declarative, HeaderTransform, RouteConfig};

/// How a route's paths are matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
    /// Segments: literal, `{name}` (one segment) or a last `{*name}` (the rest).
    Template(Vec<Segment>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    Param(String),
    Rest(String),
}

/// Header changes, parsed once.
#[derive(Clone, Debug, Default)]
pub struct Transform {
    set: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl Transform {
    /// Whether it sets or removes nothing.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
    }
}

#[derive(Clone, Debug)]
pub struct Route {
    /// The metrics and log label, shared to avoid an allocation per request.
    pub label: Arc<str>,
    pub host: Option<String>,
    pub pattern: Pattern,
    /// Empty: every method.
    pub methods: Vec<Method>,
    /// Shared: every request's access line names it.
    pub service: Arc<str>,
    pub rewrite: Option<String>,
    pub timeout: Option<Duration>,
    pub auth: AuthPolicy,
    /// The only API-key consumers let in; empty: any caller.
    pub consumers: Vec<String>,
    pub rate_limit: Option<String>,
    pub cors: Option<crate::cors::CorsPolicy>,
    /// The cache policy's name (it keys the stored answers) and the policy.
    pub cache: Option<(Arc<str>, crate::configuration::CachePolicy)>,
    pub retries: Option<u32>,
    pub request_headers: Transform,
    pub response_headers: Transform,
    /// The route as configured, for the admin API.
    pub config: RouteConfig,
}

/// What matching found.
#[derive(Debug)]
pub enum Match<'a> {
    Found {
        route: &'a Route,
        /// The path to send upstream.
        upstream_path: String,
        /// What a template captured.
        params: Vec<(String, String)>,
    },
    /// The path is routed, but not for this method: these are.
    MethodNotAllowed(Vec<Method>),
    NotFound,
}

/// Routes, most specific first: a named host before any host, then exact, template
/// (more literal segments first) and prefix (longest first).
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Compiles `config`, or returns every problem in it.
    pub fn compile(config: &Declarative) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        if config.routes.is_empty() {
            errors.push("routes: no routes; add at least one [[routes]]".to_owned());
        }
        let mut routes = Vec::new();
        let mut seen: BTreeMap<(Option<String>, String), usize> = BTreeMap::new();
        for (i, c) in config.routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            let before = errors.len();
            let pattern = match (&c.prefix, &c.exact, &c.template) {
                (Some(p), None, None) => {
                    check_pattern_path(&at, "prefix", p, &mut errors);
                    if p.len() > 1 && p.ends_with('/') {
                        errors.push(format!("{at}.prefix `{p}` must not end with `/`"));
                    }
                    Pattern::Prefix(p.clone())
                }
                (None, Some(e), None) => {
                    check_pattern_path(&at, "exact", e, &mut errors);
                    Pattern::Exact(e.clone())
                }
                (None, None, Some(t)) => {
                    check_pattern_path(&at, "template", t, &mut errors);
                    match parse_template(t) {
                        Ok(segments) => Pattern::Template(segments),
                        Err(e) => {
                            errors.push(format!("{at}.template `{t}`: {e}"));
                            Pattern::Exact(t.clone())
                        }
                    }
                }
                _ => {
                    errors.push(format!(
                        "{at}: give exactly one of `prefix`, `exact` or `template`"
                    ));
                    Pattern::Exact(String::new())
                }
            };
            let shown = pattern.describe();
            if let Some(j) = seen.insert((c.host.clone(), format!("{shown} {:?}", c.methods)), i) {
                errors.push(format!("{at}: same host, path and methods as routes[{j}]"));
            }
            let mut methods = Vec::new();
            for m in &c.methods {
                match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                    Ok(m) => methods.push(m),
                    Err(_) => errors.push(format!("{at}.methods: `{m}` is not an HTTP method")),
                }
            }
            match (c.service.trim().is_empty(), c.aggregate.is_empty()) {
                (true, true) => errors.push(format!(
                    "{at}: give `service`, or `aggregate` to merge several"
                )),
                (false, false) => {
                    errors.push(format!("{at}: give `service` or `aggregate`, not both"))
                }
                _ => {}
            }
            if !c.aggregate.is_empty() {
                check_aggregate(&at, c, &pattern, &methods, &mut errors);
            }
            if let Some(host) = &c.host {
                let bare = host.strip_prefix("*.").unwrap_or(host);
                if bare.is_empty()
                    || bare.contains('*')
                    || !bare
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':'))
                {
                    errors.push(format!(
                        "{at}.host `{host}` must be a host name, optionally starting with `*.`"
                    ));
                }
            }
            if let Some(rewrite) = &c.rewrite {
                if !rewrite.starts_with('/') {
                    errors.push(format!("{at}.rewrite `{rewrite}` must start with `/`"));
                }
                if let Pattern::Template(segments) = &pattern {
                    let names: Vec<&str> = segments
                        .iter()
                        .filter_map(|s| match s {
                            Segment::Param(n) | Segment::Rest(n) => Some(n.as_str()),
                            Segment::Literal(_) => None,
                        })
                        .collect();
                    for used in placeholders(rewrite) {
                        if !names.contains(&used) {
                            errors.push(format!(
                                "{at}.rewrite uses `{{{used}}}`, which the template does not capture"
                            ));
                        }
                    }
                }
            }
            if let Some(policy) = &c.cors
                && !config.cors.contains_key(policy)
            {
                errors.push(format!("{at}.cors `{policy}` is not a policy of [cors]"));
            }
            if let Some(policy) = &c.cache
                && !config.caches.contains_key(policy)
            {
                errors.push(format!("{at}.cache `{policy}` is not a policy of [caches]"));
            }
            if !c.consumers.is_empty() && c.auth != AuthPolicy::Required {
                errors.push(format!(
                    "{at}.consumers needs auth = \"required\": an anonymous caller is no consumer"
                ));
            }
            for consumer in &c.consumers {
                if !config.api_keys.contains_key(consumer) {
                    errors.push(format!(
                        "{at}.consumers: `{consumer}` is not a consumer of [api_keys]"
                    ));
                }
            }
            if let Some(policy) = &c.rate_limit
                && !config.rate_limits.contains_key(policy)
            {
                errors.push(format!(
                    "{at}.rate_limit `{policy}` is not a policy of [rate_limits]"
                ));
            }
            let request_headers = transform(
                &format!("{at}.request_headers"),
                &c.request_headers,
                &mut errors,
            );
            let response_headers = transform(
                &format!("{at}.response_headers"),
                &c.response_headers,
                &mut errors,
            );
            if errors.len() > before {
                continue;
            }
            routes.push(Route {
                label: Arc::from(c.name.clone().unwrap_or(shown).as_str()),
                host: c.host.as_ref().map(|h| h.to_ascii_lowercase()),
                pattern,
                methods,
                service: c.service.as_str().into(),
                rewrite: c.rewrite.clone(),
                timeout: c.timeout.map(|t| t.0),
                auth: c.auth,
                consumers: c.consumers.clone(),
                rate_limit: c.rate_limit.clone(),
                cors: c.cors.as_ref().and_then(|n| config.cors.get(n)).cloned(),
                cache: c.cache.as_ref().and_then(|n| {
                    config
                        .caches
                        .get(n)
                        .map(|p| (Arc::from(n.as_str()), p.clone()))
                }),
                retries: c.retries,
                request_headers,
                response_headers,
                config: c.clone(),
            });
        }
        for (name, policy) in &config.cors {
            errors.extend(policy.validate(name));
        }
        for (name, u) in &config.upstreams {
            let at = format!("upstreams.{name}");
            if u.lb == crate::configuration::LbPolicy::ConsistentHash && u.hash_on.is_none() {
                errors.push(format!("{at}: lb = \"consistent_hash\" needs hash_on"));
            }
            if u.retry_budget_percent > 100 || u.outlier_max_ejected_percent > 100 {
                errors.push(format!("{at}: percentages are 0 to 100"));
            }
            if u.outlier_consecutive_failures == 0 {
                errors.push(format!(
                    "{at}.outlier_consecutive_failures must be at least 1"
                ));
            }
        }
        for (name, p) in &config.caches {
            let at = format!("caches.{name}");
            if p.max_object_bytes == 0 {
                errors.push(format!("{at}.max_object_bytes must be at least 1"));
            }
            if p.max_ttl.0 < p.default_ttl.0 {
                errors.push(format!("{at}.default_ttl is longer than max_ttl"));
            }
        }
        for (name, p) in &config.rate_limits {
            let at = format!("rate_limits.{name}");
            if p.rate == 0 {
                errors.push(format!("{at}.rate must be at least 1"));
            }
            if p.per.0.is_zero() {
                errors.push(format!("{at}.per must be longer than 0"));
            }
            if p.burst == Some(0) {
                errors.push(format!("{at}.burst must be at least 1"));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        routes.sort_by_key(specificity);
        Ok(Self { routes })
    }

    /// The route for `host` (without port), `method` and the normalized `path`.
    pub fn matching(&self, host: Option<&str>, method: &Method, path: &str) -> Match<'_> {
        let mut allowed: Vec<Method> = Vec::new();
        for route in &self.routes {
            if !host_matches(route.host.as_deref(), host) {
                continue;
            }
            let Some((upstream_path, params)) = path_matches(route, path) else {
                continue;
            };
            if route.methods.is_empty() || route.methods.contains(method) {
                return Match::Found {
                    route,
                    upstream_path,
                    params,
                };
            }
            allowed.extend(route.methods.iter().cloned());
        }
        if allowed.is_empty() {
            Match::NotFound
        } else {
            allowed.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            allowed.dedup();
            Match::MethodNotAllowed(allowed)
        }
    }

    /// The route a documented `path` would take (any host, any method): for the
    /// merged OpenAPI document.
    pub fn route_for_doc(&self, path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.host.is_none() && doc_matches(r, path))
    }

    pub fn services(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .routes
            .iter()
            .flat_map(|r| {
                std::iter::once(r.service.to_string())
                    .chain(r.config.aggregate.iter().map(|p| p.service.clone()))
            })
            .filter(|s| !s.is_empty())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }
}

fn check_pattern_path(at: &str, field: &str, path: &str, errors: &mut Vec<String>) {
    if !path.starts_with('/') {
        errors.push(format!("{at}.{field} `{path}` must start with `/`"));
    } else if crate::normalize::normalize(path, crate::normalize::SlashPolicy::Keep)
        .map(|n| n != path)
        .unwrap_or(true)
        && !path.contains('{')
    {
        errors.push(format!(
            "{at}.{field} `{path}` is not a normalized path (no dot segments or needless escapes), so no request could match it"
        ));
    }
}

fn parse_template(t: &str) -> Result<Vec<Segment>, String> {
    let parts: Vec<&str> = t[1..].split('/').collect();
    let mut segments = Vec::new();
    let mut names = Vec::new();
    for (n, part) in parts.iter().enumerate() {
        let segment = if let Some(inner) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}'))
        {
            let (rest, name) = match inner.strip_prefix('*') {
                Some(name) => (true, name),
                None => (false, inner),
            };
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!(
                    "`{part}`: a parameter is `{{name}}` or `{{*name}}`"
                ));
            }
            if names.contains(&name) {
                return Err(format!("`{name}` is captured twice"));
            }
            names.push(name);
            if rest {
                if n != parts.len() - 1 {
                    return Err(format!("`{part}` must be the last segment"));
                }
                Segment::Rest(name.to_owned())
            } else {
                Segment::Param(name.to_owned())
            }
        } else if part.contains('{') || part.contains('}') {
            return Err(format!("`{part}`: a parameter takes a whole segment"));
        } else {
            Segment::Literal((*part).to_owned())
        };
        segments.push(segment);
    }
    Ok(segments)
}

/// An aggregating route's parts: a path each, using only captured names, GET only,
/// keys distinct, no cache (each part is its own request).
fn check_aggregate(
    at: &str,
    c: &RouteConfig,
    pattern: &Pattern,
    methods: &[Method],
    errors: &mut Vec<String>,
) {
    if methods.is_empty()
        || methods
            .iter()
            .any(|m| m != Method::GET && m != Method::HEAD)
    {
        errors.push(format!(
            "{at}: an aggregating route takes GET (and HEAD) only; set methods = [\"GET\"]"
        ));
    }
    if c.cache.is_some() || c.rewrite.is_some() {
        errors.push(format!(
            "{at}: an aggregating route has no `cache` or `rewrite` (each part has its own path)"
        ));
    }
    let captured: Vec<&str> = match pattern {
        Pattern::Template(segments) => segments
            .iter()
            .filter_map(|s| match s {
                Segment::Param(n) | Segment::Rest(n) => Some(n.as_str()),
                Segment::Literal(_) => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let mut keys = std::collections::BTreeSet::new();
    for (j, part) in c.aggregate.iter().enumerate() {
        let at = format!("{at}.aggregate[{j}]");
        if part.service.trim().is_empty() {
            errors.push(format!("{at}.service must name a service"));
        }
        if !part.path.starts_with('/') {
            errors.push(format!("{at}.path `{}` must start with `/`", part.path));
        }
        for used in placeholders(&part.path) {
            if !captured.contains(&used) {
                errors.push(format!(
                    "{at}.path uses `{{{used}}}`, which the route's template does not capture"
                ));
            }
        }
        if let Some(key) = &part.key
            && (key.is_empty() || key == MISSING || !keys.insert(key.clone()))
        {
            errors.push(format!(
                "{at}.key `{key}` must be non-empty, unique and not `{MISSING}`"
            ));
        }
    }
}

/// The top-level field of an aggregated answer that names the parts missing from it.
pub const MISSING: &str = "_missing";

/// `path` (which may carry a query of its own) with the client's `query` added.
pub fn with_query(path: String, query: Option<&str>) -> String {
    match (query, path.contains('?')) {
        (Some(q), true) => format!("{path}&{q}"),
        (Some(q), false) => format!("{path}?{q}"),
        (None, _) => path,
    }
}

/// `template` with the route's captured values put in, in one pass over the
/// template: a captured value is the client's text, and one holding `{name}` (the
/// http crate takes braces in a path) must not be filled in again. A placeholder
/// nothing captured stays as it is.
pub fn fill(template: &str, params: &[(String, String)]) -> String {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push_str(&rest[open..]);
            return out;
        };
        let name = &after[..close];
        let bare = name.strip_prefix('*').unwrap_or(name);
        match params.iter().find(|(n, _)| n == bare) {
            Some((_, value)) => out.push_str(value),
            None => {
                out.push('{');
                out.push_str(name);
                out.push('}');
            }
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

/// The `{name}`s a rewrite uses.
fn placeholders(rewrite: &str) -> impl Iterator<Item = &str> {
    rewrite.split('{').skip(1).filter_map(|s| {
        let name = s.split('}').next()?;
        Some(name.strip_prefix('*').unwrap_or(name))
    })
}

fn transform(at: &str, t: &HeaderTransform, errors: &mut Vec<String>) -> Transform {
    let mut out = Transform::default();
    for (name, value) in &t.set {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(n), Ok(v)) => out.set.push((n, v)),
            (Err(_), _) => errors.push(format!("{at}.set: `{name}` is not a header name")),
            (_, Err(_)) => errors.push(format!(
                "{at}.set.{name}: the value is not a valid header value"
            )),
        }
    }
    for name in &t.remove {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(n) => out.remove.push(n),
            Err(_) => errors.push(format!("{at}.remove: `{name}` is not a header name")),
        }
    }
    out
}

impl Pattern {
    /// The pattern as written in the configuration (`/orders/{id}`).
    pub fn describe(&self) -> String {
        match self {
            Pattern::Exact(e) => e.clone(),
            Pattern::Prefix(p) => p.clone(),
            Pattern::Template(segments) => {
                let mut s = String::new();
                for seg in segments {
                    s.push('/');
                    match seg {
                        Segment::Literal(l) => s.push_str(l),
                        Segment::Param(n) => s.push_str(&format!("{{{n}}}")),
                        Segment::Rest(n) => s.push_str(&format!("{{*{n}}}")),
                    }
                }
                s
            }
        }
    }

    /// The configuration key it is written under.
    pub fn kind(&self) -> &'static str {
        match self {
            Pattern::Exact(_) => "exact",
            Pattern::Prefix(_) => "prefix",
            Pattern::Template(_) => "template",
        }
    }
}

/// Sort key: smaller is tried first.
fn specificity(r: &Route) -> (u8, u8, std::cmp::Reverse<usize>, u8) {
    let host = match &r.host {
        Some(h) if !h.starts_with("*.") => 0,
        Some(_) => 1,
        None => 2,
    };
    let (kind, weight) = match &r.pattern {
        Pattern::Exact(e) => (0, e.len()),
        Pattern::Template(segments) => (
            1,
            segments.len() * 2
                + segments
                    .iter()
                    .filter(|s| matches!(s, Segment::Literal(_)))
                    .count()
                - usize::from(matches!(segments.last(), Some(Segment::Rest(_)))),
        ),
        Pattern::Prefix(p) => (2, p.len()),
    };
    // Routes limited to some methods before catch-all ones on the same path.
    (
        host,
        kind,
        std::cmp::Reverse(weight),
        u8::from(r.methods.is_empty()),
    )
}

fn host_matches(pattern: Option<&str>, host: Option<&str>) -> bool {
    let Some(pattern) = pattern else { return true };
    let Some(host) = host else { return false };
    let host = host.to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(domain) => host
            .strip_suffix(domain)
            .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
        None => host == pattern,
    }
}

type Params = Vec<(String, String)>;

/// The upstream path (and the template's captures) if `route` takes `path`.
fn path_matches(route: &Route, path: &str) -> Option<(String, Params)> {
    match &route.pattern {
        Pattern::Exact(e) => (path == e).then(|| {
            (
                route.rewrite.clone().unwrap_or_else(|| path.to_owned()),
                Vec::new(),
            )
        }),
        Pattern::Prefix(p) => {
            let rest = if p == "/" {
                path
            } else if path == p {
                ""
            } else {
                path.strip_prefix(p.as_str())
                    .filter(|r| r.starts_with('/'))?
            };
            let upstream = match &route.rewrite {
                None => path.to_owned(),
                Some(w) if rest.is_empty() => w.clone(),
                Some(w) => format!("{}{rest}", w.trim_end_matches('/')),
            };
            Some((upstream, Vec::new()))
        }
        Pattern::Template(segments) => {
            let mut params: Vec<(&str, &str)> = Vec::new();
            let mut rest = &path[1..];
            for (n, seg) in segments.iter().enumerate() {
                if let Segment::Rest(name) = seg {
                    params.push((name, rest));
                    rest = "";
                    break;
                }
                let (head, tail) = match rest.split_once('/') {
                    Some((h, t)) => (h, Some(t)),
                    None => (rest, None),
                };
                match seg {
                    Segment::Literal(l) if l == head => {}
                    Segment::Param(name) if !head.is_empty() => params.push((name, head)),
                    _ => return None,
                }
                match tail {
                    Some(t) => rest = t,
                    None if n == segments.len() - 1 => rest = "",
                    None => {
                        // The path ended: only a trailing `{*rest}` may still match.
                        if let Some(Segment::Rest(name)) = segments.get(n + 1)
                            && n + 2 == segments.len()
                        {
                            params.push((name, ""));
                            rest = "";
                            break;
                        }
                        return None;
                    }
                }
            }
            if !rest.is_empty() {
                return None;
            }
            let upstream = match &route.rewrite {
                None => path.to_owned(),
                Some(_) => String::new(),
            };
            let params: Vec<(String, String)> = params
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            let upstream = match &route.rewrite {
                Some(w) => fill(w, &params),
                None => upstream,
            };
            Some((upstream, params))
        }
    }
}

/// Whether an OpenAPI path (with `{param}`s) falls under a route.
fn doc_matches(route: &Route, path: &str) -> bool {
    match &route.pattern {
        Pattern::Template(_) => {
            route.pattern.describe() == path || path_matches(route, path).is_some()
        }
        _ => path_matches(route, path).is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::RateLimitPolicy;

    fn table(routes: Vec<RouteConfig>) -> RouteTable {
        RouteTable::compile(&Declarative {
            routes,
            ..Declarative::default()
        })
        .unwrap()
    }

    fn hit(t: &RouteTable, method: Method, path: &str) -> Option<(String, String)> {
        match t.matching(None, &method, path) {
            Match::Found {
                route,
                upstream_path,
                ..
            } => Some((route.label.to_string(), upstream_path)),
            _ => None,
        }
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let t = table(vec![
            RouteConfig::prefix("/users", "users", AuthPolicy::Anonymous),
            RouteConfig::prefix("/users/me", "users", AuthPolicy::Required),
            RouteConfig::prefix("/orders", "orders", AuthPolicy::Required),
        ]);
        let label = |p: &str| hit(&t, Method::GET, p).map(|(l, _)| l);
        assert_eq!(label("/users").as_deref(), Some("/users"));
        assert_eq!(label("/users/me").as_deref(), Some("/users/me"));
        assert_eq!(label("/users/me/x").as_deref(), Some("/users/me"));
        assert_eq!(label("/users/meow").as_deref(), Some("/users"));
        assert_eq!(label("/ordersx"), None);
        assert_eq!(label("/orders/1").as_deref(), Some("/orders"));
        assert_eq!(label("/"), None);
    }

    #[test]
    fn a_captured_value_is_put_in_once_as_it_is() {
        let params = vec![
            ("id".to_owned(), "{rest}".to_owned()),
            ("rest".to_owned(), "a/b".to_owned()),
        ];
        assert_eq!(
            fill("/items/{id}/x/{*rest}", &params),
            "/items/{rest}/x/a/b"
        );
        assert_eq!(fill("/v/{unknown}/{id}", &params), "/v/{unknown}/{rest}");
        assert_eq!(fill("/plain", &params), "/plain");
        assert_eq!(fill("/open/{id", &params), "/open/{id");
    }

    #[test]
    fn exact_template_and_prefix_with_rewrites() {
        let t = table(vec![
            RouteConfig {
                template: Some("/api/orders/{id}/lines/{line}".into()),
                rewrite: Some("/orders/{id}?line={line}".into()),
                service: "orders".into(),
                ..RouteConfig::default()
            },
            RouteConfig {
                template: Some("/files/{*path}".into()),
                rewrite: Some("/blob/{path}".into()),
                service: "files".into(),
                ..RouteConfig::default()
            },
            RouteConfig {
                exact: Some("/api/health".into()),
                rewrite: Some("/health/ready".into()),
                service: "orders".into(),
                ..RouteConfig::default()
            },
            RouteConfig {
                prefix: Some("/api".into()),
                rewrite: Some("/v2".into()),
                service: "legacy".into(),
                ..RouteConfig::default()
            },
        ]);
        let up = |p: &str| hit(&t, Method::GET, p).map(|(_, u)| u);
        assert_eq!(
            up("/api/orders/7/lines/2").as_deref(),
            Some("/orders/7?line=2")
        );
        assert_eq!(
            up("/api/orders/7/lines").as_deref(),
            Some("/v2/orders/7/lines")
        );
        assert_eq!(up("/api/health").as_deref(), Some("/health/ready"));
        assert_eq!(up("/api/health/x").as_deref(), Some("/v2/health/x"));
        assert_eq!(up("/api").as_deref(), Some("/v2"));
        assert_eq!(up("/files/a/b/c").as_deref(), Some("/blob/a/b/c"));
        assert_eq!(up("/files").as_deref(), Some("/blob/"));
        assert_eq!(up("/other"), None);
    }

    #[test]
    fn methods_and_hosts() {
        let t = table(vec![
            RouteConfig {
                prefix: Some("/orders".into()),
                methods: vec!["GET".into()],
                service: "read".into(),
                ..RouteConfig::default()
            },
            RouteConfig {
                prefix: Some("/orders".into()),
                methods: vec!["post".into()],
                service: "write".into(),
                ..RouteConfig::default()
            },
            RouteConfig {
                prefix: Some("/".into()),
                host: Some("*.example.com".into()),
                service: "tenant".into(),
                ..RouteConfig::default()
            },
        ]);
        let service = |host: Option<&str>, m: Method, p: &str| match t.matching(host, &m, p) {
            Match::Found { route, .. } => route.service.to_string(),
            Match::MethodNotAllowed(a) => format!("405 {a:?}"),
            Match::NotFound => "404".into(),
        };
        assert_eq!(service(None, Method::GET, "/orders/1"), "read");
        assert_eq!(service(None, Method::POST, "/orders"), "write");
        assert_eq!(
            service(None, Method::DELETE, "/orders/1"),
            "405 [GET, POST]"
        );
        assert_eq!(service(Some("a.example.com"), Method::GET, "/x"), "tenant");
        assert_eq!(service(Some("A.EXAMPLE.COM"), Method::GET, "/x"), "tenant");
        assert_eq!(service(Some("example.com"), Method::GET, "/x"), "404");
        assert_eq!(
            service(Some("a.example.com"), Method::GET, "/orders"),
            "tenant"
        );
    }

    #[test]
    fn every_problem_is_named() {
        let config = Declarative {
            routes: vec![
                RouteConfig {
                    prefix: Some("orders/".into()),
                    exact: Some("/x".into()),
                    service: " ".into(),
                    ..RouteConfig::default()
                },
                RouteConfig {
                    template: Some("/a/{id}/{id}".into()),
                    service: "a".into(),
                    ..RouteConfig::default()
                },
                RouteConfig {
                    template: Some("/b/{id}".into()),
                    rewrite: Some("/c/{other}".into()),
                    methods: vec!["GE T".into()],
                    rate_limit: Some("nope".into()),
                    service: "b".into(),
                    ..RouteConfig::default()
                },
                RouteConfig {
                    prefix: Some("/p/../q".into()),
                    host: Some("bad host".into()),
                    service: "p".into(),
                    ..RouteConfig::default()
                },
            ],
            rate_limits: [(
                "zero".to_owned(),
                RateLimitPolicy {
                    rate: 0,
                    per: chassis::config::HumanDuration::secs(1),
                    burst: Some(0),
                    key: Default::default(),
                    store: Default::default(),
                },
            )]
            .into(),
            ..Declarative::default()
        };
        let errors = RouteTable::compile(&config).unwrap_err();
        for expected in [
            "routes[0]: give exactly one of",
            "routes[0]: give `service`, or `aggregate` to merge several",
            "routes[1].template `/a/{id}/{id}`: `id` is captured twice",
            "routes[2].methods: `GE T` is not an HTTP method",
            "routes[2].rewrite uses `{other}`",
            "routes[2].rate_limit `nope`",
            "routes[3].prefix `/p/../q` is not a normalized path",
            "routes[3].host `bad host`",
            "rate_limits.zero.rate must be at least 1",
            "rate_limits.zero.burst must be at least 1",
        ] {
            assert!(
                errors.iter().any(|e| e.starts_with(expected)),
                "missing `{expected}` in {errors:#?}"
            );
        }
    }
}
