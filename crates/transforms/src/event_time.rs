//! The guard shared by the event-time transforms (`aggregate`, `dedupe`): a record stamped far
//! ahead of the wall clock (a device whose clock is wrong) is refused instead of moving event
//! time forward for every other device.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat};
use sluice_core::config::HumanDuration;

/// Default `max_future_skew`: how far ahead of the wall clock an event time may be.
pub(crate) fn default_max_future_skew() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}

/// Refuses event times more than `max` ahead of the wall clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FutureSkew {
    max: HumanDuration,
    max_ns: i64,
}

impl FutureSkew {
    pub(crate) fn new(max: HumanDuration) -> Self {
        FutureSkew {
            max,
            max_ns: i64::try_from(max.0.as_nanos()).unwrap_or(i64::MAX),
        }
    }

    /// Why an event at `time` is refused when the wall clock reads `now` (both ns since the
    /// epoch), or `None` if it is acceptable.
    pub(crate) fn check(&self, time: i64, now: i64) -> Option<String> {
        if time <= now.saturating_add(self.max_ns) {
            return None;
        }
        let ahead = Duration::from_nanos(u64::try_from(time.saturating_sub(now)).unwrap_or(0));
        // Whole seconds read better than "75years 3days 1h 2m 3s 456ms 789us".
        let ahead = HumanDuration(Duration::from_secs(ahead.as_secs()));
        Some(format!(
            "event time {} is {ahead} ahead of the wall clock ({}), beyond max_future_skew = \"{}\"",
            rfc3339(time),
            rfc3339(now),
            self.max,
        ))
    }
}

fn rfc3339(ns: i64) -> String {
    DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    #[test]
    fn refuses_only_beyond_the_limit_and_says_why() {
        let skew = FutureSkew::new(default_max_future_skew());
        let now = 1_767_225_600 * S; // 2026-01-01T00:00:00Z
        assert_eq!(skew.check(now, now), None);
        assert_eq!(skew.check(now + 300 * S, now), None, "at the limit");
        assert_eq!(skew.check(i64::MIN, now), None, "the past is not skew");
        let why = skew.check(now + 301 * S, now).expect("beyond the limit");
        assert!(why.contains("2026-01-01T00:05:01Z"), "{why}");
        assert!(why.contains("5m 1s ahead"), "{why}");
        assert!(why.contains("max_future_skew = \"5m\""), "{why}");
        let far = skew.check(i64::MAX, now).expect("far future");
        assert!(far.contains("2262-"), "{far}");
    }
}
