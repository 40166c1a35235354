//! Poison-record protection shared by the acknowledging sources (`max_redeliveries`).
//!
//! A record whose delivery fails every time (`Errored`) would be redelivered forever and, with
//! ordered acknowledgements (MQTT, Kafka), hold back everything behind it. Sources count the
//! failed deliveries of each message and, once a message failed more than `max_redeliveries`
//! times, send it to their `dead_letter` output instead of the default output; it is then
//! acknowledged once the dead-letter path resolves.
//!
//! MQTT and Kafka do not say how often a message was delivered (MQTT's DUP flag only says "at
//! least once"), so [`Attempts`] counts in the source, in a bounded map: a batch's status covers
//! all its records, so after a failure the source follows the records it knows failed one by
//! one ([`Attempts::is_watching`]) and counts only those that fail again. SQS has the queue's
//! own `ApproximateReceiveCount`.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use sluice_core::ack::BatchStatus;

/// Default `max_redeliveries`: enough to ride out a sink outage that outlasts the sink's own
/// retries a few times over, few enough that a poison record stops blocking within minutes.
pub const DEFAULT_MAX_REDELIVERIES: u32 = 10;

/// Most messages whose failures are remembered at once; the oldest entry is forgotten first
/// (that message then gets `max_redeliveries` more attempts).
pub const DEFAULT_CAPACITY: usize = 100_000;

/// Whether a message that failed `failures` times so far is dead-lettered rather than
/// delivered again (`max` = 0: never).
pub fn exhausted(failures: u32, max: u32) -> bool {
    max > 0 && failures > max
}

/// The error attached to a dead-lettered poison record.
pub fn reason(failures: u32, max: u32) -> String {
    format!(
        "delivery failed {failures} times (sinks returned a transient error each time); \
         dead-lettered by max_redeliveries = {max}"
    )
}

/// Failed deliveries per message key, bounded to `capacity` keys.
#[derive(Debug)]
pub struct Attempts<K> {
    max: u32,
    capacity: usize,
    counts: HashMap<K, u32>,
    /// Keys in insertion order, for eviction; may hold keys already removed.
    order: VecDeque<K>,
}

impl<K: Hash + Eq + Clone> Attempts<K> {
    pub fn new(max: u32, capacity: usize) -> Self {
        Attempts {
            max,
            capacity: capacity.max(1),
            counts: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Whether counting is on (`max_redeliveries` > 0).
    pub fn enabled(&self) -> bool {
        self.max > 0
    }

    pub fn max(&self) -> u32 {
        self.max
    }

    /// Whether some message failed recently: then each record gets its own status so that
    /// only the ones that fail again are counted.
    pub fn is_watching(&self) -> bool {
        !self.counts.is_empty()
    }

    /// Failed deliveries of `key` so far.
    pub fn failures(&self, key: &K) -> u32 {
        self.counts.get(key).copied().unwrap_or(0)
    }

    /// Whether `key` failed too often: dead-letter it instead of delivering it again.
    pub fn is_exhausted(&self, key: &K) -> bool {
        exhausted(self.failures(key), self.max)
    }

    /// Records the outcome of one delivery of `key`: a failure counts, anything else
    /// forgets the key (delivered, or dead-lettered for good).
    pub fn settle(&mut self, key: K, status: BatchStatus) {
        if !self.enabled() {
            return;
        }
        if status.is_ackable() {
            self.counts.remove(&key);
            if self.counts.is_empty() {
                self.order.clear();
            }
            return;
        }
        match self.counts.entry(key) {
            Entry::Occupied(mut e) => *e.get_mut() = e.get().saturating_add(1),
            Entry::Vacant(e) => {
                self.order.push_back(e.key().clone());
                e.insert(1);
            }
        }
        while self.counts.len() > self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.counts.remove(&old);
                }
                None => break,
            }
        }
        if self.order.len() > 2 * self.capacity {
            let counts = &self.counts;
            self.order.retain(|k| counts.contains_key(k));
        }
    }

    /// Settles the messages of one batch: `status` is the batch's, `own[i]` the status of
    /// message `i` when it was followed one by one.
    pub fn settle_batch(
        &mut self,
        keys: impl IntoIterator<Item = (K, Option<BatchStatus>)>,
        status: BatchStatus,
    ) {
        if !self.enabled() || (status.is_ackable() && self.counts.is_empty()) {
            return;
        }
        for (key, own) in keys {
            let s = if status.is_ackable() {
                status
            } else {
                own.unwrap_or(status)
            };
            self.settle(key, s);
        }
    }

    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_failures_forgets_successes_and_stays_bounded() {
        let mut a = Attempts::new(2, 3);
        assert!(!a.is_watching());
        a.settle_batch([(1, None), (2, None)], BatchStatus::Errored);
        assert_eq!((a.failures(&1), a.failures(&2)), (1, 1));
        // Followed one by one: 1 fails again, 2 was fine.
        a.settle_batch(
            [
                (1, Some(BatchStatus::Errored)),
                (2, Some(BatchStatus::Delivered)),
            ],
            BatchStatus::Errored,
        );
        assert_eq!((a.failures(&1), a.failures(&2)), (2, 0));
        assert!(!a.is_exhausted(&1));
        a.settle(1, BatchStatus::Errored);
        assert!(a.is_exhausted(&1), "3 failures > max 2");
        a.settle(1, BatchStatus::Rejected);
        assert!(a.is_empty());
        for k in 10..20 {
            a.settle(k, BatchStatus::Errored);
        }
        assert_eq!(a.len(), 3);
        assert_eq!(a.failures(&19), 1);
        assert_eq!(a.failures(&10), 0, "oldest forgotten");
    }

    #[test]
    fn zero_means_unlimited() {
        let mut a = Attempts::new(0, 10);
        for _ in 0..100 {
            a.settle(1, BatchStatus::Errored);
        }
        assert!(!a.is_exhausted(&1));
        assert!(!exhausted(1000, 0));
        assert!(exhausted(11, 10) && !exhausted(10, 10));
    }
}
