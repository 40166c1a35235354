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
//! `allowed_lateness`; a window closes once the watermark reaches its end. With
//! `watermark = "per_group"` each group has its own (its own newest event time), so one device
//! whose clock runs ahead cannot make the others late. A record whose every window is closed
//! goes to the `late` output (never silently dropped). A record stamped more than
//! `max_future_skew` (default 5 min) ahead of the wall clock goes to `dead_letter` instead of
//! moving the watermark. When input (of a group, per group) stops for `idle_timeout` (wall
//! clock), the watermark advances with the wall clock, so the last windows still close.
//!
//! **Acknowledgement guarantee.** An input record's finalizers move into every window it feeds;
//! the source acknowledges an input only after every rollup it contributed to has been
//! delivered downstream (at-least-once). When a window closes, its inputs' finalizers are kept
//! ([`pending`]) until the rollup's outcome is known: if a sink gives up on the rollup
//! (Errored), the same rollup is emitted again (backoff up to 1 min) and the inputs stay
//! unacknowledged until a copy is delivered, rather than being redelivered into a window that
//! has already closed. At most `max_pending_rollups` rollups are kept so; past that the oldest
//! one's inputs take its outcome directly. Records therefore stay unacknowledged for up to one
//! window plus `allowed_lateness` plus the rollup's delivery; size a source's in-flight limit for
//! that. If the process dies, open windows are lost but their inputs were not acknowledged, so
//! they are redelivered and the windows recomputed (a window may then be emitted twice, once
//! partially). Late records leave on `late` with their own finalizers; rejected ones on
//! `dead_letter`.

mod config;
mod pending;
mod progress;
#[cfg(test)]
mod tests;
mod window;

use std::time::Duration;

use lru::LruCache;
use sluice_core::ack::Finalizers;
use sluice_core::record::{intern, Batch, Name, Record, Value};
use sluice_core::registry::BuildContext;
use sluice_core::topology::now_ns;
use sluice_core::transform::{Transform, TransformOutput};
use smallvec::SmallVec;

use self::config::ns;
pub use self::config::{AggFn, AggregateConfig, WatermarkMode, WhenFull};
use self::pending::Pending;
use self::progress::{Progress, Saved};
use self::window::{gap_of, new_window, FieldSpec, Window, Windows};
use crate::event_time::FutureSkew;
use crate::group::{GroupBy, GroupKey};
use crate::Error;

/// The output receiving records that arrive after their windows closed.
pub const LATE: &str = "late";

#[derive(Debug)]
struct Group {
    /// Open windows, in no particular order (a handful at most).
    windows: Vec<Window>,
    /// `watermark = "per_group"`: this group's newest event time and watermark. A group whose
    /// windows all closed is kept (within `max_groups`) so that its watermark is remembered.
    max_event: i64,
    watermark: i64,
    /// `per_group`: whether a record arrived since the last tick, and the wall time of the last
    /// tick that saw one (for `idle_timeout`).
    input_since_tick: bool,
    last_input_wall: Option<i64>,
}

impl Default for Group {
    fn default() -> Self {
        Group {
            windows: Vec::new(),
            max_event: i64::MIN,
            watermark: i64::MIN,
            input_since_tick: true,
            last_input_wall: None,
        }
    }
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
    /// Records sent to `dead_letter` because their event time was beyond `max_future_skew`.
    pub future: u64,
    /// Rollups emitted again because a sink gave up on them (Errored).
    pub reemitted: u64,
    /// Rollups let go at `max_pending_rollups` before their outcome was known.
    pub pending_overflow: u64,
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
    watermark_mode: WatermarkMode,
    skew: FutureSkew,
    groups: LruCache<GroupKey, Group>,
    /// `global`: largest event time seen.
    max_event: i64,
    /// `global`: windows ending at or before this are closed.
    watermark: i64,
    /// `global`: smallest end of an open window: nothing closes before the watermark reaches it.
    next_close: i64,
    /// `global`: whether a record arrived since the last tick, and the wall time of the last
    /// tick that saw one.
    input_since_tick: bool,
    last_input_wall: Option<i64>,
    /// `per_group`: windows closed while processing the current batch.
    closing: Vec<(GroupKey, Window)>,
    /// Emitted rollups awaiting their outcome.
    pending: Pending,
    /// With a state dir: the saved delivered-through watermark(s) ([`progress`]).
    progress: Option<Progress>,
    /// `per_group`: a group's watermark moved since the last save.
    groups_moved: bool,
    /// The input ended for good and every window was flushed.
    flushed: bool,
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
        if config.max_pending_rollups == 0 {
            return Err(Error::option(
                cx,
                "max_pending_rollups",
                "must be at least 1",
            ));
        }
        let (progress, restored) = match &cx.state_dir {
            Some(dir) => {
                let (p, restored) = Progress::open(dir.clone(), &cx.name);
                (Some(p), restored)
            }
            None => (None, None),
        };
        let mut groups = LruCache::unbounded();
        let restored = match (restored, config.watermark) {
            (Some(Saved::Global(w)), WatermarkMode::Global) => {
                tracing::info!(transform = %cx.name, watermark_ns = w, "aggregate: resuming after windows delivered before the restart");
                Some(w)
            }
            (Some(Saved::Groups(saved)), WatermarkMode::PerGroup) => {
                tracing::info!(transform = %cx.name, groups = saved.len(), "aggregate: resuming each group after its windows delivered before the restart");
                for (key, watermark) in saved.into_iter().take(config.max_groups) {
                    let group = Group {
                        watermark,
                        ..Group::default()
                    };
                    groups.put(key, group);
                }
                None
            }
            (Some(_), _) => {
                tracing::warn!(transform = %cx.name, "aggregate: the saved watermark is of the other `watermark` mode; starting afresh");
                None
            }
            (None, _) => None,
        };
        Ok(Aggregator {
            name: cx.name.clone(),
            windows,
            group_by: GroupBy::new(&config.group_by),
            fields,
            lateness: ns(config.allowed_lateness),
            idle_timeout: ns(config.idle_timeout),
            max_groups: config.max_groups,
            when_full: config.when_full,
            watermark_mode: config.watermark,
            skew: FutureSkew::new(config.max_future_skew),
            groups,
            max_event: i64::MIN,
            watermark: restored.unwrap_or(i64::MIN),
            next_close: i64::MAX,
            input_since_tick: false,
            last_input_wall: None,
            closing: Vec::new(),
            pending: Pending::new(config.max_pending_rollups),
            progress,
            groups_moved: false,
            flushed: false,
            stats: Stats::default(),
            names: OutputNames {
                window_start: intern("window_start"),
                window_end: intern("window_end"),
                partial: intern("partial"),
            },
        })
    }

    /// `global`: the event time at or below which every window ends whose rollup is settled:
    /// the watermark, held back by the earliest rollup still awaiting its outcome.
    fn delivered_through(&self) -> i64 {
        match self.pending.min_end(&self.names.window_end) {
            Some(end) => self.watermark.min(end - 1),
            None => self.watermark,
        }
    }

    /// `per_group`: [`Self::delivered_through`] of every group the stage knows.
    fn delivered_through_per_group(&self) -> Vec<(GroupKey, i64)> {
        let mut unsettled: std::collections::HashMap<GroupKey, i64> =
            std::collections::HashMap::new();
        for (rollup, end) in self.pending.ends(&self.names.window_end) {
            if let Ok(key) = self.group_by.key(rollup) {
                let min = unsettled.entry(key).or_insert(end);
                *min = (*min).min(end);
            }
        }
        self.groups
            .iter()
            .filter(|(_, g)| g.watermark != i64::MIN)
            .map(|(key, g)| {
                let through = unsettled
                    .get(key)
                    .map_or(g.watermark, |end| g.watermark.min(end - 1));
                (key.clone(), through)
            })
            .collect()
    }

    /// Saves the delivered-through watermark(s), throttled unless `force`.
    fn save_progress(&mut self, now: i64, force: bool) {
        if self.progress.is_none() {
            return;
        }
        match self.watermark_mode {
            WatermarkMode::Global => {
                let through = self.delivered_through();
                if let Some(p) = &mut self.progress {
                    p.save(through, now, force);
                }
            }
            WatermarkMode::PerGroup => {
                let groups = self.delivered_through_per_group();
                let moved = std::mem::take(&mut self.groups_moved);
                if let Some(p) = &mut self.progress {
                    p.save_groups(&groups, now, moved, force);
                }
            }
        }
    }

    /// What the stage counted so far.
    pub fn stats(&self) -> Stats {
        Stats {
            reemitted: self.pending.reemitted,
            pending_overflow: self.pending.overflowed,
            ..self.stats
        }
    }

    /// Number of groups with open windows.
    pub fn open_groups(&self) -> usize {
        self.groups
            .iter()
            .filter(|(_, g)| !g.windows.is_empty())
            .count()
    }

    /// Number of emitted rollups whose outcome is not settled yet.
    pub fn pending_rollups(&self) -> usize {
        self.pending.len()
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

    fn accept(&mut self, mut r: Record, now: i64, out: &mut TransformOutput) {
        if let Some(why) = self.skew.check(r.time, now) {
            self.stats.future += 1;
            out.dead_letter(r, format!("aggregate `{}`: {why}", self.name));
            return;
        }
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
        let per_group = self.watermark_mode == WatermarkMode::PerGroup;
        let watermark = if per_group {
            self.groups.peek(&key).map_or(i64::MIN, |g| g.watermark)
        } else {
            self.watermark
        };
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
            // A group with no open window (kept for its `per_group` watermark) makes room
            // silently.
            if self
                .groups
                .peek_lru()
                .is_some_and(|(_, g)| g.windows.is_empty())
            {
                self.groups.pop_lru();
            }
        }
        if !self.groups.contains(&key) && self.groups.len() >= self.max_groups {
            match self.when_full {
                WhenFull::FlushOldest => {
                    if let Some((old_key, old)) = self.groups.pop_lru() {
                        self.stats.evicted_groups += 1;
                        for w in old.windows {
                            let (rollup, inputs) = self.rollup(&old_key, w, true);
                            self.pending.emit(rollup, inputs, out);
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
        let lateness = self.lateness;
        let closing_key = per_group.then(|| key.clone());
        let group = self.groups.get_or_insert_mut(key, Group::default);
        group.input_since_tick = true;
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
        if let Some(key) = closing_key {
            self.groups_moved = true;
            group.max_event = group.max_event.max(t);
            group.watermark = group
                .watermark
                .max(group.max_event.saturating_sub(lateness));
            close_group(&key, group, &mut self.closing);
            return;
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

    /// `global`: emits every window whose end the watermark reached.
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

    /// `global`: when no input arrived for `idle_timeout`, event time follows the wall clock.
    fn advance_idle_global(&mut self, now: i64, out: &mut TransformOutput) {
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
        self.watermark = self.watermark.max(
            self.max_event
                .saturating_add(idle)
                .saturating_sub(self.lateness),
        );
        self.close_ready(out);
    }

    /// `per_group`: the same, for each group that received nothing for `idle_timeout`.
    fn advance_idle_per_group(&mut self, now: i64, out: &mut TransformOutput) {
        let (idle_timeout, lateness) = (self.idle_timeout, self.lateness);
        let mut closed = Vec::new();
        let mut moved = false;
        for (key, group) in self.groups.iter_mut() {
            if group.input_since_tick || group.last_input_wall.is_none() {
                group.input_since_tick = false;
                group.last_input_wall = Some(now);
                continue;
            }
            let idle = group
                .last_input_wall
                .map_or(0, |last| now.saturating_sub(last));
            if idle < idle_timeout || group.windows.is_empty() || group.max_event == i64::MIN {
                continue;
            }
            group.watermark = group.watermark.max(
                group
                    .max_event
                    .saturating_add(idle)
                    .saturating_sub(lateness),
            );
            close_group(key, group, &mut closed);
            moved = true;
        }
        self.groups_moved |= moved;
        self.emit_sorted(closed, false, out);
    }

    fn emit_sorted(
        &mut self,
        mut closed: Vec<(GroupKey, Window)>,
        partial: bool,
        out: &mut TransformOutput,
    ) {
        // Deterministic output: by window, then group.
        closed.sort_by(|(ka, a), (kb, b)| (a.end, a.start, ka).cmp(&(b.end, b.start, kb)));
        for (key, w) in closed {
            let (rollup, inputs) = self.rollup(&key, w, partial);
            self.pending.emit(rollup, inputs, out);
        }
    }

    /// The output record of window `w` of group `key`, and the finalizers of its inputs.
    fn rollup(&self, key: &GroupKey, w: Window, partial: bool) -> (Record, Finalizers) {
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
        (r, w.finalizers)
    }
}

/// `per_group`: moves the windows of `group` that its own watermark passed into `closed`.
fn close_group(key: &GroupKey, group: &mut Group, closed: &mut Vec<(GroupKey, Window)>) {
    let mut i = 0;
    while i < group.windows.len() {
        if group.windows[i].end <= group.watermark {
            closed.push((key.clone(), group.windows.swap_remove(i)));
        } else {
            i += 1;
        }
    }
}

impl Transform for Aggregator {
    fn process(&mut self, batch: Batch, out: &mut TransformOutput) {
        if !batch.is_empty() {
            self.input_since_tick = true;
        }
        let now = now_ns();
        for r in batch.records {
            self.accept(r, now, out);
        }
        match self.watermark_mode {
            WatermarkMode::Global => self.close_ready(out),
            WatermarkMode::PerGroup => {
                let closed = std::mem::take(&mut self.closing);
                self.emit_sorted(closed, false, out);
            }
        }
    }

    fn tick_interval(&self) -> Option<Duration> {
        let half = Duration::from_nanos(u64::try_from(self.idle_timeout / 2).unwrap_or(0));
        Some(half.clamp(Duration::from_millis(10), Duration::from_secs(1)))
    }

    fn on_tick(&mut self, now: i64, out: &mut TransformOutput) {
        let unsettled = self.pending.len();
        self.pending.poll(now, out);
        // Rollups settled since the last tick move the saved position too.
        self.groups_moved |= self.pending.len() != unsettled;
        match self.watermark_mode {
            WatermarkMode::Global => self.advance_idle_global(now, out),
            WatermarkMode::PerGroup => self.advance_idle_per_group(now, out),
        }
        self.save_progress(now, false);
    }

    fn save_state(&mut self) {
        if self.flushed {
            if let Some(p) = &mut self.progress {
                p.clear();
            }
        } else {
            self.save_progress(now_ns(), true);
        }
    }

    fn flush(&mut self, out: &mut TransformOutput) {
        self.flushed = true;
        let mut open = Vec::new();
        while let Some((key, group)) = self.groups.pop_lru() {
            for w in group.windows {
                open.push((key.clone(), w));
            }
        }
        self.next_close = i64::MAX;
        self.emit_sorted(open, true, out);
        // Rollups still in flight: their inputs take their outcome from here on.
        self.pending.release_all(out);
        let s = self.stats();
        tracing::info!(
            transform = %self.name,
            late = s.late,
            evicted_groups = s.evicted_groups,
            refused_full = s.refused_full,
            invalid = s.invalid,
            future = s.future,
            reemitted = s.reemitted,
            pending_overflow = s.pending_overflow,
            "aggregate flushed open windows"
        );
    }
}
