//! Rollups emitted but not yet confirmed, kept with their inputs' acknowledgements.
//!
//! A rollup stands for many inputs whose window has closed. If a sink gives up on it (Errored)
//! and the inputs were Errored with it, their redeliveries would find the window closed and
//! leave on `late`: the window would be lost. So the inputs' finalizers stay here, the rollup
//! carries a [watched](ack::watched) finalizer of its own, and an Errored rollup is emitted
//! again (with a capped backoff) until a copy is delivered; only then are the inputs finished.

use std::collections::VecDeque;

use sluice_core::ack::{self, BatchStatus, Finalizers, Watch};
use sluice_core::record::Record;
use sluice_core::transform::TransformOutput;

/// Longest wait between two emissions of a rollup that keeps failing.
const MAX_BACKOFF: i64 = 60_000_000_000;
const SECOND: i64 = 1_000_000_000;

/// The unconfirmed rollups, oldest first, at most `max` of them.
#[derive(Debug)]
pub(super) struct Pending {
    entries: VecDeque<Entry>,
    max: usize,
    /// Emissions of a rollup after an Errored outcome.
    pub(super) reemitted: u64,
    /// Rollups let go at `max_pending_rollups` before their outcome was known.
    pub(super) overflowed: u64,
}

#[derive(Debug)]
struct Entry {
    /// The rollup as first emitted, without finalizers.
    rollup: Record,
    /// The finalizers of every input the rollup stands for.
    inputs: Finalizers,
    /// Outcome of the copy in flight.
    outcome: Watch,
    /// Copies emitted so far.
    emissions: u32,
    /// Wall time (ns) at which an Errored rollup is emitted again.
    retry_at: Option<i64>,
}

impl Pending {
    pub(super) fn new(max: usize) -> Self {
        Pending {
            entries: VecDeque::new(),
            max,
            reemitted: 0,
            overflowed: 0,
        }
    }

    /// Rollups whose outcome is not settled yet.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The earliest `window_end` (field `end_name`) of a rollup not settled yet.
    pub(super) fn min_end(&self, end_name: &str) -> Option<i64> {
        self.entries
            .iter()
            .filter_map(|e| match e.rollup.field(end_name) {
                Some(sluice_core::Value::I64(end)) => Some(*end),
                _ => None,
            })
            .min()
    }

    /// Each unsettled rollup with its `window_end` (field `end_name`).
    pub(super) fn ends<'a>(
        &'a self,
        end_name: &'a str,
    ) -> impl Iterator<Item = (&'a Record, i64)> + 'a {
        self.entries
            .iter()
            .filter_map(move |e| match e.rollup.field(end_name) {
                Some(sluice_core::Value::I64(end)) => Some((&e.rollup, *end)),
                _ => None,
            })
    }

    /// Emits `rollup`, which stands for `inputs`, and keeps both until its outcome is known.
    pub(super) fn emit(&mut self, rollup: Record, inputs: Finalizers, out: &mut TransformOutput) {
        if inputs.is_empty() {
            // Nothing to acknowledge (the source does not): nothing to protect.
            out.push(rollup);
            return;
        }
        let outcome = send(&rollup, out);
        self.entries.push_back(Entry {
            rollup,
            inputs,
            outcome,
            emissions: 1,
            retry_at: None,
        });
        while self.entries.len() > self.max {
            if let Some(oldest) = self.entries.pop_front() {
                self.overflowed += 1;
                oldest.release(out);
            }
        }
    }

    /// Settles the rollups whose outcome is known at wall time `now` (ns): a delivered (or
    /// dead-lettered) one finishes its inputs with that status; an Errored one is emitted again
    /// once its backoff (none the first time, then 1 s doubling up to 60 s) has passed.
    pub(super) fn poll(&mut self, now: i64, out: &mut TransformOutput) {
        let mut reemitted = 0u64;
        self.entries.retain_mut(|e| match e.outcome.status() {
            None => true,
            Some(BatchStatus::Errored) => {
                let due = *e
                    .retry_at
                    .get_or_insert_with(|| now.saturating_add(backoff(e.emissions)));
                if now >= due {
                    e.outcome = send(&e.rollup, out);
                    e.emissions = e.emissions.saturating_add(1);
                    e.retry_at = None;
                    reemitted += 1;
                }
                true
            }
            Some(status) => {
                std::mem::take(&mut e.inputs).finish(status);
                false
            }
        });
        if reemitted > 0 {
            self.reemitted += reemitted;
            tracing::warn!(
                rollups = reemitted,
                "aggregate: a sink gave up on rollups (Errored); emitting them again, their \
                 inputs stay unacknowledged until a copy is delivered"
            );
        }
    }

    /// Lets every rollup go (shutdown): the inputs of a rollup in flight take its outcome; an
    /// Errored rollup is emitted a last time carrying its inputs' finalizers itself.
    pub(super) fn release_all(&mut self, out: &mut TransformOutput) {
        for e in self.entries.drain(..) {
            e.release(out);
        }
    }
}

impl Drop for Pending {
    /// Dropped without [`Pending::release_all`] (the task was aborted): inputs of rollups in
    /// flight still take their outcome; those of Errored rollups are dropped, so their sources
    /// redeliver them.
    fn drop(&mut self) {
        for e in self.entries.drain(..) {
            e.outcome.follow(e.inputs);
        }
    }
}

impl Entry {
    fn release(self, out: &mut TransformOutput) {
        match self.outcome.status() {
            None => self.outcome.follow(self.inputs),
            Some(BatchStatus::Errored) => {
                let mut last = self.rollup;
                last.finalizers = self.inputs;
                out.push(last);
            }
            Some(status) => self.inputs.finish(status),
        }
    }
}

/// Pushes a copy of `rollup` carrying a watched finalizer; returns the watch.
fn send(rollup: &Record, out: &mut TransformOutput) -> Watch {
    let (finalizer, outcome) = ack::watched();
    let mut copy = rollup.clone();
    copy.finalizers = Finalizers::one(finalizer);
    out.push(copy);
    outcome
}

/// Wait before emitting again a rollup whose `emissions`-th copy came back Errored.
fn backoff(emissions: u32) -> i64 {
    match emissions {
        0 | 1 => 0,
        n => SECOND
            .saturating_mul(1i64 << (n - 2).min(16))
            .min(MAX_BACKOFF),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_immediate_then_doubles_up_to_a_minute() {
        let waits: Vec<i64> = (1..=9).map(|n| backoff(n) / SECOND).collect();
        assert_eq!(waits, vec![0, 1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
