//! `aggregate` transform: windowed rollups on event time, per group of tags.
//!
//! ```toml
//! [transforms.rollup_1m]
//! type = "aggregate"
//! inputs = ["sim"]
//! window = "1m"                 # tumbling; add `hop = "10s"` for hopping, or use `gap = "30s"`
//! group_by = ["device_id"]
//! allowed_lateness = "10s"
//! fields = { temp = ["mean", "min", "max", "p99"], humidity = ["mean"] }
//! ```
//!
//! Each emitted record is one (group, window): time = window start, the `group_by` tags, fields
//! `window_start` / `window_end` (ns), `partial` (true when emitted before the window closed:
//! shutdown or `when_full = "flush_oldest"`) and one `{field}_{function}` per function.
//! Quantiles come from a DDSketch (1% relative error, mergeable).
//!
//! **Event time and lateness.** The watermark is the largest event time seen minus
//! `allowed_lateness`; a window closes once the watermark reaches its end. A record whose every
//! window is closed goes to the `late` output (never silently dropped). When input stops for
//! `idle_timeout` (wall clock), the watermark advances with the wall clock, so the last windows
//! still close without new input.
//!
//! **Acknowledgement guarantee.** An input record's finalizers move into every window it feeds
//! and leave on that window's output record: the source acknowledges an input only after every
//! rollup it contributed to has been delivered downstream (at-least-once). Records therefore stay
//! unacknowledged for up to one window plus `allowed_lateness`; size a source's in-flight limit
//! for that. If the process dies, open windows are lost but their inputs were not acknowledged,
//! so they are redelivered and the windows recomputed (a window may then be emitted twice, once
//! partially). Late records leave on `late` with their own finalizers; rejected ones on
//! `dead_letter`.

use std::time::Duration;

use async_trait::async_trait;
use indexmap::IndexMap;
use lru::LruCache;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sketches_ddsketch::{Config as SketchConfig, DDSketch};
use sluice_core::ack::Finalizers;
use sluice_core::config::HumanDuration;
use sluice_core::record::{intern, Batch, Name, Record, Value};
use sluice_core::registry::{BuildContext, TransformConfig};
use sluice_core::transform::{Transform, TransformOutput};
use sluice_core::BoxError;
use smallvec::SmallVec;

use crate::group::{GroupBy, GroupKey};
use crate::Error;

/// The output receiving records that arrive after their windows closed.
pub const LATE: &str = "late";

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
    fn name(self) -> &'static str {
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

    fn quantile(self) -> Option<f64> {
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

fn ns(d: HumanDuration) -> i64 {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Windows {
    Tumbling { size: i64 },
    Hopping { size: i64, hop: i64 },
    Session { gap: i64 },
}

#[derive(Debug)]
struct FieldSpec {
    name: Name,
    /// (function, output field name), e.g. (Mean, "temp_mean").
    outputs: Vec<(AggFn, Name)>,
    sketch: bool,
}

/// Running statistics of one field in one window.
#[derive(Clone)]
struct FieldAgg {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    mean: f64,
    /// Sum of squared deviations from the mean (Welford).
    m2: f64,
    first: (i64, f64),
    last: (i64, f64),
    sketch: Option<Box<DDSketch>>,
}

impl std::fmt::Debug for FieldAgg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FieldAgg")
            .field("count", &self.count)
            .field("mean", &self.mean)
            .field("sketch", &self.sketch.is_some())
            .finish()
    }
}

impl FieldAgg {
    fn new(sketch: bool) -> Self {
        FieldAgg {
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            mean: 0.0,
            m2: 0.0,
            first: (i64::MAX, f64::NAN),
            last: (i64::MIN, f64::NAN),
            sketch: sketch.then(|| Box::new(DDSketch::new(SketchConfig::defaults()))),
        }
    }

    fn add(&mut self, time: i64, v: f64) {
        self.count += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        let delta = v - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (v - self.mean);
        if time < self.first.0 {
            self.first = (time, v);
        }
        if time >= self.last.0 {
            self.last = (time, v);
        }
        if let Some(s) = &mut self.sketch {
            s.add(v);
        }
    }

    /// Folds `other` into `self` (session windows joined by a record that bridges them).
    fn merge(&mut self, other: &FieldAgg) {
        if other.count == 0 {
            return;
        }
        let n = (self.count + other.count) as f64;
        let delta = other.mean - self.mean;
        self.mean += delta * other.count as f64 / n;
        self.m2 += other.m2 + delta * delta * self.count as f64 * other.count as f64 / n;
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        if other.first.0 < self.first.0 {
            self.first = other.first;
        }
        if other.last.0 >= self.last.0 {
            self.last = other.last;
        }
        if let (Some(a), Some(b)) = (&mut self.sketch, &other.sketch) {
            // Both sketches come from the same constant configuration, so merging cannot fail.
            if let Err(e) = a.merge(b) {
                tracing::error!(error = %e, "aggregate: sketch merge failed");
            }
        }
    }

    fn value(&self, f: AggFn) -> Value {
        if f == AggFn::Count {
            return Value::I64(i64::try_from(self.count).unwrap_or(i64::MAX));
        }
        if self.count == 0 {
            return Value::Null;
        }
        let v = match f {
            AggFn::Count => self.count as f64,
            AggFn::Sum => self.sum,
            AggFn::Min => self.min,
            AggFn::Max => self.max,
            AggFn::Mean => self.mean,
            AggFn::First => self.first.1,
            AggFn::Last => self.last.1,
            AggFn::Stddev if self.count < 2 => return Value::Null,
            AggFn::Stddev => (self.m2 / (self.count - 1) as f64).max(0.0).sqrt(),
            AggFn::P50 | AggFn::P90 | AggFn::P95 | AggFn::P99 => {
                let q = f.quantile().unwrap_or(0.5);
                match self.sketch.as_ref().map(|s| s.quantile(q)) {
                    // The sketch's relative error can overshoot the exact extremes; clamp.
                    Some(Ok(Some(v))) => v.clamp(self.min, self.max),
                    _ => return Value::Null,
                }
            }
        };
        Value::F64(v)
    }
}

#[derive(Debug)]
struct Window {
    start: i64,
    end: i64,
    aggs: Vec<FieldAgg>,
    finalizers: Finalizers,
}

#[derive(Debug, Default)]
struct Group {
    /// Open windows, in no particular order (a handful at most).
    windows: Vec<Window>,
}

/// Counters of what the stage did besides emitting rollups (logged at shutdown).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Records sent to `late`.
    pub late: u64,
    /// Groups flushed early because `max_groups` was reached.
    pub evicted_groups: u64,
    /// Records refused (dead-lettered or dropped) because `max_groups` was reached.
    pub refused_full: u64,
    /// Records sent to `dead_letter` for bad input.
    pub invalid: u64,
}

/// The running `aggregate`.
#[derive(Debug)]
pub struct Aggregator {
    name: String,
    windows: Windows,
    group_by: GroupBy,
    fields: Vec<FieldSpec>,
    lateness: i64,
    idle_timeout: i64,
    max_groups: usize,
    when_full: WhenFull,
    groups: LruCache<GroupKey, Group>,
    /// Largest event time seen.
    max_event: i64,
    /// Windows ending at or before this are closed.
    watermark: i64,
    /// Smallest end of an open window: nothing closes before the watermark reaches it.
    next_close: i64,
    input_since_tick: bool,
    last_input_wall: Option<i64>,
    stats: Stats,
    names: OutputNames,
}

#[derive(Debug)]
struct OutputNames {
    window_start: Name,
    window_end: Name,
    partial: Name,
}

impl Aggregator {
    /// Validates `config` and builds the stage.
    pub fn new(config: &AggregateConfig, cx: &BuildContext) -> Result<Self, Error> {
        let windows = match (config.window, config.hop, config.gap) {
            (Some(w), None, None) if !w.0.is_zero() => Windows::Tumbling { size: ns(w) },
            (Some(w), Some(h), None) if !w.0.is_zero() && !h.0.is_zero() && h <= w => {
                Windows::Hopping {
                    size: ns(w),
                    hop: ns(h),
                }
            }
            (Some(_), Some(_), None) => {
                return Err(Error::option(
                    cx,
                    "hop",
                    "`hop` and `window` must be positive and `hop` at most `window`",
                ))
            }
            (None, None, Some(g)) if !g.0.is_zero() => Windows::Session { gap: ns(g) },
            (None, Some(_), _) => {
                return Err(Error::option(cx, "hop", "`hop` needs `window`"));
            }
            (Some(_), _, Some(_)) => {
                return Err(Error::option(
                    cx,
                    "gap",
                    "set either `window` (tumbling/hopping) or `gap` (session), not both",
                ))
            }
            (None, None, None) => return Err(Error::option(
                cx,
                "window",
                "set `window = \"1m\"` (tumbling), `window` + `hop` (hopping) or `gap` (session)",
            )),
            _ => return Err(Error::option(cx, "window", "durations must be positive")),
        };
        if config.fields.is_empty() {
            return Err(Error::option(
                cx,
                "fields",
                "at least one field is required, e.g. fields = { temp = [\"mean\"] }",
            ));
        }
        let mut fields = Vec::new();
        for (field, fns) in &config.fields {
            if fns.is_empty() {
                return Err(Error::option(
                    cx,
                    format!("fields.{field}"),
                    "list at least one function",
                ));
            }
            let mut outputs: Vec<(AggFn, Name)> = Vec::new();
            for f in fns {
                if !outputs.iter().any(|(g, _)| g == f) {
                    outputs.push((*f, intern(&format!("{field}_{}", f.name()))));
                }
            }
            fields.push(FieldSpec {
                name: intern(field),
                sketch: outputs.iter().any(|(f, _)| f.quantile().is_some()),
                outputs,
            });
        }
        if config.max_groups == 0 {
            return Err(Error::option(cx, "max_groups", "must be at least 1"));
        }
        Ok(Aggregator {
            name: cx.name.clone(),
            windows,
            group_by: GroupBy::new(&config.group_by),
            fields,
            lateness: ns(config.allowed_lateness),
            idle_timeout: ns(config.idle_timeout),
            max_groups: config.max_groups,
            when_full: config.when_full,
            groups: LruCache::unbounded(),
            max_event: i64::MIN,
            watermark: i64::MIN,
            next_close: i64::MAX,
            input_since_tick: false,
            last_input_wall: None,
            stats: Stats::default(),
            names: OutputNames {
                window_start: intern("window_start"),
                window_end: intern("window_end"),
                partial: intern("partial"),
            },
        })
    }

    /// What the stage counted so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Number of groups with open windows.
    pub fn open_groups(&self) -> usize {
        self.groups.len()
    }

    /// The values of the aggregated fields; `Err` when one is unusable.
    fn values(&self, r: &Record) -> Result<SmallVec<[Option<f64>; 4]>, String> {
        let mut values = SmallVec::new();
        let mut any = false;
        for spec in &self.fields {
            let v = match r.field(&spec.name) {
                None | Some(Value::Null) => None,
                Some(v @ Value::Str(_)) => {
                    return Err(format!(
                        "field `{}` is a {}, not a number",
                        spec.name,
                        v.type_name()
                    ))
                }
                Some(v) => match v.as_f64() {
                    Some(x) if x.is_finite() => Some(x),
                    Some(x) => return Err(format!("field `{}` is {x}", spec.name)),
                    None => return Err(format!("field `{}` is not a number", spec.name)),
                },
            };
            any |= v.is_some();
            values.push(v);
        }
        if !any {
            let names: Vec<&str> = self.fields.iter().map(|f| &*f.name).collect();
            return Err(format!(
                "none of the aggregated fields {names:?} is present"
            ));
        }
        Ok(values)
    }

    fn accept(&mut self, mut r: Record, out: &mut TransformOutput) {
        let key = match self.group_by.key(&r) {
            Ok(k) => k,
            Err(e) => return self.invalid(r, e, out),
        };
        let values = match self.values(&r) {
            Ok(v) => v,
            Err(e) => return self.invalid(r, e, out),
        };
        let t = r.time;
        // Windows (start, end) the record belongs to and that are still open.
        let mut targets: SmallVec<[(i64, i64); 4]> = SmallVec::new();
        match self.windows {
            Windows::Tumbling { size } => {
                let start = t.div_euclid(size).saturating_mul(size);
                targets.push((start, start.saturating_add(size)));
            }
            Windows::Hopping { size, hop } => {
                let mut start = t.div_euclid(hop).saturating_mul(hop);
                while start > t.saturating_sub(size) {
                    targets.push((start, start.saturating_add(size)));
                    start = start.saturating_sub(hop);
                }
            }
            Windows::Session { gap } => targets.push((t, t.saturating_add(gap))),
        }
        let watermark = self.watermark;
        let joins_open_session = matches!(self.windows, Windows::Session { .. })
            && self.groups.peek(&key).is_some_and(|g| {
                g.windows
                    .iter()
                    .any(|w| t >= w.start.saturating_sub(gap_of(self.windows)) && t < w.end)
            });
        targets.retain(|(_, end)| *end > watermark);
        if targets.is_empty() && !joins_open_session {
            self.stats.late += 1;
            out.push_to(LATE, r);
            return;
        }
        if !self.groups.contains(&key) && self.groups.len() >= self.max_groups {
            match self.when_full {
                WhenFull::FlushOldest => {
                    if let Some((old_key, old)) = self.groups.pop_lru() {
                        self.stats.evicted_groups += 1;
                        let mut emitted = Vec::new();
                        for w in old.windows {
                            emitted.push(self.emit(&old_key, w, true));
                        }
                        for rec in emitted {
                            out.push(rec);
                        }
                    }
                }
                WhenFull::DeadLetter => {
                    self.stats.refused_full += 1;
                    let reason = format!(
                        "aggregate `{}`: max_groups ({}) reached, new group `{}` refused",
                        self.name,
                        self.max_groups,
                        GroupBy::display(&key)
                    );
                    out.dead_letter(r, reason);
                    return;
                }
                WhenFull::Drop => {
                    self.stats.refused_full += 1;
                    r.discard();
                    return;
                }
            }
        }
        let fins = std::mem::take(&mut r.finalizers);
        let windows_kind = self.windows;
        let fields = &self.fields;
        let group = self.groups.get_or_insert_mut(key, Group::default);
        let mut next_close = self.next_close;
        match windows_kind {
            Windows::Session { gap } => {
                // Every open session the record touches is merged into one.
                let mut touching: SmallVec<[usize; 2]> = SmallVec::new();
                for (i, w) in group.windows.iter().enumerate() {
                    if t >= w.start.saturating_sub(gap) && t < w.end {
                        touching.push(i);
                    }
                }
                let idx = match touching.first() {
                    Some(&first) => {
                        for &i in touching.iter().skip(1).rev() {
                            let other = group.windows.swap_remove(i);
                            let w = &mut group.windows[first];
                            w.start = w.start.min(other.start);
                            w.end = w.end.max(other.end);
                            for (a, b) in w.aggs.iter_mut().zip(&other.aggs) {
                                a.merge(b);
                            }
                            w.finalizers.merge(other.finalizers);
                        }
                        first
                    }
                    None => {
                        group
                            .windows
                            .push(new_window(fields, t, t.saturating_add(gap)));
                        group.windows.len() - 1
                    }
                };
                let w = &mut group.windows[idx];
                w.start = w.start.min(t);
                w.end = w.end.max(t.saturating_add(gap));
                for (agg, v) in w.aggs.iter_mut().zip(&values) {
                    if let Some(v) = v {
                        agg.add(t, *v);
                    }
                }
                w.finalizers.merge(fins);
                next_close = next_close.min(w.end);
            }
            Windows::Tumbling { .. } | Windows::Hopping { .. } => {
                let n = targets.len();
                let mut fins = Some(fins);
                for (i, (start, end)) in targets.iter().enumerate() {
                    let idx = match group.windows.iter().position(|w| w.start == *start) {
                        Some(idx) => idx,
                        None => {
                            group.windows.push(new_window(fields, *start, *end));
                            group.windows.len() - 1
                        }
                    };
                    let w = &mut group.windows[idx];
                    for (agg, v) in w.aggs.iter_mut().zip(&values) {
                        if let Some(v) = v {
                            agg.add(t, *v);
                        }
                    }
                    // Each window holds its own clone; the last one takes the original.
                    let f = if i + 1 == n {
                        fins.take().unwrap_or_default()
                    } else {
                        fins.as_ref().cloned().unwrap_or_default()
                    };
                    w.finalizers.merge(f);
                    next_close = next_close.min(w.end);
                }
            }
        }
        self.next_close = next_close;
        self.max_event = self.max_event.max(t);
        self.watermark = self
            .watermark
            .max(self.max_event.saturating_sub(self.lateness));
    }

    fn invalid(&mut self, r: Record, reason: String, out: &mut TransformOutput) {
        self.stats.invalid += 1;
        out.dead_letter(r, format!("aggregate `{}`: {reason}", self.name));
    }

    /// Emits every window whose end the watermark reached.
    fn close_ready(&mut self, out: &mut TransformOutput) {
        if self.watermark < self.next_close {
            return;
        }
        let watermark = self.watermark;
        let mut closed: Vec<(GroupKey, Window)> = Vec::new();
        let mut empty: Vec<GroupKey> = Vec::new();
        let mut next_close = i64::MAX;
        for (key, group) in self.groups.iter_mut() {
            let mut i = 0;
            while i < group.windows.len() {
                if group.windows[i].end <= watermark {
                    closed.push((key.clone(), group.windows.swap_remove(i)));
                } else {
                    next_close = next_close.min(group.windows[i].end);
                    i += 1;
                }
            }
            if group.windows.is_empty() {
                empty.push(key.clone());
            }
        }
        for key in empty {
            self.groups.pop(&key);
        }
        self.next_close = next_close;
        self.emit_sorted(closed, false, out);
    }

    fn emit_sorted(
        &self,
        mut closed: Vec<(GroupKey, Window)>,
        partial: bool,
        out: &mut TransformOutput,
    ) {
        // Deterministic output: by window, then group.
        closed.sort_by(|(ka, a), (kb, b)| (a.end, a.start, ka).cmp(&(b.end, b.start, kb)));
        for (key, w) in closed {
            out.push(self.emit(&key, w, partial));
        }
    }

    fn emit(&self, key: &GroupKey, w: Window, partial: bool) -> Record {
        let mut r = Record::new(w.start);
        r.tags = self.group_by.tags_of(key);
        let n: usize = self.fields.iter().map(|f| f.outputs.len()).sum();
        r.fields.reserve(n + 3);
        r.fields
            .push((self.names.window_start.clone(), Value::I64(w.start)));
        r.fields
            .push((self.names.window_end.clone(), Value::I64(w.end)));
        r.fields
            .push((self.names.partial.clone(), Value::Bool(partial)));
        for (spec, agg) in self.fields.iter().zip(&w.aggs) {
            for (f, name) in &spec.outputs {
                r.fields.push((name.clone(), agg.value(*f)));
            }
        }
        r.finalizers = w.finalizers;
        r
    }
}

fn new_window(fields: &[FieldSpec], start: i64, end: i64) -> Window {
    Window {
        start,
        end,
        aggs: fields.iter().map(|f| FieldAgg::new(f.sketch)).collect(),
        finalizers: Finalizers::new(),
    }
}

fn gap_of(w: Windows) -> i64 {
    match w {
        Windows::Session { gap } => gap,
        _ => 0,
    }
}

impl Transform for Aggregator {
    fn process(&mut self, batch: Batch, out: &mut TransformOutput) {
        if !batch.is_empty() {
            self.input_since_tick = true;
        }
        for r in batch.records {
            self.accept(r, out);
        }
        self.close_ready(out);
    }

    fn tick_interval(&self) -> Option<Duration> {
        let half = Duration::from_nanos(u64::try_from(self.idle_timeout / 2).unwrap_or(0));
        Some(half.clamp(Duration::from_millis(10), Duration::from_secs(1)))
    }

    fn on_tick(&mut self, now: i64, out: &mut TransformOutput) {
        if self.input_since_tick || self.last_input_wall.is_none() {
            self.input_since_tick = false;
            self.last_input_wall = Some(now);
            return;
        }
        let Some(last) = self.last_input_wall else {
            return;
        };
        let idle = now.saturating_sub(last);
        if idle < self.idle_timeout || self.groups.is_empty() || self.max_event == i64::MIN {
            return;
        }
        // Input stopped: let event time follow the wall clock so open windows close.
        self.watermark = self.watermark.max(
            self.max_event
                .saturating_add(idle)
                .saturating_sub(self.lateness),
        );
        self.close_ready(out);
    }

    fn flush(&mut self, out: &mut TransformOutput) {
        let mut open = Vec::new();
        while let Some((key, group)) = self.groups.pop_lru() {
            for w in group.windows {
                open.push((key.clone(), w));
            }
        }
        self.next_close = i64::MAX;
        self.emit_sorted(open, true, out);
        let s = self.stats;
        tracing::info!(
            transform = %self.name,
            late = s.late,
            evicted_groups = s.evicted_groups,
            refused_full = s.refused_full,
            invalid = s.invalid,
            "aggregate flushed open windows"
        );
    }
}

#[cfg(test)]
mod tests {
    use sluice_core::ack::{self, BatchStatus};

    use super::*;
    use crate::testing::{cx, f64_field, rec, take};

    fn config(f: impl FnOnce(&mut AggregateConfig)) -> AggregateConfig {
        let mut fields = IndexMap::new();
        fields.insert(
            "temp".to_string(),
            vec![
                AggFn::Count,
                AggFn::Sum,
                AggFn::Min,
                AggFn::Max,
                AggFn::Mean,
                AggFn::First,
                AggFn::Last,
                AggFn::Stddev,
                AggFn::P50,
                AggFn::P99,
            ],
        );
        let mut c = AggregateConfig {
            window: Some(HumanDuration(Duration::from_secs(60))),
            hop: None,
            gap: None,
            group_by: vec!["device_id".into()],
            fields,
            allowed_lateness: HumanDuration(Duration::from_secs(10)),
            idle_timeout: HumanDuration(Duration::from_secs(10)),
            max_groups: 100,
            when_full: WhenFull::FlushOldest,
        };
        f(&mut c);
        c
    }

    fn agg(f: impl FnOnce(&mut AggregateConfig)) -> Aggregator {
        Aggregator::new(&config(f), &cx()).expect("valid config")
    }

    fn temp(secs: f64, dev: &str, t: f64) -> Record {
        rec(secs, dev, &[("temp", Value::F64(t))])
    }

    fn run(a: &mut Aggregator, records: Vec<Record>) -> TransformOutput {
        let mut out = TransformOutput::default();
        a.process(Batch::new(records), &mut out);
        out
    }

    const S: i64 = 1_000_000_000;

    #[test]
    fn tumbling_window_computes_every_function() {
        let mut a = agg(|_| {});
        let values = [3.0, 1.0, 4.0, 1.0, 5.0];
        let recs = values
            .iter()
            .enumerate()
            .map(|(i, v)| temp(i as f64, "d1", *v))
            .collect();
        let mut out = run(&mut a, recs);
        assert!(take(&mut out, "default").is_empty(), "window still open");
        // An event at 75s moves the watermark to 65s ≥ 60s: the first window closes.
        let mut out = run(&mut a, vec![temp(75.0, "d1", 9.0)]);
        let rolled = take(&mut out, "default");
        assert_eq!(rolled.len(), 1);
        let r = &rolled[0];
        assert_eq!(r.time, 0);
        assert_eq!(r.tag("device_id"), Some("d1"));
        assert_eq!(r.field("window_start"), Some(&Value::I64(0)));
        assert_eq!(r.field("window_end"), Some(&Value::I64(60 * S)));
        assert_eq!(r.field("partial"), Some(&Value::Bool(false)));
        assert_eq!(r.field("temp_count"), Some(&Value::I64(5)));
        assert_eq!(f64_field(r, "temp_sum"), 14.0);
        assert_eq!(f64_field(r, "temp_min"), 1.0);
        assert_eq!(f64_field(r, "temp_max"), 5.0);
        assert!((f64_field(r, "temp_mean") - 2.8).abs() < 1e-12);
        assert_eq!(f64_field(r, "temp_first"), 3.0);
        assert_eq!(f64_field(r, "temp_last"), 5.0);
        // Sample stddev of 3,1,4,1,5 = sqrt(3.2).
        let sd = f64_field(r, "temp_stddev");
        assert!((sd - 3.2f64.sqrt()).abs() < 1e-12, "{sd}");
        // DDSketch: the value of rank floor(q·(n−1)) within 1% relative error; sorted values
        // are 1,1,3,4,5, so p50 is rank 2 (3) and p99 is rank 3 (4).
        assert!((f64_field(r, "temp_p50") - 3.0).abs() <= 0.03);
        assert!((f64_field(r, "temp_p99") - 4.0).abs() <= 0.04);
    }

    #[test]
    fn quantiles_of_a_large_window_are_within_one_percent() {
        let mut a = agg(|_| {});
        // 1..=1000 in a scrambled order.
        let recs = (0..1000)
            .map(|i| temp(f64::from(i % 60), "d1", f64::from((i * 7919) % 1000 + 1)))
            .collect();
        run(&mut a, recs);
        let mut out = TransformOutput::default();
        a.flush(&mut out);
        let r = &take(&mut out, "default")[0];
        for (name, exact) in [("temp_p50", 500.0), ("temp_p99", 990.0)] {
            let got = f64_field(r, name);
            assert!(
                (got - exact).abs() / exact < 0.02,
                "{name}: {got} vs {exact}"
            );
        }
    }

    #[test]
    fn one_record_window_and_first_last_by_event_time() {
        let mut a = agg(|_| {});
        // Out of order inside the window: first/last follow event time, not arrival.
        run(&mut a, vec![temp(20.0, "d1", 2.0), temp(10.0, "d1", 1.0)]);
        run(&mut a, vec![temp(30.0, "d2", 7.0)]);
        let mut out = TransformOutput::default();
        a.flush(&mut out);
        let rolled = take(&mut out, "default");
        assert_eq!(rolled.len(), 2);
        let d1 = &rolled[0];
        assert_eq!(f64_field(d1, "temp_first"), 1.0);
        assert_eq!(f64_field(d1, "temp_last"), 2.0);
        let d2 = &rolled[1];
        assert_eq!(d2.field("temp_count"), Some(&Value::I64(1)));
        assert_eq!(f64_field(d2, "temp_mean"), 7.0);
        assert_eq!(d2.field("temp_stddev"), Some(&Value::Null), "one value");
        assert_eq!(f64_field(d2, "temp_p99"), 7.0);
        assert_eq!(
            d2.field("partial"),
            Some(&Value::Bool(true)),
            "flushed early"
        );
    }

    #[test]
    fn empty_input_and_empty_flush_emit_nothing() {
        let mut a = agg(|_| {});
        let mut out = run(&mut a, Vec::new());
        a.on_tick(0, &mut out);
        a.on_tick(100 * S, &mut out);
        a.flush(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn field_absent_from_some_records_is_null_not_zero() {
        let mut c = config(|_| {});
        c.fields
            .insert("humidity".into(), vec![AggFn::Mean, AggFn::Count]);
        let mut a = Aggregator::new(&c, &cx()).expect("valid");
        run(&mut a, vec![temp(1.0, "d1", 20.0)]);
        let mut out = TransformOutput::default();
        a.flush(&mut out);
        let r = &take(&mut out, "default")[0];
        assert_eq!(r.field("humidity_mean"), Some(&Value::Null));
        assert_eq!(r.field("humidity_count"), Some(&Value::I64(0)));
        assert_eq!(f64_field(r, "temp_mean"), 20.0);
    }

    #[test]
    fn late_records_go_to_the_late_output() {
        let mut a = agg(|_| {});
        run(&mut a, vec![temp(5.0, "d1", 1.0), temp(75.0, "d1", 2.0)]);
        // 55s is before the watermark (65s) passed its window's end (60s): late.
        // 62s is behind the newest event but within allowed lateness: accepted.
        let mut out = run(&mut a, vec![temp(55.0, "d1", 3.0), temp(62.0, "d1", 4.0)]);
        let late = take(&mut out, LATE);
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].time, 55 * S);
        assert_eq!(a.stats().late, 1);
        let mut out = TransformOutput::default();
        a.flush(&mut out);
        let r = &take(&mut out, "default")[0];
        assert_eq!(r.field("temp_count"), Some(&Value::I64(2)), "75s and 62s");
    }

    #[test]
    fn bad_values_are_dead_lettered_with_a_reason() {
        let mut a = agg(|_| {});
        let mut no_tag = temp(1.0, "d1", 1.0);
        no_tag.remove_tag("device_id");
        let mut out = run(
            &mut a,
            vec![
                temp(1.0, "d1", f64::NAN),
                temp(1.0, "d1", f64::INFINITY),
                rec(1.0, "d1", &[("temp", Value::from("warm"))]),
                rec(1.0, "d1", &[("humidity", Value::F64(3.0))]),
                no_tag,
                rec(1.0, "d1", &[("temp", Value::I64(3))]),
            ],
        );
        let dead = take(&mut out, "dead_letter");
        let reasons: Vec<&str> = dead
            .iter()
            .map(|r| r.meta.error.as_deref().unwrap_or(""))
            .collect();
        assert_eq!(dead.len(), 5, "{reasons:?}");
        assert!(reasons[0].contains("`temp` is NaN"), "{}", reasons[0]);
        assert!(reasons[1].contains("`temp` is inf"), "{}", reasons[1]);
        assert!(
            reasons[2].contains("string, not a number"),
            "{}",
            reasons[2]
        );
        assert!(
            reasons[3].contains("none of the aggregated fields"),
            "{}",
            reasons[3]
        );
        assert!(
            reasons[4].contains("group_by tag `device_id`"),
            "{}",
            reasons[4]
        );
        assert_eq!(a.stats().invalid, 5);
        // The integer was accepted.
        a.flush(&mut out);
        assert_eq!(
            take(&mut out, "default")[0].field("temp_sum"),
            Some(&Value::F64(3.0))
        );
    }

    #[test]
    fn hopping_windows_count_each_record_in_every_window() {
        let mut a = agg(|c| {
            c.window = Some(HumanDuration(Duration::from_secs(60)));
            c.hop = Some(HumanDuration(Duration::from_secs(20)));
            c.allowed_lateness = HumanDuration(Duration::ZERO);
        });
        run(&mut a, vec![temp(45.0, "d1", 1.0)]);
        let mut out = run(&mut a, vec![temp(200.0, "d1", 2.0)]);
        let rolled = take(&mut out, "default");
        let starts: Vec<i64> = rolled.iter().map(|r| r.time / S).collect();
        // 45s is in [0,60), [20,80), [40,100).
        assert_eq!(starts, vec![0, 20, 40]);
        assert!(rolled
            .iter()
            .all(|r| r.field("temp_count") == Some(&Value::I64(1))));
    }

    #[test]
    fn session_windows_split_on_gap_and_merge_when_bridged() {
        let mut a = agg(|c| {
            c.window = None;
            c.gap = Some(HumanDuration(Duration::from_secs(30)));
            c.allowed_lateness = HumanDuration(Duration::from_secs(100));
        });
        // Two sessions: {0, 10} and {50}; then 35 arrives late and bridges them.
        let mut rolled = Vec::new();
        for batch in [
            vec![
                temp(0.0, "d1", 1.0),
                temp(10.0, "d1", 2.0),
                temp(50.0, "d1", 3.0),
            ],
            vec![temp(35.0, "d1", 4.0)],
            // A separate session much later, then an event that closes it.
            vec![temp(200.0, "d1", 5.0)],
            vec![temp(400.0, "d2", 0.0)],
        ] {
            rolled.extend(take(&mut run(&mut a, batch), "default"));
        }
        assert_eq!(rolled.len(), 2, "{rolled:?}");
        let merged = &rolled[0];
        assert_eq!(merged.field("temp_count"), Some(&Value::I64(4)));
        assert_eq!(merged.field("window_start"), Some(&Value::I64(0)));
        assert_eq!(merged.field("window_end"), Some(&Value::I64(80 * S)));
        assert_eq!(f64_field(merged, "temp_first"), 1.0);
        assert_eq!(f64_field(merged, "temp_last"), 3.0);
        assert!((f64_field(merged, "temp_mean") - 2.5).abs() < 1e-12);
        assert!((f64_field(merged, "temp_stddev") - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(rolled[1].field("temp_count"), Some(&Value::I64(1)));
    }

    #[test]
    fn idle_timeout_closes_windows_without_new_input() {
        let mut a = agg(|_| {});
        run(&mut a, vec![temp(1.0, "d1", 1.0)]);
        let mut out = TransformOutput::default();
        let wall = 1_000 * S;
        a.on_tick(wall, &mut out); // notes the input
        a.on_tick(wall + 5 * S, &mut out); // idle 5s < 10s
        assert!(out.is_empty());
        // Idle 80s: watermark = 1s + 80s - 10s = 71s ≥ 60s.
        a.on_tick(wall + 80 * S, &mut out);
        let rolled = take(&mut out, "default");
        assert_eq!(rolled.len(), 1);
        assert_eq!(rolled[0].field("partial"), Some(&Value::Bool(false)));
        assert_eq!(a.open_groups(), 0);
        // A record for the closed window now counts as late.
        let mut out = run(&mut a, vec![temp(2.0, "d1", 1.0)]);
        assert_eq!(take(&mut out, LATE).len(), 1);
    }

    #[test]
    fn max_groups_policies() {
        // flush_oldest: the least recently updated group is emitted early, as partial.
        let mut a = agg(|c| c.max_groups = 2);
        let mut out = run(
            &mut a,
            vec![
                temp(1.0, "a", 1.0),
                temp(2.0, "b", 1.0),
                temp(3.0, "a", 1.0),
                temp(4.0, "c", 1.0),
            ],
        );
        let flushed = take(&mut out, "default");
        assert_eq!(flushed.len(), 1);
        assert_eq!(flushed[0].tag("device_id"), Some("b"));
        assert_eq!(flushed[0].field("partial"), Some(&Value::Bool(true)));
        assert_eq!(a.stats().evicted_groups, 1);
        assert_eq!(a.open_groups(), 2);

        let mut a = agg(|c| {
            c.max_groups = 1;
            c.when_full = WhenFull::DeadLetter;
        });
        let mut out = run(&mut a, vec![temp(1.0, "a", 1.0), temp(2.0, "b", 1.0)]);
        let dead = take(&mut out, "dead_letter");
        assert_eq!(dead.len(), 1);
        assert!(dead[0]
            .meta
            .error
            .as_deref()
            .is_some_and(|e| e.contains("max_groups (1) reached")));
        assert_eq!(a.stats().refused_full, 1);

        let mut a = agg(|c| {
            c.max_groups = 1;
            c.when_full = WhenFull::Drop;
        });
        let (fin, mut status) = ack::batch();
        let mut b = temp(2.0, "b", 1.0);
        b.finalizers.push(fin);
        let out = run(&mut a, vec![temp(1.0, "a", 1.0), b]);
        assert!(out.is_empty());
        assert_eq!(a.stats().refused_full, 1);
        assert_eq!(status.try_status(), Some(BatchStatus::Delivered));
    }

    #[tokio::test]
    async fn inputs_are_acknowledged_only_with_their_window() {
        let mut a = agg(|_| {});
        let (fin, mut status) = ack::batch();
        let mut recs = vec![temp(1.0, "d1", 1.0), temp(2.0, "d2", 2.0)];
        for r in &mut recs {
            r.finalizers.push(fin.clone());
        }
        fin.finish(BatchStatus::Delivered); // the source's own handle
        let out = run(&mut a, recs);
        assert!(out.is_empty());
        assert_eq!(status.try_status(), None, "held by the open windows");
        let mut out = TransformOutput::default();
        a.flush(&mut out);
        let rolled = take(&mut out, "default");
        assert_eq!(rolled.len(), 2);
        assert!(rolled.iter().all(|r| r.finalizers.len() == 1));
        let mut rolled = rolled.into_iter();
        let first = rolled.next().expect("two windows");
        first.discard();
        assert_eq!(
            status.try_status(),
            None,
            "the other window is not delivered yet"
        );
        for mut r in rolled {
            r.finalize(BatchStatus::Delivered);
        }
        assert_eq!(status.await, BatchStatus::Delivered);
    }

    #[tokio::test]
    async fn hopping_windows_hold_one_finalizer_each() {
        let mut a = agg(|c| c.hop = Some(HumanDuration(Duration::from_secs(30))));
        let (fin, status) = ack::batch();
        let mut r = temp(40.0, "d1", 1.0);
        r.finalizers.push(fin);
        run(&mut a, vec![r]);
        let mut out = TransformOutput::default();
        a.flush(&mut out);
        let rolled = take(&mut out, "default");
        assert_eq!(rolled.len(), 2);
        let mut rolled = rolled.into_iter();
        rolled.next().expect("first").discard();
        // Dropping the second window's record without a status must not ack the input.
        drop(rolled);
        assert_eq!(status.await, BatchStatus::Errored);
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let bad = |f: fn(&mut AggregateConfig)| Aggregator::new(&config(f), &cx()).is_err();
        assert!(bad(|c| c.window = None));
        assert!(bad(|c| c.gap = Some(HumanDuration(Duration::from_secs(1)))));
        assert!(bad(
            |c| c.hop = Some(HumanDuration(Duration::from_secs(120)))
        ));
        assert!(bad(|c| c.window = Some(HumanDuration(Duration::ZERO))));
        assert!(bad(|c| c.fields.clear()));
        assert!(bad(|c| c.max_groups = 0));
        let err = Aggregator::new(&config(|c| c.window = None), &cx()).expect_err("no window");
        assert!(err.to_string().contains("`window`"), "{err}");
    }

    #[test]
    fn parses_from_toml() {
        let c: AggregateConfig = toml::from_str(
            r#"
            window = "1m"
            group_by = ["device_id"]
            fields = { temp = ["mean", "p99"] }
            "#,
        )
        .expect("parses");
        assert_eq!(c.allowed_lateness.0, Duration::from_secs(10));
        assert_eq!(c.when_full, WhenFull::FlushOldest);
        assert!(
            toml::from_str::<AggregateConfig>("window = \"1m\"\nfields = {}\ntypo = 1").is_err()
        );
        assert!(
            toml::from_str::<AggregateConfig>("window = \"1m\"\nfields = { t = [\"p42\"] }")
                .is_err()
        );
    }

    #[test]
    fn extreme_timestamps_do_not_overflow() {
        let mut a = agg(|c| c.hop = Some(HumanDuration(Duration::from_secs(20))));
        let mut r1 = temp(0.0, "d1", 1.0);
        r1.time = i64::MIN;
        let mut r2 = temp(0.0, "d1", 1.0);
        r2.time = i64::MAX;
        let mut out = run(&mut a, vec![r1, r2]);
        a.flush(&mut out);
        let all: usize = out.take().iter().map(|(_, v)| v.len()).sum();
        assert!(all >= 2);
    }
}
