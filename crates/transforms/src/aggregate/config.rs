//! The `aggregate` configuration: window kind, groups, functions, lateness and limits.

use std::time::Duration;

use async_trait::async_trait;
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::config::HumanDuration;
use sluice_core::registry::{BuildContext, TransformConfig};
use sluice_core::transform::Transform;
use sluice_core::BoxError;

use super::{Aggregator, LATE};

/// An aggregation function applied to a field's values in a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AggFn {
    Count,
    Sum,
    Min,
    Max,
    Mean,
    /// The value with the earliest event time.
    First,
    /// The value with the latest event time.
    Last,
    /// Sample standard deviation (null for fewer than two values).
    Stddev,
    /// Quantiles: the value of rank ⌊q·(n−1)⌋ within 1% relative error (DDSketch), clamped to
    /// the exact min and max.
    P50,
    P90,
    P95,
    P99,
}

impl AggFn {
    pub(super) fn name(self) -> &'static str {
        match self {
            AggFn::Count => "count",
            AggFn::Sum => "sum",
            AggFn::Min => "min",
            AggFn::Max => "max",
            AggFn::Mean => "mean",
            AggFn::First => "first",
            AggFn::Last => "last",
            AggFn::Stddev => "stddev",
            AggFn::P50 => "p50",
            AggFn::P90 => "p90",
            AggFn::P95 => "p95",
            AggFn::P99 => "p99",
        }
    }

    pub(super) fn quantile(self) -> Option<f64> {
        match self {
            AggFn::P50 => Some(0.5),
            AggFn::P90 => Some(0.9),
            AggFn::P95 => Some(0.95),
            AggFn::P99 => Some(0.99),
            _ => None,
        }
    }
}

/// What to do with a record of a new group when `max_groups` groups are open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Emit the open windows of the least recently updated group now (marked partial) and make
    /// room for the new one.
    #[default]
    FlushOldest,
    /// Send the record to `dead_letter`.
    DeadLetter,
    /// Discard the record (acknowledged, counted).
    Drop,
}

/// Windowed rollups on event time, per group of tags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// Window length: tumbling windows, or hopping windows when `hop` is set. Exactly one of
    /// `window` and `gap` is required. Default: none.
    #[serde(default)]
    pub window: Option<HumanDuration>,
    /// Hopping windows: a new window of length `window` starts every `hop` (at most `window`).
    /// Default: none (tumbling).
    #[serde(default)]
    pub hop: Option<HumanDuration>,
    /// Session windows: a group's window stays open while records arrive less than `gap` apart.
    /// Default: none.
    #[serde(default)]
    pub gap: Option<HumanDuration>,
    /// Tags forming a group (e.g. `["device_id"]` or `["tenant", "project"]`); output records
    /// carry these tags only. A record missing one goes to `dead_letter`. Default [] (one group).
    #[serde(default)]
    pub group_by: Vec<String>,
    /// Functions per numeric field: `{ temp = ["mean", "p99"] }`. Functions: count, sum, min,
    /// max, mean, first, last, stddev, p50, p90, p95, p99. Required.
    pub fields: IndexMap<String, Vec<AggFn>>,
    /// How far behind the newest event time a record may be and still join its window.
    /// Default "10s".
    #[serde(default = "default_allowed_lateness")]
    pub allowed_lateness: HumanDuration,
    /// When no input arrives for this long (wall clock), the watermark advances with the wall
    /// clock so open windows close anyway. Default "10s".
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// Maximum number of groups with open windows. Default 100000.
    #[serde(default = "default_max_groups")]
    pub max_groups: usize,
    /// At `max_groups`, what happens to a record of a new group: "flush_oldest" (emit the least
    /// recently updated group's windows as partial), "dead_letter" or "drop".
    /// Default "flush_oldest".
    #[serde(default)]
    pub when_full: WhenFull,
    /// Whose event time closes windows: "global" (the newest event time of any group; one
    /// stream's lateness applies to all) or "per_group" (each group's own newest event time, so
    /// one device with a fast clock or a backlog cannot make the rest of the fleet late).
    /// Default "global".
    #[serde(default)]
    pub watermark: WatermarkMode,
    /// A record whose event time is more than this ahead of the wall clock goes to
    /// `dead_letter` (with its time and this limit in the reason) instead of moving the
    /// watermark. Set a large value (e.g. "100y") to replay data stamped in the future.
    /// Default "5m".
    #[serde(default = "crate::event_time::default_max_future_skew")]
    pub max_future_skew: HumanDuration,
    /// Most emitted rollups kept, with their inputs' acknowledgements, until their outcome is
    /// known, so that a rollup a sink gave up on (Errored) is emitted again instead of being
    /// lost. Past it the oldest rollup's inputs take that rollup's outcome directly (an Errored
    /// rollup then makes its inputs redelivered; they arrive late). Default 200000.
    #[serde(default = "default_max_pending_rollups")]
    pub max_pending_rollups: usize,
}

/// Whose event time drives an `aggregate`'s watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WatermarkMode {
    /// One watermark: the newest event time of all groups minus `allowed_lateness`.
    #[default]
    Global,
    /// One watermark per group, from that group's own records (and its own idle time).
    PerGroup,
}

fn default_allowed_lateness() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_max_groups() -> usize {
    100_000
}
fn default_max_pending_rollups() -> usize {
    200_000
}

pub(super) fn ns(d: HumanDuration) -> i64 {
    i64::try_from(d.0.as_nanos()).unwrap_or(i64::MAX)
}

#[async_trait]
impl TransformConfig for AggregateConfig {
    async fn build(&self, cx: &BuildContext) -> Result<Box<dyn Transform>, BoxError> {
        Ok(Box::new(Aggregator::new(self, cx)?))
    }

    fn outputs(&self) -> Vec<String> {
        vec![LATE.to_string()]
    }

    /// A window's inputs are acknowledged once its rollup is written: after the window's
    /// length plus `allowed_lateness` (a session lasts at least `gap`, longer while records
    /// keep coming).
    fn ack_hold(&self) -> Option<(Duration, &'static str)> {
        let (length, what) = match (self.window, self.gap) {
            (Some(w), _) => (w.0, "window + allowed_lateness"),
            (None, Some(g)) => (g.0, "gap + allowed_lateness"),
            (None, None) => return None,
        };
        Some((length.saturating_add(self.allowed_lateness.0), what))
    }
}
