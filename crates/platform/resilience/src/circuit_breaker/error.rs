//! The error of a call the breaker did not let through.

use std::sync::Arc;
use std::time::Duration;

use super::State;

/// The call was not attempted: the breaker is open (or half-open with every trial
/// slot taken, or forced open).
#[derive(Clone, Debug, thiserror::Error)]
#[error("circuit breaker `{name}` is {state:?}: the call was not attempted")]
pub struct Open {
    pub name: Arc<str>,
    pub state: State,
    /// When the breaker will let a trial call through, if known.
    pub retry_after: Option<Duration>,
}
