//! Wall-clock helpers. Services store times as epoch milliseconds (portable across
//! SQLite and PostgreSQL) and show them as RFC 3339.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Milliseconds since the Unix epoch.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// How far ahead [`timer_floor`] keeps a timer.
pub const TIMER_FLOOR: std::time::Duration = std::time::Duration::from_secs(1);

/// Keeps a timer of the runtime it runs on at most [`TIMER_FLOOR`] ahead; spawn it
/// once per runtime. tokio's timer driver writes to the runtime's eventfd whenever
/// a timer is set earlier than the earliest one it knew of when a thread last
/// parked, to make that thread recompute its sleep; it does so even when the thread
/// setting it is the runtime's own busy one. Under load the earliest timers are
/// in-flight requests' long deadlines, and each shorter one set (a connection's
/// next-head timeout, say) costs a `write` and a wake-up of a parked worker: one in
/// five proxied requests at the gateway. With this timer, every timeout longer than
/// a second lands after the mark, for one wake-up a second.
pub async fn timer_floor() {
    loop {
        tokio::time::sleep(TIMER_FLOOR).await;
    }
}

/// RFC 3339 (UTC) for epoch milliseconds.
pub fn rfc3339(millis: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_millis() {
        assert_eq!(
            super::rfc3339(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
    }
}
