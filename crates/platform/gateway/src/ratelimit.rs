//! Server-side rate limiting: GCRA per key (one timestamp of state per client),
//! in process, lock-sharded so concurrent requests for different keys rarely meet.
//!
//! GCRA admits a request when its theoretical arrival time (TAT) minus the burst
//! tolerance is not in the future, then moves the TAT on by one emission interval.
//! It is exact (no window edges letting 2x through) and needs no timer.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::configuration::RateLimitPolicy;

const SHARDS: usize = 16;
/// Keys idle for this many emission intervals past their TAT are forgotten.
const SWEEP_EVERY: u64 = 4096;

/// The decision for one request, with what the `RateLimit` headers report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests still admissible at once.
    pub remaining: u64,
    /// Until the bucket is full again (`RateLimit`'s `t`).
    pub reset: Duration,
    /// When refused: until the next request would be admitted.
    pub retry_after: Duration,
}

/// One policy's state.
pub struct KeyedLimiter {
    pub policy: RateLimitPolicy,
    interval: Duration,
    tolerance: Duration,
    burst: u64,
    epoch: Instant,
    /// foldhash, seeded per process: a key is hashed twice per request (shard, then
    /// map) and SipHash was a visible share of it.
    hasher: foldhash::fast::RandomState,
    shards: Vec<Mutex<Shard>>,
    /// The `RateLimit-Policy` value, made once: it never changes.
    policy_header: std::sync::OnceLock<Option<http::HeaderValue>>,
}

#[derive(Default)]
struct Shard {
    /// TAT per key, in nanoseconds since `epoch`.
    tat: HashMap<String, u64, foldhash::fast::RandomState>,
    calls: u64,
}

impl KeyedLimiter {
    pub fn new(policy: RateLimitPolicy) -> Self {
        let burst = u64::from(policy.burst.unwrap_or(policy.rate).max(1));
        let interval = policy.per.0 / policy.rate.max(1);
        Self {
            interval,
            tolerance: interval * u32::try_from(burst - 1).unwrap_or(u32::MAX),
            burst,
            epoch: Instant::now(),
            hasher: Default::default(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            policy,
            policy_header: std::sync::OnceLock::new(),
        }
    }

    /// `RateLimit-Policy` value: `"<name>";q=<rate>;w=<seconds>` (a limiter serves
    /// one policy name).
    pub fn header_policy(&self, name: &str) -> Option<http::HeaderValue> {
        self.policy_header
            .get_or_init(|| {
                let value = format!(
                    "\"{name}\";q={};w={}",
                    self.policy.rate,
                    self.policy.per.0.as_secs().max(1)
                );
                http::HeaderValue::from_str(&value).ok()
            })
            .clone()
    }

    /// Decides for `key` at `now`.
    pub fn check(&self, key: &str, now: Instant) -> Decision {
        let shard = &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS];
        let now_ns = nanos(now.saturating_duration_since(self.epoch));
        let interval = nanos(self.interval);
        let tolerance = nanos(self.tolerance);
        let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        shard.calls += 1;
        if shard.calls.is_multiple_of(SWEEP_EVERY) {
            // Forget keys whose bucket has been full for a while.
            shard.tat.retain(|_, tat| *tat + interval > now_ns);
        }
        let tat = shard.tat.get(key).copied().unwrap_or(now_ns).max(now_ns);
        let allowed_at = tat.saturating_sub(tolerance);
        if allowed_at > now_ns {
            return Decision {
                allowed: false,
                remaining: 0,
                reset: Duration::from_nanos(tat - now_ns),
                retry_after: Duration::from_nanos(allowed_at - now_ns),
            };
        }
        let new_tat = tat + interval;
        match shard.tat.get_mut(key) {
            Some(t) => *t = new_tat,
            None => {
                shard.tat.insert(key.to_owned(), new_tat);
            }
        }
        // Room left: how many more intervals fit under the tolerance.
        let used = new_tat - now_ns;
        let remaining = (tolerance + interval).saturating_sub(used) / interval.max(1);
        Decision {
            allowed: true,
            remaining: remaining.min(self.burst),
            reset: Duration::from_nanos(used),
            retry_after: Duration::ZERO,
        }
    }
}

/// The same GCRA as one Redis script, so gateways sharing a Redis admit together
/// what one would alone: one round trip, atomic, on Redis's clock (gateways' clocks
/// need not agree). Returns `{allowed, reset_us, retry_after_us}`.
const GCRA_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allowed_at = tat - tolerance
if allowed_at > now then
  return {0, tat - now, allowed_at - now}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, new_tat - now, 0}
";

/// A limiter whose state lives in Redis.
pub struct RedisLimiter {
    redis: std::sync::Arc<crate::redis_store::SharedRedis>,
    script: redis::Script,
}

impl RedisLimiter {
    /// Keys are `<prefix>:ratelimit:<policy>:<key>`.
    pub fn new(redis: std::sync::Arc<crate::redis_store::SharedRedis>) -> Self {
        Self {
            redis,
            script: redis::Script::new(GCRA_SCRIPT),
        }
    }

    /// Decides for `key` under `limiter`'s policy named `name`.
    pub async fn check(
        &self,
        name: &str,
        limiter: &KeyedLimiter,
        key: &str,
    ) -> Result<Decision, redis::RedisError> {
        let mut connection = self.redis.connection().await?;
        let (allowed, reset_us, retry_us): (i64, i64, i64) = self
            .script
            .key(format!("{}:ratelimit:{name}:{key}", self.redis.prefix))
            .arg(micros(limiter.interval))
            .arg(micros(limiter.tolerance))
            .invoke_async(&mut connection)
            .await?;
        let reset = Duration::from_micros(u64::try_from(reset_us).unwrap_or(0));
        let interval = limiter.interval.max(Duration::from_micros(1));
        let remaining = (limiter.tolerance + limiter.interval)
            .saturating_sub(reset)
            .as_micros()
            / interval.as_micros();
        Ok(Decision {
            allowed: allowed == 1,
            remaining: if allowed == 1 {
                u64::try_from(remaining).unwrap_or(0).min(limiter.burst)
            } else {
                0
            },
            reset,
            retry_after: Duration::from_micros(u64::try_from(retry_us).unwrap_or(0)),
        })
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// `d` in whole nanoseconds, saturating.
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::LimitKey;
    use chassis::config::HumanDuration;

    fn limiter(rate: u32, burst: u32) -> KeyedLimiter {
        KeyedLimiter::new(RateLimitPolicy {
            rate,
            per: HumanDuration::secs(1),
            burst: Some(burst),
            key: LimitKey::Ip,
            store: Default::default(),
        })
    }

    #[test]
    fn a_burst_then_the_rate_per_key() {
        let l = limiter(10, 3);
        let t0 = Instant::now();
        let admitted = |key: &str, at: Instant| l.check(key, at).allowed;
        assert!(admitted("a", t0));
        assert!(admitted("a", t0));
        assert!(admitted("a", t0));
        let refused = l.check("a", t0);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Duration::from_millis(100));
        // Another key has its own bucket.
        assert!(admitted("b", t0));
        // One interval later, one more.
        let t1 = t0 + Duration::from_millis(100);
        assert!(admitted("a", t1));
        assert!(!admitted("a", t1));
    }

    #[test]
    fn admits_the_rate_over_time_and_no_more() {
        let l = limiter(100, 10);
        let t0 = Instant::now();
        // 10 s of a client sending every millisecond: 10 x the rate.
        let admitted = (0..10_000u64)
            .filter(|ms| l.check("k", t0 + Duration::from_millis(*ms)).allowed)
            .count();
        // 100/s for 10 s, plus the burst at the start.
        assert!((1000..=1010).contains(&admitted), "{admitted}");
    }

    #[test]
    fn remaining_counts_down() {
        let l = limiter(10, 3);
        let t0 = Instant::now();
        let left: Vec<u64> = (0..3).map(|_| l.check("a", t0).remaining).collect();
        assert_eq!(left, vec![2, 1, 0]);
    }
}
