//! The simulated payment provider: answers after a random latency, declines a share
//! of charges, and is unreachable during configured outage windows.

use std::time::{Duration, Instant};

use chassis::config::Errors;
use rand::Rng;

use crate::configuration::{Outage, Settings};

/// What the provider said about a charge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Charged,
    Declined,
}

#[derive(Debug)]
pub struct Provider {
    decline_rate: f64,
    latency_min: Duration,
    latency_max: Duration,
    outages: Vec<Outage>,
    /// Outage windows count from here (the service's start).
    started: Instant,
}

impl Provider {
    /// A provider as `settings` describe it, started now; every invalid setting is an
    /// error.
    pub fn new(settings: &Settings) -> Result<Self, Errors> {
        let invalid = settings.validate();
        if !invalid.is_empty() {
            return Err(Errors(invalid));
        }
        Ok(Self {
            decline_rate: settings.decline_rate,
            latency_min: settings.latency_min.0,
            latency_max: settings.latency_max.0,
            outages: settings.outage_windows().map_err(Errors)?,
            started: Instant::now(),
        })
    }

    /// Whether the provider is down now.
    pub fn in_outage(&self) -> bool {
        let elapsed = self.started.elapsed();
        self.outages.iter().any(|o| o.contains(elapsed))
    }

    /// Takes the provider's time, then decides.
    pub async fn authorize(&self) -> Decision {
        // The rng is not `Send`: draw everything before the await.
        let (latency, declined) = {
            let mut rng = rand::thread_rng();
            let spread = self.latency_max.saturating_sub(self.latency_min);
            (
                self.latency_min + spread.mul_f64(rng.r#gen::<f64>()),
                // gen() is in [0, 1): a rate of 1 declines all, 0 none.
                rng.r#gen::<f64>() < self.decline_rate,
            )
        };
        tokio::time::sleep(latency).await;
        if declined {
            Decision::Declined
        } else {
            Decision::Charged
        }
    }
}
