//! Registration documents as Consul's agent API takes them, parsed into valid values
//! with every problem named by field.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// A problem with a registration, naming the field (Consul's spelling).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FieldProblem {
    pub field: String,
    pub message: String,
}

fn problem(field: impl Into<String>, message: impl Into<String>) -> FieldProblem {
    FieldProblem {
        field: field.into(),
        message: message.into(),
    }
}

/// Consul decodes field names case-insensitively and accepts snake_case; so do we.
/// `Meta` keys are data and keep their case.
fn normalize(value: Value, in_meta: bool) -> Value {
    match value {
        Value::Object(map) if !in_meta => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let key = k.replace('_', "").to_ascii_lowercase();
                    let meta = key == "meta";
                    (key, normalize(v, meta))
                })
                .collect(),
        ),
        Value::Array(items) => {
            Value::Array(items.into_iter().map(|v| normalize(v, false)).collect())
        }
        other => other,
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
struct RawService {
    id: Option<String>,
    name: Option<String>,
    address: Option<String>,
    port: Option<i64>,
    tags: Option<Vec<String>>,
    meta: Option<BTreeMap<String, String>>,
    check: Option<RawCheck>,
    checks: Option<Vec<RawCheck>>,
    /// Accepted and ignored, as a Consul agent does for fields it does not use here.
    #[serde(flatten)]
    _other: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
struct RawCheck {
    checkid: Option<String>,
    name: Option<String>,
    http: Option<String>,
    tcp: Option<String>,
    ttl: Option<String>,
    interval: Option<String>,
    timeout: Option<String>,
    deregistercriticalserviceafter: Option<String>,
    status: Option<String>,
    #[serde(flatten)]
    _other: BTreeMap<String, Value>,
}

/// What a check probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    Http {
        url: String,
        interval: Duration,
        timeout: Duration,
    },
    Tcp {
        address: String,
        interval: Duration,
        timeout: Duration,
    },
    Ttl {
        ttl: Duration,
    },
}

/// A check's health, Consul's three states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Passing,
    Warning,
    Critical,
}

impl Health {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "passing" => Some(Health::Passing),
            "warning" => Some(Health::Warning),
            "critical" => Some(Health::Critical),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckSpec {
    pub id: String,
    pub name: String,
    pub kind: CheckKind,
    pub initial: Health,
    pub deregister_after: Option<Duration>,
}

/// A valid registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub id: String,
    pub name: String,
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub checks: Vec<CheckSpec>,
}

/// Shortest check interval accepted: probing faster only loads the instances.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Consul's default check timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

fn duration(
    field: &str,
    raw: &Option<String>,
    problems: &mut Vec<FieldProblem>,
) -> Option<Duration> {
    let raw = raw.as_deref()?;
    match humantime::parse_duration(raw) {
        Ok(d) => Some(d),
        Err(_) => {
            problems.push(problem(
                field,
                format!("`{raw}` is not a duration like \"10s\" or \"500ms\""),
            ));
            None
        }
    }
}

fn check_spec(
    raw: RawCheck,
    at: &str,
    default_id: String,
    service: &str,
    problems: &mut Vec<FieldProblem>,
) -> Option<CheckSpec> {
    let before = problems.len();
    let interval = duration(&format!("{at}.Interval"), &raw.interval, problems);
    let timeout =
        duration(&format!("{at}.Timeout"), &raw.timeout, problems).unwrap_or(DEFAULT_TIMEOUT);
    let ttl = duration(&format!("{at}.TTL"), &raw.ttl, problems);
    let deregister_after = duration(
        &format!("{at}.DeregisterCriticalServiceAfter"),
        &raw.deregistercriticalserviceafter,
        problems,
    );
    let initial = match raw.status.as_deref() {
        None => Health::Critical,
        Some(s) => Health::parse(s).unwrap_or_else(|| {
            problems.push(problem(
                format!("{at}.Status"),
                "must be passing, warning or critical",
            ));
            Health::Critical
        }),
    };
    let needs_interval =
        |interval: Option<Duration>, problems: &mut Vec<FieldProblem>| match interval {
            Some(i) if i >= MIN_INTERVAL => Some(i),
            Some(_) => {
                problems.push(problem(
                    format!("{at}.Interval"),
                    format!("must be at least {MIN_INTERVAL:?}"),
                ));
                None
            }
            None if problems.len() == before => {
                problems.push(problem(
                    format!("{at}.Interval"),
                    "is required for HTTP and TCP checks",
                ));
                None
            }
            None => None,
        };
    let kind = match (raw.http, raw.tcp, ttl) {
        (Some(url), None, None) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                problems.push(problem(
                    format!("{at}.HTTP"),
                    "must be an http:// or https:// URL",
                ));
            }
            needs_interval(interval, problems).map(|interval| CheckKind::Http {
                url,
                interval,
                timeout,
            })
        }
        (None, Some(address), None) => {
            if !address.contains(':') {
                problems.push(problem(format!("{at}.TCP"), "must be host:port"));
            }
            needs_interval(interval, problems).map(|interval| CheckKind::Tcp {
                address,
                interval,
                timeout,
            })
        }
        (None, None, Some(ttl)) => Some(CheckKind::Ttl { ttl }),
        (None, None, None) if problems.len() == before => {
            problems.push(problem(at, "needs one of HTTP, TCP or TTL"));
            None
        }
        (None, None, None) => None,
        _ => {
            problems.push(problem(at, "takes only one of HTTP, TCP or TTL"));
            None
        }
    };
    let kind = kind?;
    (problems.len() == before).then(|| CheckSpec {
        id: raw.checkid.unwrap_or(default_id),
        name: raw
            .name
            .unwrap_or_else(|| format!("Service '{service}' check")),
        kind,
        initial,
        deregister_after,
    })
}

/// Parses a `PUT /v1/agent/service/register` body.
pub fn parse_registration(body: &[u8]) -> Result<Registration, Vec<FieldProblem>> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| vec![problem("body", format!("not JSON: {e}"))])?;
    let value = normalize(value, false);
    let raw: RawService = serde_path_to_error::deserialize(value)
        .map_err(|e| vec![problem(e.path().to_string(), e.inner().to_string())])?;
    let mut problems = Vec::new();
    let name = raw.name.filter(|n| !n.trim().is_empty());
    if name.is_none() {
        problems.push(problem("Name", "is required"));
    }
    let port = match raw.port {
        None => 0,
        Some(p) => u16::try_from(p).unwrap_or_else(|_| {
            problems.push(problem("Port", "must be between 0 and 65535"));
            0
        }),
    };
    let name = name.unwrap_or_default();
    let id = raw
        .id
        .filter(|i| !i.is_empty())
        .unwrap_or_else(|| name.clone());
    let mut raw_checks: Vec<RawCheck> = raw.checks.unwrap_or_default();
    let single = raw.check.is_some() && raw_checks.is_empty();
    if let Some(c) = raw.check {
        raw_checks.insert(0, c);
    }
    let mut checks = Vec::new();
    for (i, c) in raw_checks.into_iter().enumerate() {
        let (at, default_id) = if single {
            ("Check".to_owned(), format!("service:{id}"))
        } else {
            (format!("Checks[{i}]"), format!("service:{id}:{}", i + 1))
        };
        if let Some(spec) = check_spec(c, &at, default_id, &name, &mut problems) {
            checks.push(spec);
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Registration {
        id,
        name,
        address: raw.address.unwrap_or_default(),
        port,
        tags: raw.tags.unwrap_or_default(),
        meta: raw.meta.unwrap_or_default(),
        checks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(body: &str) -> Vec<String> {
        parse_registration(body.as_bytes())
            .unwrap_err()
            .into_iter()
            .map(|p| p.field)
            .collect()
    }

    #[test]
    fn parses_consul_shapes_in_any_case() {
        let r = parse_registration(
            br#"{"Name":"orders","ID":"orders-1","Address":"127.0.0.1","Port":8081,"Tags":["v2"],
                "Meta":{"Zone":"A"},"Check":{"HTTP":"http://127.0.0.1:8081/healthz","Interval":"1s",
                "DeregisterCriticalServiceAfter":"1m"}}"#,
        )
        .unwrap();
        assert_eq!(r.id, "orders-1");
        assert_eq!(r.meta["Zone"], "A", "meta keys keep their case");
        assert_eq!(r.checks[0].id, "service:orders-1");
        assert_eq!(r.checks[0].initial, Health::Critical);
        assert_eq!(r.checks[0].deregister_after, Some(Duration::from_secs(60)));
        let r = parse_registration(br#"{"name":"x","port":1,"checks":[{"ttl":"10s"},{"tcp":"127.0.0.1:1","interval":"2s"}]}"#).unwrap();
        assert_eq!(r.id, "x");
        assert_eq!(r.checks[1].id, "service:x:2");
    }

    #[test]
    fn bad_registrations_name_the_field() {
        assert_eq!(fields(r#"{"Port":80}"#), ["Name"]);
        assert_eq!(fields(r#"{"Name":"x","Port":70000}"#), ["Port"]);
        assert_eq!(fields(r#"{"Name":"x","Port":"eighty"}"#), ["port"]);
        assert_eq!(
            fields(r#"{"Name":"x","Check":{"HTTP":"http://a/","Interval":"soon"}}"#),
            ["Check.Interval"]
        );
        assert_eq!(
            fields(r#"{"Name":"x","Check":{"HTTP":"http://a/"}}"#),
            ["Check.Interval"]
        );
        assert_eq!(
            fields(r#"{"Name":"x","Check":{"TCP":"a:1","Interval":"1ms"}}"#),
            ["Check.Interval"]
        );
        assert_eq!(fields(r#"{"Name":"x","Check":{}}"#), ["Check"]);
        assert_eq!(fields(r#"{"Name":"x","Tags":"v1"}"#), ["tags"]);
        assert_eq!(fields("not json"), ["body"]);
    }
}
