//! End-to-end acknowledgements: how a source learns that its records are safe.
//!
//! A source that can acknowledge creates one [`Finalizer`] per batch it reads with [`batch`],
//! attaches a clone to every record, and keeps the [`StatusReceiver`]. Every copy of a record
//! (fan-out clones it) holds a clone of the finalizer; each sink reports the record's fate with
//! [`Finalizer::finish`]. When the last clone is gone the receiver resolves with the **worst**
//! status any holder reported (a holder dropped without reporting counts as `Errored`):
//!
//! * [`BatchStatus::Delivered`]: every sink durably wrote it, or it was dropped on purpose
//!   (a filter discarding a record finishes it as delivered);
//! * [`BatchStatus::Rejected`]: some sink refused it permanently; it went to a dead-letter output;
//!   the source acknowledges it (redelivery would be refused again);
//! * [`BatchStatus::Errored`]: some sink failed transiently; the source must **not** acknowledge,
//!   so that the message is delivered again (at-least-once).
//!
//! ```
//! use sluice_core::ack::{self, BatchStatus};
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let (finalizer, status) = ack::batch();
//! let to_sink_a = finalizer.clone();
//! let to_sink_b = finalizer;
//! to_sink_a.finish(BatchStatus::Delivered);
//! to_sink_b.finish(BatchStatus::Delivered);
//! assert_eq!(status.await, BatchStatus::Delivered);
//! # });
//! ```
//!
//! A component that must know how *one* record fared (not its whole source batch) attaches a
//! [`watched`] finalizer to it: the [`Watch`] tells the final status of that record's copies,
//! and can hand other records' finalizers the same outcome ([`Watch::follow`]), which is how
//! `dedupe` makes a duplicate share the fate of its still-pending original.
//!
//! Protocols that need acknowledgements in source order (MQTT PUBACKs, Kafka offset commits) put
//! their pending batches in an [`Ordered`] queue, which releases them only as a contiguous prefix.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use smallvec::SmallVec;
use tokio::sync::oneshot;

/// The final status of a record (or batch) across every sink it reached. Ordered from best to
/// worst: combining two statuses keeps the worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum BatchStatus {
    /// Durably written (or deliberately dropped).
    Delivered = 0,
    /// Permanently refused and dead-lettered; acknowledge it.
    Rejected = 1,
    /// Transient failure; do not acknowledge, let the source redeliver.
    Errored = 2,
}

impl BatchStatus {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => BatchStatus::Delivered,
            1 => BatchStatus::Rejected,
            _ => BatchStatus::Errored,
        }
    }

    /// Whether the source may acknowledge the message (everything but `Errored`).
    pub fn is_ackable(self) -> bool {
        self != BatchStatus::Errored
    }
}

struct Shared {
    status: AtomicU8,
    notify: Notify,
}

/// Who learns the final status when the last holder is gone.
enum Notify {
    /// A source batch's [`StatusReceiver`].
    Source(oneshot::Sender<BatchStatus>),
    /// A [`Watch`] (and the finalizers following it).
    Watch(Arc<WatchState>),
    /// Entry `id` of a [`Tracker`].
    Tracked(Arc<Tracker>, u64),
    /// Already told.
    Done,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let status = BatchStatus::from_u8(*self.status.get_mut());
        match std::mem::replace(&mut self.notify, Notify::Done) {
            Notify::Source(tx) => {
                // The source may have gone away (shutdown deadline); then nobody needs the answer.
                let _ = tx.send(status);
            }
            Notify::Watch(w) => w.resolve(status),
            Notify::Tracked(t, id) => t.resolve(id, status),
            Notify::Done => {}
        }
    }
}

/// One holder's handle on the fate of a source batch. Cloning makes a new holder (one
/// reference count); each holder reports once with [`Finalizer::finish`].
///
/// A holder dropped **without** a status counts as [`BatchStatus::Errored`]: a record that
/// vanishes because a component failed, panicked or was aborted at the shutdown deadline is
/// redelivered, never acknowledged. Records dropped on purpose say so
/// ([`Record::discard`](crate::record::Record::discard)).
pub struct Finalizer {
    shared: Arc<Shared>,
    done: bool,
}

impl Clone for Finalizer {
    fn clone(&self) -> Self {
        Finalizer {
            shared: self.shared.clone(),
            done: false,
        }
    }
}

impl Drop for Finalizer {
    fn drop(&mut self) {
        if !self.done {
            self.shared
                .status
                .fetch_max(BatchStatus::Errored as u8, Ordering::AcqRel);
        }
    }
}

impl std::fmt::Debug for Finalizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Finalizer")
            .field(
                "status",
                &BatchStatus::from_u8(self.shared.status.load(Ordering::Relaxed)),
            )
            .field("done", &self.done)
            .finish()
    }
}

impl Finalizer {
    /// Records `status` without releasing the handle (e.g. `Rejected` before the record goes
    /// to a dead-letter output, where another holder finishes it). The worst status wins.
    pub fn mark(&self, status: BatchStatus) {
        self.shared.status.fetch_max(status as u8, Ordering::AcqRel);
    }

    /// Reports this holder's final `status` and releases it.
    pub fn finish(mut self, status: BatchStatus) {
        self.mark(status);
        self.done = true;
    }
}

/// The finalizers a record carries: usually one (its source batch), several when a record
/// stands for many inputs (an aggregation's output), none when its source does not ack.
#[derive(Debug, Clone, Default)]
pub struct Finalizers(SmallVec<[Finalizer; 1]>);

impl Finalizers {
    pub fn new() -> Self {
        Finalizers(SmallVec::new())
    }

    /// Finalizers holding just `f`.
    pub fn one(f: Finalizer) -> Self {
        let mut v = SmallVec::new();
        v.push(f);
        Finalizers(v)
    }

    /// Adds a holder. A holder of the same source batch as the last one added is folded into
    /// it (the one kept reports for both), so a sink or window holding a million records of a
    /// few hundred batches keeps a few hundred finalizers, not a million.
    pub fn push(&mut self, mut f: Finalizer) {
        if let Some(last) = self.0.last() {
            if Arc::ptr_eq(&last.shared, &f.shared) {
                f.done = true; // represented by `last`, which will report the status
                return;
            }
        }
        self.0.push(f);
    }

    /// Moves every finalizer of `other` into `self` (folding same-batch neighbours).
    pub fn merge(&mut self, other: Finalizers) {
        for f in other.0 {
            self.push(f);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// See [`Finalizer::mark`].
    pub fn mark(&self, status: BatchStatus) {
        for f in &self.0 {
            f.mark(status);
        }
    }

    /// See [`Finalizer::finish`].
    pub fn finish(self, status: BatchStatus) {
        for f in self.0 {
            f.finish(status);
        }
    }
}

/// Creates the finalizer for a new source batch and the receiver of its final status.
pub fn batch() -> (Finalizer, StatusReceiver) {
    let (tx, rx) = oneshot::channel();
    (Finalizer::new(Notify::Source(tx)), StatusReceiver(rx))
}

impl Finalizer {
    fn new(notify: Notify) -> Self {
        Finalizer {
            shared: Arc::new(Shared {
                status: AtomicU8::new(BatchStatus::Delivered as u8),
                notify,
            }),
            done: false,
        }
    }
}

/// Creates a finalizer that tracks one record rather than a source batch, and the [`Watch`]
/// that observes it.
///
/// Add the finalizer to the record's [`Finalizers`]: it resolves, like any other, with the
/// worst status of the record's copies once every sink finished them. Unlike a
/// [`StatusReceiver`], the watch is not awaited: it is polled ([`Watch::status`]) by a
/// component that keeps per-record state, and it can pass the outcome on to other records
/// ([`Watch::follow`]) without a task waiting for it. Holding the watch does not keep the
/// record (or its source batch) open.
///
/// ```
/// use sluice_core::ack::{self, BatchStatus, Finalizers};
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let (original, watch) = ack::watched();
/// let (duplicate, duplicate_status) = ack::batch();
/// watch.follow(Finalizers::one(duplicate)); // the duplicate takes the original's outcome
/// assert_eq!(watch.status(), None);
/// original.finish(BatchStatus::Errored);
/// assert_eq!(watch.status(), Some(BatchStatus::Errored));
/// assert_eq!(duplicate_status.await, BatchStatus::Errored);
/// # });
/// ```
pub fn watched() -> (Finalizer, Watch) {
    let state = Arc::new(WatchState(Mutex::new(WatchInner::Pending(Vec::new()))));
    (Finalizer::new(Notify::Watch(state.clone())), Watch(state))
}

/// Observes the final status of a [`watched`] finalizer. Cheap to keep (one shared
/// allocation) and does not hold the watched record open.
#[derive(Debug, Clone)]
pub struct Watch(Arc<WatchState>);

#[derive(Debug)]
struct WatchState(Mutex<WatchInner>);

#[derive(Debug)]
enum WatchInner {
    /// Still in flight; these finalizers get its final status.
    Pending(Vec<Finalizers>),
    Resolved(BatchStatus),
}

impl WatchState {
    fn lock(&self) -> std::sync::MutexGuard<'_, WatchInner> {
        // A poisoned lock only means a holder panicked between two plain assignments; the
        // state is still one of the two variants and valid.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn resolve(&self, status: BatchStatus) {
        let followers = match std::mem::replace(&mut *self.lock(), WatchInner::Resolved(status)) {
            WatchInner::Pending(f) => f,
            WatchInner::Resolved(_) => Vec::new(),
        };
        // Finished outside the lock: finishing may resolve other batches or watches.
        for f in followers {
            f.finish(status);
        }
    }
}

impl Watch {
    /// The final status, once every copy of the watched record is finalized; `None` while
    /// it is in flight.
    pub fn status(&self) -> Option<BatchStatus> {
        match &*self.0.lock() {
            WatchInner::Pending(_) => None,
            WatchInner::Resolved(s) => Some(*s),
        }
    }

    /// Finishes `finalizers` with the watched record's final status: now if it is known,
    /// else when it resolves. They are held until then, so their sources do not acknowledge
    /// (or give up on) them before the watched record's fate is known.
    pub fn follow(&self, finalizers: Finalizers) {
        let mut inner = self.0.lock();
        match &mut *inner {
            WatchInner::Pending(followers) => followers.push(finalizers),
            WatchInner::Resolved(s) => {
                let s = *s;
                drop(inner);
                finalizers.finish(s);
            }
        }
    }
}

/// Collects the final statuses of many finalizers by number, for a component that keeps
/// thousands of units in flight without a task or channel per unit (the disk buffer).
///
/// ```
/// use sluice_core::ack::{BatchStatus, Tracker};
/// let tracker = Tracker::new(|| {});
/// let f = tracker.finalizer(7);
/// assert!(tracker.take_resolved().is_empty());
/// f.finish(BatchStatus::Delivered);
/// assert_eq!(tracker.take_resolved(), vec![(7, BatchStatus::Delivered)]);
/// ```
pub struct Tracker {
    resolved: Mutex<Vec<(u64, BatchStatus)>>,
    wake: Box<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker").finish_non_exhaustive()
    }
}

impl Tracker {
    /// A tracker that calls `wake` each time an entry resolves.
    pub fn new(wake: impl Fn() + Send + Sync + 'static) -> Arc<Tracker> {
        Arc::new(Tracker {
            resolved: Mutex::new(Vec::new()),
            wake: Box::new(wake),
        })
    }

    /// A finalizer whose final status is reported as entry `id`.
    pub fn finalizer(self: &Arc<Self>, id: u64) -> Finalizer {
        Finalizer::new(Notify::Tracked(self.clone(), id))
    }

    /// The entries resolved since the last call, in resolution order.
    pub fn take_resolved(&self) -> Vec<(u64, BatchStatus)> {
        std::mem::take(&mut *self.resolved.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn resolve(&self, id: u64, status: BatchStatus) {
        self.resolved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((id, status));
        (self.wake)();
    }
}

/// Resolves with the batch's final status once every copy of every record is finalized.
#[derive(Debug)]
pub struct StatusReceiver(oneshot::Receiver<BatchStatus>);

impl StatusReceiver {
    /// The status if it is already final, without waiting.
    pub fn try_status(&mut self) -> Option<BatchStatus> {
        match self.0.try_recv() {
            Ok(s) => Some(s),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(BatchStatus::Errored),
        }
    }
}

impl Future for StatusReceiver {
    type Output = BatchStatus;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<BatchStatus> {
        // A closed channel cannot happen (the sender sends on drop); treat it as not delivered.
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(BatchStatus::Errored))
    }
}

/// Releases completions in the order items were registered.
///
/// MQTT requires PUBACKs in the order the PUBLISHes arrived; Kafka may only commit the offset
/// below which *every* record is delivered. Both push one entry per pending batch, complete
/// entries in any order, and take from [`Ordered::pop_ready`] only the contiguous finished prefix.
///
/// ```
/// use sluice_core::ack::{Ordered, BatchStatus};
/// let mut q = Ordered::new();
/// let a = q.push("offsets 0..10");
/// let b = q.push("offsets 10..20");
/// q.complete(b, BatchStatus::Delivered);
/// assert!(q.pop_ready().is_none()); // `a` still pending: nothing may be committed
/// q.complete(a, BatchStatus::Delivered);
/// assert_eq!(q.pop_ready(), Some(("offsets 0..10", BatchStatus::Delivered)));
/// assert_eq!(q.pop_ready(), Some(("offsets 10..20", BatchStatus::Delivered)));
/// ```
#[derive(Debug)]
pub struct Ordered<T> {
    first_seq: u64,
    entries: VecDeque<(T, Option<BatchStatus>)>,
}

impl<T> Default for Ordered<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Ordered<T> {
    pub fn new() -> Self {
        Ordered {
            first_seq: 0,
            entries: VecDeque::new(),
        }
    }

    /// Registers a pending item; returns its sequence number for [`Ordered::complete`].
    pub fn push(&mut self, item: T) -> u64 {
        self.entries.push_back((item, None));
        self.first_seq + self.entries.len() as u64 - 1
    }

    /// Marks item `seq` finished with `status`. Unknown or already released sequences are
    /// ignored.
    pub fn complete(&mut self, seq: u64, status: BatchStatus) {
        if let Some(idx) = seq.checked_sub(self.first_seq) {
            if let Some(slot) = self.entries.get_mut(idx as usize) {
                slot.1 = Some(status);
            }
        }
    }

    /// Takes the oldest item if it is finished.
    pub fn pop_ready(&mut self) -> Option<(T, BatchStatus)> {
        match self.entries.front() {
            Some((_, Some(_))) => {
                let (item, status) = self.entries.pop_front()?;
                self.first_seq += 1;
                status.map(|s| (item, s))
            }
            _ => None,
        }
    }

    /// Number of items registered and not yet released.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The commit watermark of one ordered stream of offsets (a Kafka partition).
///
/// Ranges of offsets are registered in read order; [`Watermark::complete`] may arrive in any
/// order. [`Watermark::committable`] is the next offset to commit: every offset below it was
/// delivered (or rejected and dead-lettered). An `Errored` range blocks the watermark: nothing at
/// or past it is committed, so a restart reads it again.
#[derive(Debug)]
pub struct Watermark {
    queue: Ordered<i64>,
    committable: i64,
    blocked: bool,
}

impl Watermark {
    /// A watermark starting at `start` (the first offset that will be read).
    pub fn new(start: i64) -> Self {
        Watermark {
            queue: Ordered::new(),
            committable: start,
            blocked: false,
        }
    }

    /// Registers the range of offsets ending at `end` (exclusive), in read order.
    pub fn push(&mut self, end: i64) -> u64 {
        self.queue.push(end)
    }

    /// Reports the final status of range `seq`; returns the new committable offset if it moved.
    pub fn complete(&mut self, seq: u64, status: BatchStatus) -> Option<i64> {
        self.queue.complete(seq, status);
        let before = self.committable;
        while !self.blocked {
            match self.queue.pop_ready() {
                Some((end, s)) if s.is_ackable() => self.committable = end,
                Some(_) => self.blocked = true,
                None => break,
            }
        }
        (self.committable != before).then_some(self.committable)
    }

    /// The offset to commit: all below it are done.
    pub fn committable(&self) -> i64 {
        self.committable
    }

    /// Whether an errored range stopped the watermark (the stream must be re-read from here).
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Ranges still pending.
    pub fn pending(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fan_out_acks_once_after_both_sinks() {
        let (f, mut rx) = batch();
        let sink_a = f.clone();
        let sink_b = f;
        sink_a.finish(BatchStatus::Delivered);
        assert_eq!(rx.try_status(), None, "must wait for the second sink");
        sink_b.finish(BatchStatus::Delivered);
        assert_eq!(rx.await, BatchStatus::Delivered);
    }

    #[tokio::test]
    async fn one_sink_erroring_blocks_the_ack() {
        let (f, rx) = batch();
        let sink_a = f.clone();
        f.finish(BatchStatus::Errored);
        sink_a.finish(BatchStatus::Delivered);
        let status = rx.await;
        assert_eq!(status, BatchStatus::Errored);
        assert!(!status.is_ackable());
    }

    #[tokio::test]
    async fn rejected_is_final_and_ackable() {
        let (f, rx) = batch();
        f.mark(BatchStatus::Rejected);
        f.finish(BatchStatus::Delivered); // a later, better status does not hide the rejection
        let status = rx.await;
        assert_eq!(status, BatchStatus::Rejected);
        assert!(status.is_ackable());
    }

    #[tokio::test]
    async fn deliberately_dropped_record_acks() {
        let (f, rx) = batch();
        let mut r = crate::record::Record::new(0);
        r.finalizers = Finalizers::one(f);
        r.discard(); // a filter dropped it on purpose
        assert_eq!(rx.await, BatchStatus::Delivered);
    }

    #[tokio::test]
    async fn record_lost_by_a_failing_component_is_not_acked() {
        let (f, rx) = batch();
        let keep = f.clone();
        drop(f); // a sink task died holding it
        keep.finish(BatchStatus::Delivered);
        assert_eq!(rx.await, BatchStatus::Errored);
    }

    #[tokio::test]
    async fn aggregate_output_carries_many_finalizers() {
        let (fa, ra) = batch();
        let (fb, rb) = batch();
        let mut set = Finalizers::one(fa);
        set.merge(Finalizers::one(fb));
        assert_eq!(set.len(), 2);
        set.finish(BatchStatus::Delivered);
        assert_eq!(ra.await, BatchStatus::Delivered);
        assert_eq!(rb.await, BatchStatus::Delivered);
    }

    #[tokio::test]
    async fn same_batch_holders_fold_but_still_report() {
        let (fa, ra) = batch();
        let (fb, rb) = batch();
        let mut set = Finalizers::new();
        for _ in 0..1000 {
            set.merge(Finalizers::one(fa.clone()));
        }
        set.push(fb.clone());
        set.push(fa.clone());
        assert_eq!(
            set.len(),
            3,
            "consecutive holders of one batch fold into one"
        );
        drop((fa, fb));
        assert_eq!(set.len(), 3);
        set.mark(BatchStatus::Rejected);
        set.finish(BatchStatus::Delivered);
        assert_eq!(
            ra.await,
            BatchStatus::Errored,
            "fa's original holder was dropped unfinished"
        );
        assert_eq!(
            rb.await,
            BatchStatus::Errored,
            "fb's original holder was dropped unfinished"
        );
    }

    #[tokio::test]
    async fn folded_holders_report_the_kept_status() {
        let (f, rx) = batch();
        let mut set = Finalizers::one(f.clone());
        set.push(f.clone());
        f.finish(BatchStatus::Delivered);
        set.finish(BatchStatus::Rejected);
        assert_eq!(rx.await, BatchStatus::Rejected);
    }

    #[tokio::test]
    async fn watch_reports_the_record_outcome_and_passes_it_on() {
        let (f, watch) = watched();
        let copy = f.clone(); // fan-out to a second sink
        let (dup, dup_status) = batch();
        watch.follow(Finalizers::one(dup));
        f.finish(BatchStatus::Delivered);
        assert_eq!(watch.status(), None, "one copy is still in flight");
        copy.finish(BatchStatus::Rejected);
        assert_eq!(watch.status(), Some(BatchStatus::Rejected));
        assert_eq!(dup_status.await, BatchStatus::Rejected);
        // Following after the fact finishes at once.
        let (late, late_status) = batch();
        watch.follow(Finalizers::one(late));
        assert_eq!(late_status.await, BatchStatus::Rejected);
    }

    #[test]
    fn watched_record_dropped_unfinished_counts_errored() {
        let (f, watch) = watched();
        drop(f);
        assert_eq!(watch.status(), Some(BatchStatus::Errored));
    }

    #[test]
    fn watermark_only_moves_over_contiguous_prefix() {
        let mut w = Watermark::new(100);
        let a = w.push(110);
        let b = w.push(120);
        let c = w.push(130);
        assert_eq!(w.complete(c, BatchStatus::Delivered), None);
        assert_eq!(w.committable(), 100, "never past an undelivered record");
        assert_eq!(w.complete(a, BatchStatus::Delivered), Some(110));
        assert_eq!(w.complete(b, BatchStatus::Rejected), Some(130));
        assert_eq!(w.pending(), 0);
    }

    #[test]
    fn watermark_blocks_at_errored_range() {
        let mut w = Watermark::new(0);
        let a = w.push(10);
        let b = w.push(20);
        let c = w.push(30);
        w.complete(c, BatchStatus::Delivered);
        w.complete(b, BatchStatus::Errored);
        assert_eq!(w.complete(a, BatchStatus::Delivered), Some(10));
        assert!(w.is_blocked());
        assert_eq!(w.committable(), 10, "offset 10.. must be read again");
    }

    #[test]
    fn ordered_ignores_unknown_sequences() {
        let mut q: Ordered<u8> = Ordered::new();
        q.complete(7, BatchStatus::Delivered);
        let s = q.push(1);
        q.complete(s, BatchStatus::Delivered);
        assert_eq!(q.pop_ready(), Some((1, BatchStatus::Delivered)));
        q.complete(s, BatchStatus::Errored); // already released
        assert!(q.is_empty());
    }
}
