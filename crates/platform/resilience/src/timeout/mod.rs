//! A deadline per call that also honours the request's own deadline (the task-local
//! request context) and tells the callee how long it will wait (`x-bazaar-deadline`),
//! so the callee can stop work nobody waits for.

pub mod error;
mod future;
mod layer;

use std::time::Duration;

pub use self::future::ResponseFuture;
pub use self::layer::{Deadline, DeadlineLayer};

/// How long a call limited to `limit` may take now: the smaller of `limit` and the
/// current request's time left; `None` when that deadline has already passed.
pub fn effective(limit: Duration) -> Option<Duration> {
    let left = telemetry::context::current()
        .and_then(|c| c.remaining())
        .map_or(limit, |left| left.min(limit));
    (!left.is_zero()).then_some(left)
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemetry::context::RequestContext;

    #[tokio::test(start_paused = true)]
    async fn the_tighter_deadline_wins_and_a_passed_one_is_none() {
        assert_eq!(
            effective(Duration::from_secs(5)),
            Some(Duration::from_secs(5))
        );
        let ctx = RequestContext::new_root().with_deadline_within(Duration::from_secs(1));
        let got =
            telemetry::context::scope(ctx.clone(), async { effective(Duration::from_secs(5)) })
                .await;
        assert_eq!(got, Some(Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(2)).await;
        let got = telemetry::context::scope(ctx, async { effective(Duration::from_secs(5)) }).await;
        assert_eq!(got, None);
    }
}
