//! The error of a call that ran out of time.

use std::time::Duration;

#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error("the call did not finish within {0:?}")]
pub struct Elapsed(pub Duration);
