//! A Prometheus registry per service (not a global one, so that in monolith mode each
//! service still serves only its own metrics) with the HTTP server histogram.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Latency buckets in seconds: from sub-millisecond (cache hits, health checks) to the
/// default 30 s request timeout.
const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    /// The route template (`/orders/{id}`), never the raw path: raw paths would make
    /// one time series per id.
    pub route: String,
    pub status: u16,
}

fn new_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// The metrics of one service. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<RwLock<Registry>>,
    http_server: Family<HttpLabels, Histogram, fn() -> Histogram>,
    /// Tells this instance's histograms apart in [`HANDLES`] (monolith mode has one
    /// per service in a process).
    id: u64,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A histogram handle with the labels it was found under: metrics id, status,
/// method, route.
type Handle = (u64, u16, Box<str>, Box<str>, Histogram);

thread_local! {
    /// The histograms this thread has recorded into: the family's own lookup takes
    /// its lock, hashes the labels and builds them as owned strings, for every
    /// request. A list, not a map: it holds a service's routes times the statuses
    /// they answer, and comparing a few integers first beats hashing two strings.
    static HANDLES: RefCell<Vec<Handle>> = const { RefCell::new(Vec::new()) };
}

impl Metrics {
    pub fn new(service: &str) -> Self {
        let mut registry = Registry::with_labels(
            [(
                std::borrow::Cow::Borrowed("service"),
                std::borrow::Cow::Owned(service.to_owned()),
            )]
            .into_iter(),
        );
        let http_server =
            Family::<HttpLabels, Histogram, fn() -> Histogram>::new_with_constructor(new_histogram);
        registry.register_with_unit(
            "http_server_request_duration",
            "Duration of HTTP server requests",
            Unit::Seconds,
            http_server.clone(),
        );
        Self {
            registry: Arc::new(RwLock::new(registry)),
            http_server,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Records one served request.
    pub fn observe_http(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let method = method_label(method);
        let seconds = elapsed.as_secs_f64();
        let known = HANDLES.with(|handles| {
            let handles = handles.try_borrow().ok()?;
            let (.., histogram) = handles.iter().find(|(id, s, m, r, _)| {
                *id == self.id && *s == status && **m == *method && **r == *route
            })?;
            histogram.observe(seconds);
            Some(())
        });
        if known.is_some() {
            return;
        }
        let histogram = self
            .http_server
            .get_or_create(&HttpLabels {
                method: method.to_owned(),
                route: route.to_owned(),
                status,
            })
            .clone();
        histogram.observe(seconds);
        HANDLES.with(|handles| {
            if let Ok(mut handles) = handles.try_borrow_mut() {
                // Routes are templates, so the set is small; the cap bounds it anyway.
                if handles.len() < 512 {
                    handles.push((self.id, status, method.into(), route.into(), histogram));
                }
            }
        });
    }

    /// Registers another metric (used by platform crates and services).
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        let mut registry = self.registry.write().unwrap_or_else(|e| e.into_inner());
        registry.register(name, help, metric);
    }

    /// The Prometheus text exposition (OpenMetrics).
    pub fn encode(&self) -> String {
        let registry = self.registry.read().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

/// A request method as a label: the methods of RFC 9110 and PATCH as they are (and
/// `-`, a request refused before its method was read), any other token as `OTHER`.
/// A client may send any token as a method, and each label value is a series of
/// its own: unmapped, a client could grow the registry without bound.
pub fn method_label(method: &str) -> &str {
    match method {
        "GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE" | "PATCH"
        | "-" => method,
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Handles remembered per thread still count into their own service's family:
    /// two instances on one thread, labels that differ only by method or status.
    #[test]
    fn remembered_handles_count_into_their_own_family() {
        let (a, b) = (Metrics::new("a"), Metrics::new("b"));
        for _ in 0..3 {
            a.observe_http("GET", "/x", 200, Duration::from_millis(1));
        }
        a.observe_http("POST", "/x", 200, Duration::from_millis(1));
        a.observe_http("GET", "/x", 404, Duration::from_millis(1));
        b.observe_http("GET", "/x", 200, Duration::from_millis(1));
        let count = |text: &str, labels: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("http_server_request_duration_seconds_count")
                        && l.contains(labels)
                })
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        let text = a.encode();
        assert_eq!(
            count(&text, "method=\"GET\",route=\"/x\",status=\"200\"").as_deref(),
            Some("3")
        );
        assert_eq!(count(&text, "method=\"POST\"").as_deref(), Some("1"));
        assert_eq!(count(&text, "status=\"404\"").as_deref(), Some("1"));
        let text = b.encode();
        assert_eq!(
            count(&text, "method=\"GET\",route=\"/x\",status=\"200\"").as_deref(),
            Some("1")
        );
    }

    /// A client's invented methods share one series: each of them would be a new
    /// one, and any token is a method.
    #[test]
    fn methods_outside_the_standard_set_count_as_other() {
        let m = Metrics::new("gw");
        for i in 0..50 {
            m.observe_http(&format!("BREW{i}"), "/x", 405, Duration::from_millis(1));
        }
        m.observe_http("PATCH", "/x", 200, Duration::from_millis(1));
        let text = m.encode();
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("http_server_request_duration_seconds_count"))
            .collect();
        assert_eq!(series.len(), 2, "{series:?}");
        assert!(
            series
                .iter()
                .any(|l| l.contains("method=\"OTHER\"") && l.ends_with(" 50")),
            "{series:?}"
        );
        assert!(series.iter().any(|l| l.contains("method=\"PATCH\"")));
    }

    #[test]
    fn histogram_is_exposed_with_route_template_labels() {
        let m = Metrics::new("orders");
        m.observe_http("GET", "/orders/{id}", 200, Duration::from_millis(3));
        let text = m.encode();
        assert!(text.contains("# TYPE http_server_request_duration_seconds histogram"));
        assert!(text.contains("http_server_request_duration_seconds_count{"));
        assert!(text.contains("route=\"/orders/{id}\""));
        assert!(text.contains("service=\"orders\""));
    }
}
