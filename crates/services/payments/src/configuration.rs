//! `[payments]` settings, and what makes them valid.

use std::time::Duration;

use chassis::ServiceConfig;
use chassis::config::{ConfigError, HumanDuration};
use chassis::config_section;
use chassis::secrecy::SecretString;
use chassis::settings::SagaMode;

config_section! {
    /// `[payments]`: the service and the provider it simulates.
    pub struct Settings {
        /// Listening port; 0 picks a free one.
        pub port: u16 = 0,
        /// `sqlite://...` or `postgres://...`; unset means `<data_dir>/payments.db`.
        pub database_url: Option<SecretString> = None,
        /// Share of charges the provider declines, 0 to 1: 0 so a shop works out of
        /// the box; raise it to watch the saga compensate.
        pub decline_rate: f64 = 0.0,
        /// Shortest time the provider takes to answer; a real one takes tens of ms.
        pub latency_min: HumanDuration = HumanDuration::millis(5),
        /// Longest time the provider takes to answer (latency is uniform in between).
        pub latency_max: HumanDuration = HumanDuration::millis(20),
        /// Windows after the service starts when the provider does not answer, like
        /// `"30s+10s"` (down from 30 s for 10 s): charges wait and are retried.
        pub outages: Vec<String> = Vec::new(),
    }
}

pub struct Config {
    pub service: ServiceConfig,
    pub database_url: SecretString,
    pub settings: Settings,
    /// Orchestration: commands on `payments.commands`; choreography: reacts to
    /// `inventory` and `orders` events.
    pub saga_mode: SagaMode,
}

/// A window, relative to the service's start, in which the provider is down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outage {
    pub from: Duration,
    pub length: Duration,
}

impl Outage {
    /// Reads `<start>+<length>`, both humantime durations (`"30s+10s"`, `"1m+500ms"`).
    pub fn parse(raw: &str) -> Result<Self, String> {
        let (from, length) = raw
            .split_once('+')
            .ok_or_else(|| format!("`{raw}` is not a window `<start>+<length>`"))?;
        let duration = |part: &str, what: &str| {
            humantime::parse_duration(part.trim())
                .map_err(|e| format!("`{raw}`: invalid {what} `{}` ({e})", part.trim()))
        };
        let outage = Self {
            from: duration(from, "start")?,
            length: duration(length, "length")?,
        };
        if outage.length.is_zero() {
            return Err(format!("`{raw}`: the length must be more than zero"));
        }
        Ok(outage)
    }

    /// Whether `elapsed` since the start falls in the window.
    pub fn contains(&self, elapsed: Duration) -> bool {
        elapsed >= self.from && elapsed - self.from < self.length
    }
}

fn invalid(key: &str, problem: String, fix: &str) -> ConfigError {
    ConfigError {
        key: format!("payments.{key}"),
        origin: "configuration".into(),
        problem,
        fix: fix.to_owned(),
    }
}

impl Settings {
    /// Every invalid setting, as configuration errors naming the key.
    pub fn validate(&self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        if !(0.0..=1.0).contains(&self.decline_rate) {
            errors.push(invalid(
                "decline_rate",
                format!("{} is not between 0 and 1", self.decline_rate),
                "use 0 to accept every charge, 1 to decline every one",
            ));
        }
        if self.latency_max < self.latency_min {
            errors.push(invalid(
                "latency_max",
                format!(
                    "{} is less than payments.latency_min ({})",
                    self.latency_max, self.latency_min
                ),
                "raise latency_max or lower latency_min",
            ));
        }
        if let Err(e) = self.outage_windows() {
            errors.extend(e);
        }
        errors
    }

    /// The outage windows, or an error for each invalid one.
    pub fn outage_windows(&self) -> Result<Vec<Outage>, Vec<ConfigError>> {
        let (windows, errors): (Vec<_>, Vec<_>) = self
            .outages
            .iter()
            .map(|raw| Outage::parse(raw))
            .partition(Result::is_ok);
        if errors.is_empty() {
            Ok(windows.into_iter().filter_map(Result::ok).collect())
        } else {
            Err(errors
                .into_iter()
                .filter_map(Result::err)
                .map(|problem| {
                    invalid(
                        "outages",
                        problem,
                        "write each window as \"<start>+<length>\" after the service starts, e.g. \"30s+10s\"",
                    )
                })
                .collect())
        }
    }
}
