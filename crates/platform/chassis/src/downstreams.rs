//! What the client keeps per downstream service: its circuit breaker, its retry
//! policy (and budget) and its bulkhead, created on first use and shared by every
//! clone of the client. Breakers are exported as metrics and listed by
//! `/admin/breakers`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use resilience::bulkhead::Compartment;
use resilience::circuit_breaker::{Breaker, BreakerMetrics, Snapshot};
use resilience::rate_limit::Limiter;
use resilience::retry::RetryPolicy;

use crate::settings::ResilienceSettings;

/// The resilience state of one downstream service, in the order a call meets it:
/// rate limiter -> total timeout -> retry -> bulkhead -> breaker -> attempt timeout.
pub struct Downstream {
    pub limiter: Option<Arc<Limiter>>,
    pub total_timeout: Option<std::time::Duration>,
    pub retry: Arc<RetryPolicy>,
    pub bulkhead: Arc<Compartment>,
    pub breaker: Option<Arc<Breaker>>,
    /// Deadline of one attempt, when this service overrides the client's.
    pub timeout: Option<std::time::Duration>,
    /// Which answers the breaker counts as failures or ignores.
    pub classification: crate::settings::BreakerSettings,
}

pub struct Downstreams {
    settings: ResilienceSettings,
    metrics: BreakerMetrics,
    map: Mutex<HashMap<String, Arc<Downstream>>>,
}

impl Downstreams {
    /// Refuses settings that [`ResilienceSettings::validate`] refuses.
    pub fn new(settings: ResilienceSettings, metrics: BreakerMetrics) -> Result<Self, Vec<String>> {
        let errors: Vec<String> = settings
            .validate()
            .iter()
            .map(ToString::to_string)
            .collect();
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            settings,
            metrics,
            map: Mutex::new(HashMap::new()),
        })
    }

    /// The state for `service`, created on first use.
    pub fn get(&self, service: &str) -> Arc<Downstream> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = map.get(service) {
            return d.clone();
        }
        let (s, o) = self.settings.for_service(service);
        // The configuration was validated in `new`, so the builder succeeds.
        let breaker = Breaker::builder(service, s.breaker.config())
            .ok()
            .map(|b| Arc::new(b.metrics(self.metrics.clone()).build()));
        if let Some(b) = &breaker
            && !s.breaker.enabled
        {
            b.disable();
        }
        let limiter = o.rate_limit.and_then(|rate| {
            Limiter::new(
                service,
                rate,
                o.rate_limit_burst.unwrap_or(1),
                o.rate_limit_max_wait.map(|d| d.0).unwrap_or_default(),
            )
        });
        let downstream = Arc::new(Downstream {
            limiter,
            total_timeout: o.total_timeout.map(|d| d.0),
            retry: RetryPolicy::new(
                s.retry.max_attempts,
                s.retry.base_delay.0,
                s.retry.max_delay.0,
                s.retry.budget_ratio,
            ),
            bulkhead: Compartment::new(service, s.bulkhead.max_concurrent, s.bulkhead.max_wait.0),
            breaker,
            timeout: o.timeout.map(|d| d.0),
            classification: s.breaker.clone(),
        });
        map.insert(service.to_owned(), downstream.clone());
        downstream
    }

    /// Every breaker created so far, by name.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<Snapshot> = map
            .values()
            .filter_map(|d| d.breaker.as_ref().map(|b| b.snapshot()))
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;
    use resilience::circuit_breaker::Outcome;

    use crate::settings::BreakerSettings;

    #[test]
    fn statuses_are_classified_as_configured() {
        let default = BreakerSettings::default();
        assert_eq!(
            default.classify(StatusCode::SERVICE_UNAVAILABLE),
            Outcome::Failure
        );
        assert_eq!(default.classify(StatusCode::NOT_FOUND), Outcome::Success);
        let chosen = BreakerSettings {
            failure_statuses: vec![503, 429],
            ignored_statuses: vec![501],
            ..BreakerSettings::default()
        };
        assert_eq!(
            chosen.classify(StatusCode::INTERNAL_SERVER_ERROR),
            Outcome::Success
        );
        assert_eq!(
            chosen.classify(StatusCode::TOO_MANY_REQUESTS),
            Outcome::Failure
        );
        assert_eq!(
            chosen.classify(StatusCode::NOT_IMPLEMENTED),
            Outcome::Ignored
        );
    }

    #[test]
    fn default_settings_are_valid() {
        assert!(
            crate::settings::ResilienceSettings::default()
                .validate()
                .is_empty()
        );
    }
}
