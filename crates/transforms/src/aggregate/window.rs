//! The state of one window: per-field running statistics (Welford moments, first/last by event
//! time, a DDSketch for quantiles) and the finalizers of the inputs it absorbed.

use sketches_ddsketch::{Config as SketchConfig, DDSketch};
use sluice_core::ack::Finalizers;
use sluice_core::record::{Name, Value};

use super::config::AggFn;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Windows {
    Tumbling { size: i64 },
    Hopping { size: i64, hop: i64 },
    Session { gap: i64 },
}

#[derive(Debug)]
pub(super) struct FieldSpec {
    pub(super) name: Name,
    /// (function, output field name), e.g. (Mean, "temp_mean").
    pub(super) outputs: Vec<(AggFn, Name)>,
    pub(super) sketch: bool,
}

/// Running statistics of one field in one window.
#[derive(Clone)]
pub(super) struct FieldAgg {
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
    pub(super) fn new(sketch: bool) -> Self {
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

    pub(super) fn add(&mut self, time: i64, v: f64) {
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
    pub(super) fn merge(&mut self, other: &FieldAgg) {
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

    pub(super) fn value(&self, f: AggFn) -> Value {
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
pub(super) struct Window {
    pub(super) start: i64,
    pub(super) end: i64,
    pub(super) aggs: Vec<FieldAgg>,
    pub(super) finalizers: Finalizers,
}

pub(super) fn new_window(fields: &[FieldSpec], start: i64, end: i64) -> Window {
    Window {
        start,
        end,
        aggs: fields.iter().map(|f| FieldAgg::new(f.sketch)).collect(),
        finalizers: Finalizers::new(),
    }
}

pub(super) fn gap_of(w: Windows) -> i64 {
    match w {
        Windows::Session { gap } => gap,
        _ => 0,
    }
}
