//! The gateway's Redis, shared by rate limits and caches.
//!
//! The gateway starts whether Redis is up or not. Requests never wait for a
//! connection to be made: while there is none, each check fails at once (the
//! configured fallback decides) and a background attempt starts, at most one a
//! second. Once connected, redis-rs's connection manager reconnects by itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// How long after a failed connection attempt the next one may start.
const RETRY_CONNECT_AFTER: Duration = Duration::from_secs(1);

pub struct SharedRedis {
    client: redis::Client,
    /// Key prefix, so gateways of different shops can share one Redis.
    pub prefix: String,
    connection: ArcSwapOption<ConnectionManager>,
    connecting: AtomicBool,
    last_attempt: Mutex<Option<Instant>>,
}

impl SharedRedis {
    /// Checks `url` but does not connect yet.
    pub fn new(url: &str, prefix: &str) -> Result<Self, redis::RedisError> {
        Ok(Self {
            client: redis::Client::open(url)?,
            prefix: prefix.to_owned(),
            connection: ArcSwapOption::empty(),
            connecting: AtomicBool::new(false),
            last_attempt: Mutex::new(None),
        })
    }

    /// Connects, waiting at most `wait` (at start, so the first requests find Redis
    /// when it is up).
    pub async fn connect(self: &Arc<Self>, wait: Duration) -> Result<(), redis::RedisError> {
        if !self.may_attempt() {
            return Ok(());
        }
        match tokio::time::timeout(wait, self.attempt()).await {
            Ok(result) => result,
            Err(_) => Err(Self::unavailable()),
        }
    }

    /// A connection, or an error at once while there is none (and a background
    /// attempt to make one).
    pub async fn connection(self: &Arc<Self>) -> Result<ConnectionManager, redis::RedisError> {
        if let Some(c) = self.connection.load_full() {
            return Ok((*c).clone());
        }
        if self.may_attempt() {
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(e) = this.attempt().await {
                    tracing::debug!(error = %e, "Redis is still unreachable");
                }
            });
        }
        Err(Self::unavailable())
    }

    fn unavailable() -> redis::RedisError {
        redis::RedisError::from((
            redis::ErrorKind::IoError,
            "Redis is unreachable; reconnecting in the background",
        ))
    }

    /// Claims the next attempt: none under way and none in the last second.
    fn may_attempt(&self) -> bool {
        let Ok(mut last) = self.last_attempt.lock() else {
            return false;
        };
        if last.is_some_and(|at| at.elapsed() < RETRY_CONNECT_AFTER)
            || self.connecting.swap(true, Ordering::AcqRel)
        {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    /// One attempt, after [`Self::may_attempt`] said yes.
    async fn attempt(&self) -> Result<(), redis::RedisError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_millis(500))
            .set_response_timeout(Duration::from_millis(500))
            .set_number_of_retries(1);
        let made = ConnectionManager::new_with_config(self.client.clone(), config).await;
        self.connecting.store(false, Ordering::Release);
        self.connection.store(Some(Arc::new(made?)));
        tracing::info!("connected to the gateway's Redis");
        Ok(())
    }
}
