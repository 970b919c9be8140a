//! The simulated payment provider: answers after a random latency, declines a share
//! of charges, and is unreachable during configured outage windows.

use std::time::Duration;

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
    /// Outage windows count from here, in Unix milliseconds: the provider's first
    /// start on this database ([`Provider::since`]), else this process's.
    started_ms: i64,
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
            started_ms: chassis::clock::now_millis(),
        })
    }

    /// The same provider, its outage windows counted from `started_ms` (its first
    /// start, kept in the service's database, so a restart does not replay them).
    pub fn since(mut self, started_ms: i64) -> Self {
        self.started_ms = started_ms;
        self
    }

    /// Whether the provider is down now.
    pub fn in_outage(&self) -> bool {
        let elapsed = chassis::clock::now_millis().saturating_sub(self.started_ms);
        let elapsed = Duration::from_millis(u64::try_from(elapsed).unwrap_or(0));
        self.outages.iter().any(|o| o.contains(elapsed))
    }

    /// Takes the provider's time, then decides the charge of `idempotency_key`.
    /// The decision is the key's, as a real provider's is: asked again for the
    /// same key (a redelivered command, a service killed between asking and
    /// recording the answer), it says the same, so a retry can neither charge twice
    /// nor turn a decline into a charge.
    pub async fn authorize(&self, idempotency_key: &str) -> Decision {
        let latency = {
            // The rng is not `Send`: drawn before the await.
            let mut rng = rand::thread_rng();
            let spread = self.latency_max.saturating_sub(self.latency_min);
            self.latency_min + spread.mul_f64(rng.r#gen::<f64>())
        };
        // The key's place in [0, 1): a rate of 1 declines all, 0 none. (SipHash
        // with its fixed keys: the same place after a restart.)
        let place = {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            idempotency_key.hash(&mut hasher);
            (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
        };
        let declined = place < self.decline_rate;
        tokio::time::sleep(latency).await;
        if declined {
            Decision::Declined
        } else {
            Decision::Charged
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use chassis::config::HumanDuration;

    fn provider(decline_rate: f64) -> Provider {
        Provider::new(&Settings {
            decline_rate,
            latency_min: HumanDuration::millis(0),
            latency_max: HumanDuration::millis(0),
            ..Settings::default()
        })
        .unwrap()
    }

    /// The same key gets the same answer, whatever happened in between (the
    /// provider rebuilt, as after a restart); the keys' answers keep the rate.
    #[tokio::test]
    async fn a_key_is_decided_once_and_keys_decline_at_the_rate() {
        let (first, again) = (provider(0.5), provider(0.5));
        let mut declined = 0;
        for n in 0..1000 {
            let key = format!("order-{n}");
            let decision = first.authorize(&key).await;
            assert_eq!(again.authorize(&key).await, decision, "{key}");
            declined += usize::from(decision == Decision::Declined);
        }
        assert!((420..=580).contains(&declined), "{declined} of 1000");
        assert_eq!(provider(0.0).authorize("k").await, Decision::Charged);
        assert_eq!(provider(1.0).authorize("k").await, Decision::Declined);
    }

    /// Outage windows count from the provider's first start, not this process's:
    /// a provider restarted after its window is not down again.
    #[test]
    fn outages_count_from_the_first_start() {
        let down = || {
            Provider::new(&Settings {
                outages: vec!["1s+3s".into()],
                ..Settings::default()
            })
            .unwrap()
        };
        assert!(!down().in_outage(), "the window opens 1 s after the start");
        let now = chassis::clock::now_millis();
        let restarted = |ago_ms: i64| down().since(now - ago_ms);
        assert!(restarted(2_000).in_outage());
        assert!(!restarted(10_000).in_outage());
    }
}
