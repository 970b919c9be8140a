//! The error of a call the bulkhead turned away.

use std::sync::Arc;

/// Every slot was taken for longer than the bulkhead's queue wait.
#[derive(Clone, Debug, thiserror::Error)]
#[error("bulkhead `{name}` is full ({max_concurrent} calls in flight)")]
pub struct Full {
    pub name: Arc<str>,
    pub max_concurrent: usize,
}
