//! One circuit breaker per downstream service, created on first use, shared by every
//! clone of the client, exported as metrics and listed by `/admin/breakers`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use resilience::circuit_breaker::{Breaker, BreakerMetrics, Config, InvalidConfig, Snapshot};

pub struct Breakers {
    config: Config,
    enabled: bool,
    metrics: BreakerMetrics,
    map: Mutex<HashMap<String, Arc<Breaker>>>,
}

impl Breakers {
    pub fn new(
        config: Config,
        enabled: bool,
        metrics: BreakerMetrics,
    ) -> Result<Self, Vec<InvalidConfig>> {
        let errors = config.validate();
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            config,
            enabled,
            metrics,
            map: Mutex::new(HashMap::new()),
        })
    }

    /// The breaker guarding calls to `service` (`None` only if the configuration,
    /// validated in [`Breakers::new`], were somehow invalid).
    pub fn get(&self, service: &str) -> Option<Arc<Breaker>> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = map.get(service) {
            return Some(b.clone());
        }
        let builder = Breaker::builder(service, self.config.clone()).ok()?;
        let breaker = Arc::new(builder.metrics(self.metrics.clone()).build());
        if !self.enabled {
            breaker.disable();
        }
        map.insert(service.to_owned(), breaker.clone());
        Some(breaker)
    }

    /// Every breaker created so far, by name.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<Snapshot> = map.values().map(|b| b.snapshot()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_settings_are_valid() {
        assert!(
            crate::settings::BreakerSettings::default()
                .validate()
                .is_empty()
        );
    }
}
