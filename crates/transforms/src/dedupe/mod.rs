//! `dedupe` transform: drops records already seen within a time window.
//!
//! ```toml
//! [transforms.dedupe]
//! type = "dedupe"
//! inputs = ["mqtt"]
//! key = ["tags.device_id", "seq"]     # or include "time"
//! window = "10m"
//! ```
//!
//! MQTT QoS 1 and SQS deliver at least once, so the same message can arrive twice. A record
//! whose key was seen less than `window` ago (in event time: the newest event time seen is
//! "now") is a duplicate and is not passed on: the first copy carries the data. Keys are kept
//! for `window`, at most `max_entries` of them (the oldest forgotten first). A record missing a
//! key part goes to `dead_letter`, and so does a record stamped more than `max_future_skew`
//! (default 5 min) ahead of the wall clock: it would otherwise become "now" and make every key
//! expire at once.
//!
//! A duplicate is only acknowledged as far as its first copy is: dedupe watches each first copy
//! ([`ack::watched`]) and
//! * while it is in flight, a duplicate takes its outcome (the duplicate's source waits);
//! * once it is delivered or rejected, a duplicate is discarded (acknowledged) at once;
//! * if it ended errored (a sink gave up, the source will redeliver), the key is forgotten and
//!   the next copy passes as a new first copy. Discarding it would acknowledge data that no
//!   sink has.
//!
//! The settled keys (first copy Delivered or Rejected) survive a restart: they are written to
//! the component's state directory every `state_interval` (default 30 s) and at every orderly
//! end, and read back at start ([`state`]), so that a message redelivered after a crash (an
//! MQTT message whose PUBACK was never sent) is still discarded. Keys still pending or errored
//! are not written: after a restart their redelivered copies pass as first copies. Keys older
//! than `window` (from the newest event time in the snapshot) are not restored, and at most
//! `max_entries` are (the newest). A snapshot that cannot be read, or was taken with another
//! `key`, is ignored with a WARN naming the file; dedupe then starts empty.

mod state;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::ack::{self, BatchStatus, Watch};
use sluice_core::config::HumanDuration;
use sluice_core::record::{Batch, Record};
use sluice_core::registry::{BuildContext, TransformConfig};
use sluice_core::topology::now_ns;
use sluice_core::transform::{Transform, TransformOutput};
use sluice_core::BoxError;

use crate::event_time::FutureSkew;
use crate::Error;

/// Drops duplicates by key within a time window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DedupeConfig {
    /// Parts of the key: field names, `tags.<name>` for tags, `time` for the event time.
    /// Required.
    pub key: Vec<String>,
    /// How long a key is remembered, in event time. Default "5m".
    #[serde(default = "default_window")]
    pub window: HumanDuration,
    /// Most keys remembered; the oldest are forgotten first. Default 1000000.
    #[serde(default = "default_max_entries")]
    pub max_entries: usize,
    /// A record whose event time is more than this ahead of the wall clock goes to
    /// `dead_letter` (with its time and this limit in the reason) instead of moving "now".
    /// Set a large value (e.g. "100y") to replay data stamped in the future. Default "5m".
    #[serde(default = "crate::event_time::default_max_future_skew")]
    pub max_future_skew: HumanDuration,
    /// How often the settled keys are written to the component's state directory (they are
    /// also written at every orderly end), so that duplicates are still recognised after a
    /// crash. At most this much is lost in a crash: copies of keys settled since the last
    /// snapshot pass again. "0s" writes only at the orderly end. Default "30s".
    #[serde(default = "default_state_interval")]
    pub state_interval: HumanDuration,
}

fn default_window() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}
fn default_state_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_max_entries() -> usize {
    1_000_000
}

#[async_trait]
impl TransformConfig for DedupeConfig {
    async fn build(&self, cx: &BuildContext) -> Result<Box<dyn Transform>, BoxError> {
        Ok(Box::new(Dedupe::new(self, cx)?))
    }
}

/// A key as remembered: the XXH3-128 hash of its text. 16 bytes instead of the string; two
/// different keys collide with probability ~2⁻¹²⁸ per pair (a billion keys in the window:
/// ~10⁻²¹), and the hash is stable across builds, so snapshots survive upgrades.
pub(crate) type KeyHash = u128;

/// The hash of a key's text.
pub(crate) fn key_hash(key: &str) -> KeyHash {
    twox_hash::XxHash3_128::oneshot(key.as_bytes())
}

/// The first copy of a key.
#[derive(Debug)]
struct First {
    /// Its event time.
    time: i64,
    generation: u64,
    /// Its outcome across every sink it reached.
    outcome: Outcome,
}

#[derive(Debug)]
enum Outcome {
    /// Watched while in flight (duplicates follow it).
    Pending(Watch),
    /// Known: the watch is let go (a key restored from a snapshot is Delivered).
    Settled(BatchStatus),
}

impl First {
    fn status(&self) -> Option<BatchStatus> {
        match &self.outcome {
            Outcome::Pending(w) => w.status(),
            Outcome::Settled(s) => Some(*s),
        }
    }
}

#[derive(Debug, Clone)]
enum Part {
    Tag(String),
    Field(String),
    Time,
}

/// The running `dedupe`.
#[derive(Debug)]
pub struct Dedupe {
    parts: Vec<Part>,
    window: i64,
    max_entries: usize,
    skew: FutureSkew,
    /// Key (its 128-bit hash, [`KeyHash`]) → its first copy.
    seen: HashMap<KeyHash, First>,
    /// Keys in insertion order with their entry's generation, for expiry.
    order: VecDeque<(i64, u64, KeyHash)>,
    /// `order[..settled]` have no outcome still pending ([`Dedupe::settle`]).
    settled: usize,
    /// Generation of the next entry: tells a key's current entry from one it replaced (an
    /// errored first copy replaced by its redelivery may have the same event time).
    next_gen: u64,
    newest: i64,
    /// Duplicates discarded so far.
    pub duplicates: u64,
    /// Records dead-lettered for an event time beyond `max_future_skew`.
    pub future: u64,
    /// The `key` option, written into snapshots.
    key_def: Vec<String>,
    /// Where snapshots go; `None` when nothing is persisted.
    state_dir: Option<PathBuf>,
    state_interval: Option<Duration>,
    /// The periodic snapshot being written off the pipeline's threads, if any.
    writer: Option<JoinHandle<()>>,
    /// `next_gen` at the last snapshot and whether keys were still pending then: with no new
    /// key and none pending, the snapshot would be the same.
    last_snapshot: Option<(u64, bool)>,
}

impl Dedupe {
    pub fn new(config: &DedupeConfig, cx: &BuildContext) -> Result<Self, Error> {
        if config.key.is_empty() {
            return Err(Error::option(cx, "key", "list at least one key part"));
        }
        if config.max_entries == 0 {
            return Err(Error::option(cx, "max_entries", "must be at least 1"));
        }
        let parts = config
            .key
            .iter()
            .map(|k| match k.strip_prefix("tags.") {
                Some(tag) => Part::Tag(tag.to_string()),
                None if k == "time" => Part::Time,
                None => Part::Field(k.clone()),
            })
            .collect();
        let mut d = Dedupe {
            parts,
            window: i64::try_from(config.window.0.as_nanos()).unwrap_or(i64::MAX),
            max_entries: config.max_entries,
            skew: FutureSkew::new(config.max_future_skew),
            seen: HashMap::new(),
            order: VecDeque::new(),
            settled: 0,
            next_gen: 0,
            newest: i64::MIN,
            duplicates: 0,
            future: 0,
            key_def: config.key.clone(),
            state_dir: cx.state_dir.clone(),
            state_interval: Some(config.state_interval.0).filter(|i| !i.is_zero()),
            writer: None,
            last_snapshot: None,
        };
        d.restore();
        Ok(d)
    }

    /// Reads the snapshot from the state directory, if any. Never fails: an unusable snapshot
    /// is logged and dedupe starts empty.
    fn restore(&mut self) {
        let Some(dir) = &self.state_dir else { return };
        let restored = match state::load(dir, &self.key_def) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("{e}; ignored, dedupe starts with no keys");
                return;
            }
        };
        let path = dir.join(state::FILE);
        // A snapshot "now" far ahead of the wall clock (the clock was set back) would expire
        // every new key at once until the clock catches up.
        if let Some(why) = self.skew.check(restored.newest, now_ns()) {
            tracing::warn!(
                "dedupe snapshot {}: newest {why}; ignored, dedupe starts with no keys",
                path.display()
            );
            return;
        }
        let horizon = restored.newest.saturating_sub(self.window);
        let live: Vec<_> = restored
            .entries
            .into_iter()
            .filter(|(t, _)| *t >= horizon)
            .collect();
        // The newest `max_entries`, as `expire` would keep them.
        let skip = live.len().saturating_sub(self.max_entries);
        for (time, key) in live.into_iter().skip(skip) {
            let generation = self.next_gen;
            self.next_gen += 1;
            self.seen.insert(
                key,
                First {
                    time,
                    generation,
                    outcome: Outcome::Settled(BatchStatus::Delivered),
                },
            );
            self.order.push_back((time, generation, key));
        }
        self.settled = self.order.len();
        self.newest = restored.newest;
        self.last_snapshot = Some((self.next_gen, false));
        tracing::info!(
            "dedupe: restored {} keys from {}",
            self.seen.len(),
            path.display()
        );
    }

    /// The snapshot of the settled keys within the window, with `next_gen` and whether keys
    /// were pending (for [`unchanged`](Self::unchanged)).
    fn snapshot(&self) -> (Vec<u8>, u64, bool) {
        let horizon = self.newest.saturating_sub(self.window);
        let mut pending = false;
        let mut entries = Vec::with_capacity(self.seen.len());
        for (time, generation, key) in &self.order {
            let Some(first) = self.seen.get(key).filter(|f| f.generation == *generation) else {
                continue; // replaced by a later copy, which has its own entry
            };
            match first.status() {
                Some(s) if s.is_ackable() && *time >= horizon => entries.push((*time, *key)),
                None => pending = true,
                Some(_) => {}
            }
        }
        let bytes = state::encode(&self.key_def, self.newest, &entries);
        (bytes, self.next_gen, pending)
    }

    /// Whether nothing changed since the last snapshot (no new key, none was pending).
    fn unchanged(&self) -> bool {
        self.last_snapshot == Some((self.next_gen, false))
    }

    fn key(&self, r: &Record) -> Result<KeyHash, String> {
        use std::fmt::Write;
        let mut key = String::new();
        for part in &self.parts {
            // Unit separator between parts; the type prefix keeps "1" (string) ≠ 1 (int).
            match part {
                Part::Tag(t) => match r.tag(t) {
                    Some(v) => {
                        let _ = write!(key, "t:{v}\u{1f}");
                    }
                    None => return Err(format!("key tag `{t}` missing")),
                },
                Part::Field(f) => match r.field(f) {
                    Some(v) => {
                        let _ = write!(key, "{}:{v}\u{1f}", v.type_name());
                    }
                    None => return Err(format!("key field `{f}` missing")),
                },
                Part::Time => {
                    let _ = write!(key, "time:{}\u{1f}", r.time);
                }
            }
        }
        Ok(key_hash(&key))
    }

    fn expire(&mut self) {
        let horizon = self.newest.saturating_sub(self.window);
        while let Some((t, _, _)) = self.order.front() {
            if *t >= horizon && self.order.len() <= self.max_entries {
                break;
            }
            if let Some((_, generation, k)) = self.order.pop_front() {
                self.settled = self.settled.saturating_sub(1);
                // Only forget the key if this queue entry is the one that set it. A forgotten
                // first copy still passes its outcome to the duplicates that follow it.
                if self.seen.get(&k).map(|f| f.generation) == Some(generation) {
                    self.seen.remove(&k);
                }
            }
        }
    }

    /// Remembers `r` as the first copy of `key` and watches its outcome. The first copies of
    /// one input batch share one watch (`batch_watch`): a window holding them for an hour then
    /// costs one watch per batch, not per record. A duplicate follows the outcome of its first
    /// copy's whole batch (the worst status in it): an error anywhere in that batch lets the
    /// redeliveries of all of it pass, a duplicate never a loss.
    fn remember(
        &mut self,
        key: KeyHash,
        r: &mut Record,
        batch_watch: &mut Option<(ack::Finalizer, Watch)>,
    ) {
        let (finalizer, outcome) = batch_watch.get_or_insert_with(ack::watched);
        let outcome = outcome.clone();
        r.finalizers.push(finalizer.clone());
        let generation = self.next_gen;
        self.next_gen += 1;
        self.seen.insert(
            key,
            First {
                time: r.time,
                generation,
                outcome: Outcome::Pending(outcome),
            },
        );
        self.order.push_back((r.time, generation, key));
    }

    /// Lets go of the watches of first copies whose outcome is known, oldest first, up to the
    /// first one still in flight: a settled key then costs its hash, times and status only.
    fn settle(&mut self) {
        while let Some(&(_, generation, key)) = self.order.get(self.settled) {
            if let Some(first) = self
                .seen
                .get_mut(&key)
                .filter(|f| f.generation == generation)
            {
                match first.status() {
                    Some(status) => first.outcome = Outcome::Settled(status),
                    None => break,
                }
            }
            self.settled += 1;
        }
    }
}

impl Transform for Dedupe {
    fn process(&mut self, batch: Batch, out: &mut TransformOutput) {
        let now = now_ns();
        let mut batch_watch = None;
        for mut r in batch.records {
            if let Some(why) = self.skew.check(r.time, now) {
                self.future += 1;
                out.dead_letter(r, format!("dedupe: {why}"));
                continue;
            }
            let key = match self.key(&r) {
                Ok(k) => k,
                Err(e) => {
                    out.dead_letter(r, format!("dedupe: {e}"));
                    continue;
                }
            };
            self.newest = self.newest.max(r.time);
            let horizon = self.newest.saturating_sub(self.window);
            let first = self
                .seen
                .get(&key)
                .filter(|f| f.time >= horizon)
                .map(|f| (f.status(), &f.outcome));
            match first {
                // Pending: the duplicate is acknowledged only as far as the first copy is.
                Some((None, Outcome::Pending(outcome))) => {
                    self.duplicates += 1;
                    outcome.follow(std::mem::take(&mut r.finalizers));
                }
                Some((Some(status), _)) if status.is_ackable() => {
                    self.duplicates += 1;
                    r.discard();
                }
                // New, expired, or the first copy errored (so this is its redelivery).
                _ => {
                    self.remember(key, &mut r, &mut batch_watch);
                    out.push(r);
                }
            }
        }
        if let Some((finalizer, _)) = batch_watch {
            // The records carry their clones; this holder has nothing to report.
            finalizer.finish(BatchStatus::Delivered);
        }
        self.expire();
        self.settle();
    }

    fn tick_interval(&self) -> Option<Duration> {
        self.state_dir.as_ref().and(self.state_interval)
    }

    /// Writes a snapshot off the pipeline's threads (a million keys take a while to fsync);
    /// skipped while the previous one is still being written.
    fn on_tick(&mut self, _now: i64, _out: &mut TransformOutput) {
        let Some(dir) = self.state_dir.clone() else {
            return;
        };
        if self.writer.as_ref().is_some_and(|w| !w.is_finished()) || self.unchanged() {
            return;
        }
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        let (bytes, generation, pending) = self.snapshot();
        let spawned = std::thread::Builder::new()
            .name("dedupe-state".into())
            .spawn(move || {
                if let Err((path, e)) = state::write(&dir, &bytes) {
                    tracing::warn!("cannot write dedupe snapshot {}: {e}", path.display());
                }
            });
        match spawned {
            Ok(w) => {
                self.writer = Some(w);
                self.last_snapshot = Some((generation, pending));
            }
            Err(e) => tracing::warn!("dedupe: cannot start the snapshot writer: {e}"),
        }
    }

    fn save_state(&mut self) {
        let Some(dir) = &self.state_dir else { return };
        // The periodic write must not land after (and replace) this newer one.
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        let (bytes, generation, pending) = self.snapshot();
        match state::write(dir, &bytes) {
            Ok(()) => self.last_snapshot = Some((generation, pending)),
            Err((path, e)) => {
                tracing::warn!("cannot write dedupe snapshot {}: {e}", path.display())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use sluice_core::ack::{self, BatchStatus};
    use sluice_core::record::Value;

    use super::*;
    use crate::testing::{cx, rec, take};

    fn dedupe(window_s: u64, max_entries: usize) -> Dedupe {
        let c = DedupeConfig {
            key: vec!["tags.device_id".into(), "seq".into()],
            window: HumanDuration(Duration::from_secs(window_s)),
            max_entries,
            max_future_skew: crate::event_time::default_max_future_skew(),
            state_interval: default_state_interval(),
        };
        Dedupe::new(&c, &cx()).expect("valid")
    }

    fn msg(secs: f64, dev: &str, seq: i64) -> Record {
        rec(secs, dev, &[("seq", Value::I64(seq))])
    }

    fn pass(d: &mut Dedupe, records: Vec<Record>) -> Vec<Record> {
        let mut out = TransformOutput::default();
        d.process(Batch::new(records), &mut out);
        take(&mut out, "default")
    }

    /// Passes `records` and has a sink deliver what comes out; returns how many came out.
    fn deliver(d: &mut Dedupe, records: Vec<Record>) -> usize {
        let kept = pass(d, records);
        let n = kept.len();
        for mut r in kept {
            r.finalize(BatchStatus::Delivered);
        }
        n
    }

    #[tokio::test]
    async fn redelivered_duplicates_are_discarded_and_acknowledged() {
        let mut d = dedupe(60, 100);
        let (fin, status) = ack::batch();
        let mut dup = msg(1.0, "a", 1);
        dup.finalizers.push(fin);
        let kept = pass(
            &mut d,
            vec![msg(1.0, "a", 1), msg(1.0, "b", 1), dup, msg(2.0, "a", 2)],
        );
        assert_eq!(kept.len(), 3);
        assert_eq!(d.duplicates, 1);
        // Acknowledged once the first copy is delivered.
        for mut r in kept {
            r.finalize(BatchStatus::Delivered);
        }
        assert_eq!(status.await, BatchStatus::Delivered);
    }

    /// A finalizer-carrying copy of `msg`, and the receiver of its source batch's status.
    fn acked(secs: f64, dev: &str, seq: i64) -> (Record, ack::StatusReceiver) {
        let (fin, status) = ack::batch();
        let mut r = msg(secs, dev, seq);
        r.finalizers.push(fin);
        (r, status)
    }

    #[tokio::test]
    async fn duplicate_of_an_original_that_errored_is_not_acknowledged_and_redelivery_passes() {
        let mut d = dedupe(60, 100);
        let (first, first_status) = acked(1.0, "a", 1);
        let (dup, dup_status) = acked(1.0, "a", 1);
        let mut kept = pass(&mut d, vec![first, dup]);
        assert_eq!(
            kept.len(),
            1,
            "the duplicate is held back, not written twice"
        );
        // The sink gives up on the first copy: the source must redeliver both messages.
        kept.remove(0).finalize(BatchStatus::Errored);
        assert_eq!(first_status.await, BatchStatus::Errored);
        assert_eq!(
            dup_status.await,
            BatchStatus::Errored,
            "a duplicate takes its original's outcome; acknowledging it would lose the data"
        );
        // The redelivered copy is not a duplicate of anything delivered: it must pass.
        let (again, again_status) = acked(1.0, "a", 1);
        let mut kept = pass(&mut d, vec![again]);
        assert_eq!(kept.len(), 1, "an errored original is forgotten");
        kept.remove(0).finalize(BatchStatus::Delivered);
        assert_eq!(again_status.await, BatchStatus::Delivered);
        // Now it is delivered, so a further copy is a real duplicate.
        let (late, late_status) = acked(2.0, "a", 1);
        assert!(pass(&mut d, vec![late]).is_empty());
        assert_eq!(late_status.await, BatchStatus::Delivered);
    }

    #[tokio::test]
    async fn duplicate_of_a_pending_original_waits_for_its_outcome() {
        let mut d = dedupe(60, 100);
        let (first, _first_status) = acked(1.0, "a", 1);
        let mut kept = pass(&mut d, vec![first]);
        let (dup, mut dup_status) = acked(1.5, "a", 1);
        assert!(pass(&mut d, vec![dup]).is_empty());
        assert_eq!(d.duplicates, 1);
        assert_eq!(
            dup_status.try_status(),
            None,
            "must not be acknowledged before the original is delivered"
        );
        kept.remove(0).finalize(BatchStatus::Rejected);
        assert_eq!(dup_status.await, BatchStatus::Rejected);
    }

    #[test]
    fn keys_expire_after_the_window() {
        let mut d = dedupe(60, 100);
        assert_eq!(deliver(&mut d, vec![msg(0.0, "a", 1)]), 1);
        assert_eq!(deliver(&mut d, vec![msg(30.0, "a", 1)]), 0, "within 60 s");
        assert_eq!(deliver(&mut d, vec![msg(200.0, "z", 9)]), 1);
        assert_eq!(deliver(&mut d, vec![msg(201.0, "a", 1)]), 1, "forgotten");
    }

    #[test]
    fn max_entries_bounds_memory() {
        let mut d = dedupe(3600, 2);
        deliver(
            &mut d,
            vec![msg(0.0, "a", 1), msg(1.0, "a", 2), msg(2.0, "a", 3)],
        );
        assert!(d.seen.len() <= 2);
        assert_eq!(
            deliver(&mut d, vec![msg(3.0, "a", 1)]),
            1,
            "oldest forgotten"
        );
    }

    #[test]
    fn missing_key_part_is_dead_lettered_and_types_differ() {
        let mut d = dedupe(60, 100);
        let mut out = TransformOutput::default();
        d.process(
            Batch::new(vec![
                rec(0.0, "a", &[]),
                rec(0.0, "a", &[("seq", Value::I64(1))]),
                rec(0.0, "a", &[("seq", Value::from("1"))]),
            ]),
            &mut out,
        );
        let dead = take(&mut out, "dead_letter");
        assert_eq!(dead.len(), 1);
        assert!(dead[0]
            .meta
            .error
            .as_deref()
            .is_some_and(|e| e.contains("key field `seq` missing")));
        assert_eq!(
            take(&mut out, "default").len(),
            2,
            "1 and \"1\" are different keys"
        );
    }

    #[test]
    fn time_as_key() {
        let c = DedupeConfig {
            key: vec!["tags.device_id".into(), "time".into()],
            window: default_window(),
            max_entries: 10,
            max_future_skew: crate::event_time::default_max_future_skew(),
            state_interval: default_state_interval(),
        };
        let mut d = Dedupe::new(&c, &cx()).expect("valid");
        let kept = pass(
            &mut d,
            vec![rec(1.0, "a", &[]), rec(1.0, "a", &[]), rec(2.0, "a", &[])],
        );
        assert_eq!(kept.len(), 2);
        assert!(Dedupe::new(
            &DedupeConfig {
                key: vec![],
                window: default_window(),
                max_entries: 1,
                max_future_skew: crate::event_time::default_max_future_skew(),
                state_interval: default_state_interval(),
            },
            &cx()
        )
        .is_err());
    }

    #[tokio::test]
    async fn a_record_from_the_far_future_is_dead_lettered_and_keeps_the_horizon() {
        let mut d = dedupe(60, 100);
        assert_eq!(deliver(&mut d, vec![msg(1.0, "a", 1)]), 1);
        let mut year_2100 = msg(0.0, "b", 1);
        year_2100.time = 4_102_444_800_000_000_000; // 2100-01-01T00:00:00Z
        let mut out = TransformOutput::default();
        d.process(Batch::new(vec![year_2100]), &mut out);
        let dead = take(&mut out, "dead_letter");
        assert_eq!(dead.len(), 1);
        let why = dead[0].meta.error.as_deref().unwrap_or("");
        assert!(why.contains("2100-01-01T00:00:00Z"), "{why}");
        assert!(why.contains("max_future_skew = \"5m\""), "{why}");
        assert_eq!(d.future, 1);
        // "Now" did not jump to 2100: the key of the first copy is still remembered.
        let (dup, dup_status) = acked(2.0, "a", 1);
        assert!(pass(&mut d, vec![dup]).is_empty(), "still a duplicate");
        assert_eq!(dup_status.await, BatchStatus::Delivered);
    }
    fn with_state(
        dir: &std::path::Path,
        key: &[&str],
        window_s: u64,
        max_entries: usize,
    ) -> Dedupe {
        let c = DedupeConfig {
            key: key.iter().map(|k| k.to_string()).collect(),
            window: HumanDuration(Duration::from_secs(window_s)),
            max_entries,
            max_future_skew: crate::event_time::default_max_future_skew(),
            state_interval: default_state_interval(),
        };
        let mut cx = cx();
        cx.state_dir = Some(dir.to_path_buf());
        Dedupe::new(&c, &cx).expect("valid")
    }

    const KEY: &[&str] = &["tags.device_id", "seq"];

    #[test]
    fn restore_keeps_only_keys_within_the_window_and_max_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut d = with_state(dir.path(), KEY, 60, 100);
        deliver(
            &mut d,
            vec![
                msg(0.0, "a", 1),
                msg(50.0, "a", 2),
                msg(90.0, "a", 3),
                msg(100.0, "a", 4),
            ],
        );
        d.save_state();

        // 0 s is older than the window (60 s before the newest, 100 s): not restored.
        let d = with_state(dir.path(), KEY, 60, 100);
        let mut restored: Vec<_> = d.order.iter().map(|(t, _, _)| *t / 1_000_000_000).collect();
        restored.sort_unstable();
        assert_eq!(restored, vec![50, 90, 100]);
        assert_eq!(d.seen.len(), 3);
        assert_eq!(d.newest, 100_000_000_000);

        // max_entries = 2: the two newest.
        let mut d = with_state(dir.path(), KEY, 60, 2);
        assert_eq!(d.seen.len(), 2);
        assert_eq!(deliver(&mut d, vec![msg(100.0, "a", 4)]), 0, "remembered");
        assert_eq!(
            deliver(&mut d, vec![msg(100.0, "a", 2)]),
            1,
            "beyond max_entries"
        );
    }

    #[test]
    fn a_snapshot_taken_with_another_key_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut d = with_state(dir.path(), KEY, 60, 100);
        deliver(&mut d, vec![msg(0.0, "a", 1)]);
        d.save_state();
        assert_eq!(with_state(dir.path(), KEY, 60, 100).seen.len(), 1);
        let d = with_state(dir.path(), &["tags.device_id"], 60, 100);
        assert!(
            d.seen.is_empty(),
            "a key of another definition means something else"
        );
    }

    #[test]
    fn periodic_snapshots_only_when_something_changed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut d = with_state(dir.path(), KEY, 60, 100);
        assert_eq!(d.tick_interval(), Some(Duration::from_secs(30)));
        assert!(!d.unchanged(), "nothing written yet");
        let kept = pass(&mut d, vec![msg(0.0, "a", 1)]);
        let mut out = TransformOutput::default();
        d.on_tick(0, &mut out);
        assert!(!d.unchanged(), "a key was pending: written again next time");
        for mut r in kept {
            r.finalize(BatchStatus::Delivered);
        }
        // Wait for the writer before the next tick (a tick is skipped while one is running).
        if let Some(w) = d.writer.take() {
            w.join().expect("writer");
        }
        d.on_tick(0, &mut out);
        assert!(d.unchanged());
        if let Some(w) = d.writer.take() {
            w.join().expect("writer");
        }
        assert_eq!(with_state(dir.path(), KEY, 60, 100).seen.len(), 1);
        // Without a state directory, or with "0s", no tick at all.
        assert_eq!(dedupe(60, 100).tick_interval(), None);
        let c = DedupeConfig {
            key: vec!["seq".into()],
            window: default_window(),
            max_entries: 10,
            max_future_skew: crate::event_time::default_max_future_skew(),
            state_interval: HumanDuration(Duration::ZERO),
        };
        let mut cx = cx();
        cx.state_dir = Some(dir.path().to_path_buf());
        assert_eq!(Dedupe::new(&c, &cx).expect("valid").tick_interval(), None);
    }
}
