//! Fault injection for chaos testing: an operator (or `bazaar chaos`) asks a service,
//! through its loopback-only `POST /admin/faults`, to add latency to and fail a share
//! of its work for a while: every HTTP request it serves (but its health, metrics and
//! admin endpoints) and every event its consumers handle (a failure is a retry).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::config::HumanDuration;
use crate::problem::Problem;

/// What to inject.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Fault {
    /// Added before each request or event is handled, e.g. `"200ms"`.
    #[serde(default, with = "human")]
    pub latency: Duration,
    /// Share of requests (503) and events (retried) that fail, 0 to 1.
    #[serde(default)]
    pub error_rate: f64,
    /// How long the fault lasts, e.g. `"30s"`.
    #[serde(with = "human")]
    pub duration: Duration,
}

mod human {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let raw = String::deserialize(d)?;
        humantime::parse_duration(&raw).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{raw}` is not a duration ({e}); use e.g. 200ms or 30s"
            ))
        })
    }
}

/// The service's current fault, shared by its HTTP layer and its consumers.
#[derive(Clone, Default)]
pub struct Faults {
    current: Arc<Mutex<Option<(Fault, Instant)>>>,
}

impl Faults {
    /// Sets `fault` from now on for its duration (replacing any other).
    pub fn set(&self, fault: Fault) {
        let until = Instant::now() + fault.duration;
        *self.lock() = Some((fault, until));
    }

    pub fn clear(&self) {
        *self.lock() = None;
    }

    /// The fault in force, if any.
    pub fn current(&self) -> Option<Fault> {
        let mut current = self.lock();
        match &*current {
            Some((fault, until)) if Instant::now() < *until => Some(fault.clone()),
            Some(_) => {
                *current = None;
                None
            }
            None => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Fault, Instant)>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits the injected latency; `false` when this piece of work must fail.
    pub async fn strike(&self) -> bool {
        let Some(fault) = self.current() else {
            return true;
        };
        if !fault.latency.is_zero() {
            tokio::time::sleep(fault.latency).await;
        }
        !(fault.error_rate > 0.0 && rand::random::<f64>() < fault.error_rate)
    }
}

/// The HTTP side: delays and fails the service's own requests.
pub async fn middleware(State(faults): State<Faults>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let exempt = path.starts_with("/admin/")
        || matches!(path, "/healthz" | "/readyz" | "/metrics" | "/openapi.json");
    if !exempt && !faults.strike().await {
        return Problem::unavailable("a fault was injected into this service (bazaar chaos)")
            .into_response();
    }
    next.run(request).await
}

/// Checks a fault an operator asked for.
pub fn validate(fault: &Fault) -> Result<(), String> {
    if !(0.0..=1.0).contains(&fault.error_rate) {
        return Err("error_rate must be between 0 and 1".into());
    }
    if fault.duration.is_zero() {
        return Err("duration must be more than 0".into());
    }
    if fault.latency > HumanDuration::secs(60).0 {
        return Err("latency must be at most 60s".into());
    }
    Ok(())
}
