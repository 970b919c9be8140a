//! `payments_charges_total{outcome}` and `payments_refunds_total{outcome}`: what the
//! provider decided, so a dashboard shows the decline rate and compensations.

use chassis::telemetry::metrics::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    /// Charges: `charged`, `declined`, `cancelled` (refunded first); refunds:
    /// `refunded`, `nothing_charged`.
    outcome: String,
}

/// Counted once per decision; repeated answers to re-sent requests are not counted
/// (except `cancelled` and a declined order's `nothing_charged`, which record nothing).
#[derive(Clone, Default)]
pub(crate) struct PaymentMetrics {
    charges: Family<Outcome, Counter>,
    refunds: Family<Outcome, Counter>,
}

impl PaymentMetrics {
    pub(crate) fn register(&self, metrics: &Metrics) {
        metrics.register(
            "payments_charges",
            "Charge requests decided, by outcome",
            self.charges.clone(),
        );
        metrics.register(
            "payments_refunds",
            "Refund requests decided, by outcome",
            self.refunds.clone(),
        );
    }

    pub(crate) fn charged(&self, outcome: &str) {
        self.charges
            .get_or_create(&Outcome {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub(crate) fn refunded(&self, outcome: &str) {
        self.refunds
            .get_or_create(&Outcome {
                outcome: outcome.to_owned(),
            })
            .inc();
    }
}
