//! A bulkhead: at most `max_concurrent` calls in flight; a call that cannot start
//! within `max_wait` is rejected at once with [`error::Full`] instead of queueing
//! without bound, so one slow dependency cannot absorb every task of the caller.

pub mod error;
mod future;
mod layer;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use self::future::ResponseFuture;
pub use self::layer::{Bulkhead, BulkheadLayer};

/// The shared capacity of one bulkhead.
#[derive(Debug)]
pub struct Compartment {
    name: Arc<str>,
    semaphore: Arc<Semaphore>,
    max_concurrent: usize,
    max_wait: Duration,
}

impl Compartment {
    pub fn new(name: &str, max_concurrent: usize, max_wait: Duration) -> Arc<Self> {
        Arc::new(Self {
            name: Arc::from(name),
            semaphore: Arc::new(Semaphore::new(max_concurrent)),
            max_concurrent,
            max_wait,
        })
    }

    /// Waits up to `max_wait` for a slot.
    pub async fn enter(&self) -> Result<OwnedSemaphorePermit, error::Full> {
        let full = || error::Full {
            name: self.name.clone(),
            max_concurrent: self.max_concurrent,
        };
        if let Ok(permit) = self.semaphore.clone().try_acquire_owned() {
            return Ok(permit);
        }
        match tokio::time::timeout(self.max_wait, self.semaphore.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(full()),
        }
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.max_concurrent - self.semaphore.available_permits()
    }
}
