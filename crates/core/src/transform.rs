//! The `Transform` trait: per-batch processing with named outputs and a timer.
//!
//! A transform is synchronous: the runtime hands it one batch at a time and sends whatever it
//! pushed into [`TransformOutput`] downstream, waiting for room (backpressure). Time-driven
//! stages (window close, missing heartbeat) return a [`Transform::tick_interval`] and emit from
//! [`Transform::on_tick`] without new input. On shutdown [`Transform::flush`] is called once
//! after the input has drained.
//!
//! Records a transform drops on purpose (a filter) must say so with
//! [`Record::discard`](crate::record::Record::discard), which counts them as delivered; a record
//! that merely goes out of scope counts as `Errored` and its source redelivers it. Records it
//! cannot handle go to the `dead_letter` output ([`TransformOutput::dead_letter`]) with the
//! reason in [`Record::meta`](crate::record::Record::meta)`.error`.
//!
//! ```
//! use sluice_core::record::{Batch, Value};
//! use sluice_core::transform::{Transform, TransformOutput};
//!
//! /// Converts `temp` from Celsius to Fahrenheit; records without it go to `dead_letter`.
//! struct ToFahrenheit;
//!
//! impl Transform for ToFahrenheit {
//!     fn process(&mut self, batch: Batch, out: &mut TransformOutput) {
//!         for mut r in batch.records {
//!             match r.field("temp").and_then(Value::as_f64) {
//!                 Some(c) => {
//!                     r.set_field("temp", Value::F64(c * 9.0 / 5.0 + 32.0));
//!                     out.push(r);
//!                 }
//!                 None => out.dead_letter(r, "field `temp` missing or not numeric"),
//!             }
//!         }
//!     }
//! }
//!
//! let mut t = ToFahrenheit;
//! let mut out = TransformOutput::default();
//! let mut r = sluice_core::record::Record::new(0);
//! r.set_field("temp", Value::F64(100.0));
//! t.process(Batch::new(vec![r, sluice_core::record::Record::new(1)]), &mut out);
//! let outputs = out.take();
//! assert_eq!(outputs[0].0, "default");
//! assert_eq!(outputs[0].1[0].field("temp"), Some(&Value::F64(212.0)));
//! assert_eq!(outputs[1].0, "dead_letter");
//! ```

use std::sync::Arc;
use std::time::Duration;

use crate::channel::{DEAD_LETTER, DEFAULT_OUTPUT};
use crate::record::{Batch, Record};

/// A per-batch processing stage. See the [module docs](self).
pub trait Transform: Send {
    /// Processes one batch, pushing results into `out`.
    fn process(&mut self, batch: Batch, out: &mut TransformOutput);

    /// How often [`on_tick`](Self::on_tick) should run; `None` (default) for never.
    fn tick_interval(&self) -> Option<Duration> {
        None
    }

    /// Called every `tick_interval` with the wall-clock time (ns since epoch), even when no
    /// input arrives.
    fn on_tick(&mut self, _now: i64, _out: &mut TransformOutput) {}

    /// Called once at shutdown, after the input drained: emit whatever state is still held.
    /// Not called when the input was abandoned at shutdown by a disk buffer upstream (open
    /// state is then rebuilt by replay at the next start).
    fn flush(&mut self, _out: &mut TransformOutput) {}

    /// Called last, at every orderly end (after `flush`, or instead of it when the input was
    /// abandoned): persist long-lived state (baselines, last-seen tables) to the component's
    /// `state_dir`. Default: nothing.
    fn save_state(&mut self) {}
}

/// Records produced by one call of a transform, per output name.
#[derive(Debug, Default)]
pub struct TransformOutput {
    outputs: Vec<(String, Vec<Record>)>,
}

impl TransformOutput {
    /// Emits to the default output.
    pub fn push(&mut self, record: Record) {
        self.push_to(DEFAULT_OUTPUT, record);
    }

    /// Emits to a named output (`late`, `anomalies`, a route name, …).
    pub fn push_to(&mut self, output: &str, record: Record) {
        match self.outputs.iter_mut().find(|(n, _)| n == output) {
            Some((_, v)) => v.push(record),
            None => self.outputs.push((output.to_string(), vec![record])),
        }
    }

    /// Sends `record` to the `dead_letter` output with `reason` attached.
    pub fn dead_letter(&mut self, mut record: Record, reason: impl Into<Arc<str>>) {
        record.meta.error = Some(reason.into());
        self.push_to(DEAD_LETTER, record);
    }

    /// Whether nothing was emitted.
    pub fn is_empty(&self) -> bool {
        self.outputs.iter().all(|(_, v)| v.is_empty())
    }

    /// Takes the emitted records, in the order outputs were first used.
    pub fn take(&mut self) -> Vec<(String, Vec<Record>)> {
        std::mem::take(&mut self.outputs)
    }
}
