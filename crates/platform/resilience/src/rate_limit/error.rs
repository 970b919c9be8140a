//! The error of a call over the rate.

use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, thiserror::Error)]
#[error("rate limit `{name}` exceeded; retry in {retry_after:?}")]
pub struct Limited {
    pub name: Arc<str>,
    pub retry_after: Duration,
}
