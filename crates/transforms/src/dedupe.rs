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
//! "now") is discarded, which acknowledges it: the first copy carries the data. Keys are kept
//! for `window`, at most `max_entries` of them (the oldest forgotten first). A record missing a
//! key part goes to `dead_letter`.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::config::HumanDuration;
use sluice_core::record::{Batch, Record};
use sluice_core::registry::{BuildContext, TransformConfig};
use sluice_core::transform::{Transform, TransformOutput};
use sluice_core::BoxError;

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
}

fn default_window() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
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
    /// Key → event time it was first seen.
    seen: HashMap<Box<str>, i64>,
    /// Keys in insertion order, for expiry.
    order: VecDeque<(i64, Box<str>)>,
    newest: i64,
    /// Duplicates discarded so far.
    pub duplicates: u64,
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
        Ok(Dedupe {
            parts,
            window: i64::try_from(config.window.0.as_nanos()).unwrap_or(i64::MAX),
            max_entries: config.max_entries,
            seen: HashMap::new(),
            order: VecDeque::new(),
            newest: i64::MIN,
            duplicates: 0,
        })
    }

    fn key(&self, r: &Record) -> Result<Box<str>, String> {
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
        Ok(key.into_boxed_str())
    }

    fn expire(&mut self) {
        let horizon = self.newest.saturating_sub(self.window);
        while let Some((t, _)) = self.order.front() {
            if *t >= horizon && self.order.len() <= self.max_entries {
                break;
            }
            if let Some((t, k)) = self.order.pop_front() {
                // Only forget the key if this queue entry is the one that set it.
                if self.seen.get(&k) == Some(&t) {
                    self.seen.remove(&k);
                }
            }
        }
    }
}

impl Transform for Dedupe {
    fn process(&mut self, batch: Batch, out: &mut TransformOutput) {
        for r in batch.records {
            let key = match self.key(&r) {
                Ok(k) => k,
                Err(e) => {
                    out.dead_letter(r, format!("dedupe: {e}"));
                    continue;
                }
            };
            self.newest = self.newest.max(r.time);
            let horizon = self.newest.saturating_sub(self.window);
            match self.seen.get(&key) {
                Some(first) if *first >= horizon => {
                    self.duplicates += 1;
                    r.discard();
                }
                _ => {
                    self.seen.insert(key.clone(), r.time);
                    self.order.push_back((r.time, key));
                    out.push(r);
                }
            }
        }
        self.expire();
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
        assert_eq!(status.await, BatchStatus::Delivered);
    }

    #[test]
    fn keys_expire_after_the_window() {
        let mut d = dedupe(60, 100);
        assert_eq!(pass(&mut d, vec![msg(0.0, "a", 1)]).len(), 1);
        assert_eq!(
            pass(&mut d, vec![msg(30.0, "a", 1)]).len(),
            0,
            "within 60 s"
        );
        assert_eq!(pass(&mut d, vec![msg(200.0, "z", 9)]).len(), 1);
        assert_eq!(pass(&mut d, vec![msg(201.0, "a", 1)]).len(), 1, "forgotten");
    }

    #[test]
    fn max_entries_bounds_memory() {
        let mut d = dedupe(3600, 2);
        pass(
            &mut d,
            vec![msg(0.0, "a", 1), msg(1.0, "a", 2), msg(2.0, "a", 3)],
        );
        assert!(d.seen.len() <= 2);
        assert_eq!(
            pass(&mut d, vec![msg(3.0, "a", 1)]).len(),
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
                max_entries: 1
            },
            &cx()
        )
        .is_err());
    }
}
