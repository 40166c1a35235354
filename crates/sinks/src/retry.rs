//! Retry policy shared by the network sinks: capped exponential backoff with jitter, or the
//! delay the server asked for (`Retry-After`), for a bounded number of attempts. After the last
//! attempt the sink gives up on the batch and reports it `Errored`, so the source redelivers.

use std::time::Duration;

use rand::Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::config::HumanDuration;

/// How a sink retries a transient failure (throttling, 5xx, timeouts, connection errors).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Retries after the first attempt before the batch is given up (and redelivered by the
    /// source). Default 8.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Delay before the first retry; doubles on each further retry. Default "100ms".
    #[serde(default = "default_initial_backoff")]
    pub initial_backoff: HumanDuration,
    /// Upper bound of the exponential delay, and of a server's `Retry-After`. Default "30s".
    #[serde(default = "default_max_backoff")]
    pub max_backoff: HumanDuration,
}

fn default_max_retries() -> u32 {
    8
}
fn default_initial_backoff() -> HumanDuration {
    HumanDuration(Duration::from_millis(100))
}
fn default_max_backoff() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_retries: default_max_retries(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

/// The retry state of one request.
#[derive(Debug)]
pub struct Backoff {
    config: RetryConfig,
    retries: u32,
}

impl Backoff {
    pub fn new(config: RetryConfig) -> Self {
        Backoff { config, retries: 0 }
    }

    /// Retries made so far.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// The delay before the next retry, or `None` when the retries are used up. `server_hint`
    /// (a `Retry-After`) replaces the computed delay, capped at `max_backoff`; otherwise the
    /// delay is a random point in the upper half of `initial * 2^retries` ("equal jitter"), so
    /// that many writers throttled together do not retry in lockstep.
    pub fn next_delay(&mut self, server_hint: Option<Duration>) -> Option<Duration> {
        if self.retries >= self.config.max_retries {
            return None;
        }
        let cap = self.config.max_backoff.0;
        let delay = match server_hint {
            Some(hint) => hint.min(cap),
            None => {
                let exp = self
                    .config
                    .initial_backoff
                    .0
                    .saturating_mul(1u32 << self.retries.min(20))
                    .min(cap);
                let half = exp / 2;
                half + half.mul_f64(rand::rng().random::<f64>())
            }
        };
        self.retries += 1;
        Some(delay)
    }
}

/// The largest delay `parse_retry_after` returns. A header is server-controlled input: without
/// a bound, `Retry-After: 99999999999999999999` would overflow `Duration` (a panic in
/// `from_secs_f64`). `Backoff::next_delay` caps the hint further, at `max_backoff`.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// Parses a `Retry-After` header: delay-seconds or an HTTP date, capped at `MAX_RETRY_AFTER`.
/// A value that is not a delay (negative, NaN, infinite, unparsable) gives `None`, so the
/// caller falls back to its computed backoff; a date in the past gives zero.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    if let Ok(secs) = value.parse::<f64>() {
        if !secs.is_finite() || secs < 0.0 {
            return None;
        }
        // Finite and non-negative, so the only failure left is overflow: that is a huge delay.
        return Some(
            Duration::try_from_secs_f64(secs)
                .unwrap_or(MAX_RETRY_AFTER)
                .min(MAX_RETRY_AFTER),
        );
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let now = chrono::Utc::now();
    Some(
        (at.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_ends() {
        let mut b = Backoff::new(RetryConfig {
            max_retries: 5,
            initial_backoff: HumanDuration(Duration::from_millis(100)),
            max_backoff: HumanDuration(Duration::from_millis(300)),
        });
        let delays: Vec<Duration> = std::iter::from_fn(|| b.next_delay(None)).collect();
        assert_eq!(delays.len(), 5);
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[1] >= Duration::from_millis(100) && delays[1] <= Duration::from_millis(200));
        assert!(delays[4] >= Duration::from_millis(150) && delays[4] <= Duration::from_millis(300));
    }

    #[test]
    fn server_hint_wins_but_is_capped() {
        let mut b = Backoff::new(RetryConfig::default());
        assert_eq!(
            b.next_delay(Some(Duration::from_secs(2))),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            b.next_delay(Some(Duration::from_secs(3600))),
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn retry_after_huge_or_invalid_values_do_not_panic() {
        // Overflows u64, parses as f64 1e20: used to panic in `Duration::from_secs_f64`.
        assert_eq!(
            parse_retry_after("99999999999999999999"),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(parse_retry_after("1e300"), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse_retry_after(&u64::MAX.to_string()),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(
            parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT"),
            Some(MAX_RETRY_AFTER)
        );
        for invalid in ["-1", "-0.5", "NaN", "nan", "inf", "-inf", "infinity", ""] {
            assert_eq!(parse_retry_after(invalid), None, "{invalid:?}");
        }
        assert_eq!(parse_retry_after("-0"), Some(Duration::ZERO));
    }
}
