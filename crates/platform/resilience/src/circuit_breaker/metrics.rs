//! `bazaar_circuit_state` (0 closed, 1 open, 2 half-open, 3 forced open, 4 disabled)
//! and `bazaar_circuit_calls_total` by outcome, per breaker.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::{Outcome, State};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BreakerLabel {
    breaker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    breaker: String,
    /// `success`, `failure`, `ignored` or `rejected`.
    outcome: &'static str,
}

/// Metric families shared by all breakers of a process. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct BreakerMetrics {
    state: Family<BreakerLabel, Gauge>,
    calls: Family<CallLabels, Counter>,
}

impl BreakerMetrics {
    /// Registers the families in a service's registry.
    pub fn register(&self, metrics: &telemetry::metrics::Metrics) {
        metrics.register(
            "bazaar_circuit_state",
            "Circuit breaker state (0 closed, 1 open, 2 half-open, 3 forced open, 4 disabled)",
            self.state.clone(),
        );
        metrics.register(
            "bazaar_circuit_calls",
            "Calls seen by circuit breakers, by outcome",
            self.calls.clone(),
        );
    }

    pub(super) fn state(&self, breaker: &str, state: State) {
        self.state
            .get_or_create(&BreakerLabel {
                breaker: breaker.to_owned(),
            })
            .set(state.as_gauge());
    }

    pub(super) fn outcome(&self, breaker: &str, outcome: Outcome) {
        let outcome = match outcome {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Ignored => "ignored",
        };
        self.count(breaker, outcome);
    }

    pub(super) fn rejected(&self, breaker: &str) {
        self.count(breaker, "rejected");
    }

    fn count(&self, breaker: &str, outcome: &'static str) {
        self.calls
            .get_or_create(&CallLabels {
                breaker: breaker.to_owned(),
                outcome,
            })
            .inc();
    }
}
