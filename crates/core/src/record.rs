//! The record model: what flows through a pipeline.
//!
//! A [`Record`] is one measurement (or one message) with an event time, a few string tags, typed
//! fields, the optional raw payload and where it came from. Records travel in [`Batch`]es; each
//! record carries the [`Finalizer`] that reports its fate back to its source.
//!
//! Tag and field names are [`Name`]s: interned `Arc<str>` shared by every record that uses them,
//! so a million records with a `temp` field hold one `"temp"` allocation.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;

use crate::ack::{BatchStatus, Finalizers};

/// A shared, interned tag or field name.
pub type Name = Arc<str>;

/// Most names the interner holds (see [`intern`]).
pub const MAX_INTERNED: usize = 16_384;

struct Interner {
    names: HashSet<Name>,
    /// Names inserted or handed out un-interned since the last sweep: a sweep costs one pass
    /// over the set, so it waits for MAX_INTERNED / 8 of these (amortised O(1) per call).
    since_sweep: usize,
}

static NAMES: OnceLock<Mutex<Interner>> = OnceLock::new();

/// Returns the shared [`Name`] for `s`, allocating it only the first time it is seen.
///
/// The interner is global and bounded: tag and field keys of telemetry are few, but a device
/// can choose its own (a new JSON key per message). Once it holds [`MAX_INTERNED`] names it
/// forgets those nobody uses any more; if all are still in use, `s` is returned as a plain,
/// un-shared `Arc<str>`. Names are therefore compared by value; pointer equality is only a
/// fast path.
pub fn intern(s: &str) -> Name {
    let interner = NAMES.get_or_init(|| {
        Mutex::new(Interner {
            names: HashSet::new(),
            since_sweep: usize::MAX,
        })
    });
    // A poisoned lock only means another thread panicked while inserting; the set is still valid.
    let mut interner = interner.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(existing) = interner.names.get(s) {
        return existing.clone();
    }
    let name: Name = Arc::from(s);
    interner.since_sweep = interner.since_sweep.saturating_add(1);
    if interner.names.len() >= MAX_INTERNED {
        if interner.since_sweep >= MAX_INTERNED / 8 {
            // A count of 1 is the set's own reference: no record, schema or config holds it.
            interner.names.retain(|n| Arc::strong_count(n) > 1);
            interner.since_sweep = 0;
        }
        if interner.names.len() >= MAX_INTERNED {
            return name;
        }
    }
    interner.names.insert(name.clone());
    name
}

/// Names held by the interner (at most [`MAX_INTERNED`]).
pub fn interned_len() -> usize {
    NAMES.get().map_or(0, |n| {
        n.lock().unwrap_or_else(|p| p.into_inner()).names.len()
    })
}

/// A typed field value. A field that is absent is simply not in [`Record::fields`]; `Null` is
/// an explicit null (e.g. JSON `null`).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    F64(f64),
    I64(i64),
    Bool(bool),
    Str(Arc<str>),
    Null,
}

impl Value {
    /// The value as a float, when it is numeric (integers are widened, booleans are 0/1).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::F64(v) => Some(*v),
            Value::I64(v) => Some(*v as f64),
            Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            Value::Str(_) | Value::Null => None,
        }
    }

    /// The value as a string slice, when it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A short name of the type, used in error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::F64(_) => "f64",
            Value::I64(_) => "i64",
            Value::Bool(_) => "bool",
            Value::Str(_) => "string",
            Value::Null => "null",
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::F64(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::Str(v) => f.write_str(v),
            Value::Null => f.write_str("null"),
        }
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::F64(v)
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::I64(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(Arc::from(v))
    }
}

/// Where a record came from, beyond the source's name.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Origin {
    /// No protocol-specific position (simulator, file, stdin, transform output).
    #[default]
    None,
    /// An MQTT message.
    Mqtt { topic: Arc<str> },
    /// A Kafka message.
    Kafka {
        topic: Arc<str>,
        partition: i32,
        offset: i64,
    },
    /// An SQS message.
    Sqs { message_id: Arc<str> },
}

/// Source metadata of a record.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Meta {
    /// Name of the source component that produced the record.
    pub source: Option<Name>,
    /// Protocol position of the record.
    pub origin: Origin,
    /// Why the record was dead-lettered, when it was.
    pub error: Option<Arc<str>>,
}

impl Meta {
    /// The MQTT topic (or Kafka topic) the record came from, if any.
    pub fn topic(&self) -> Option<&str> {
        match &self.origin {
            Origin::Mqtt { topic } | Origin::Kafka { topic, .. } => Some(topic),
            _ => None,
        }
    }
}

/// One telemetry record.
///
/// ```
/// use sluice_core::record::{Record, Value};
/// let mut r = Record::new(1_700_000_000_000_000_000);
/// r.set_tag("device_id", "dev-1");
/// r.set_field("temp", Value::F64(21.5));
/// assert_eq!(r.tag("device_id"), Some("dev-1"));
/// assert_eq!(r.field("temp").and_then(Value::as_f64), Some(21.5));
/// ```
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// Event time, nanoseconds since the Unix epoch, UTC.
    pub time: i64,
    /// String tags (device id, tenant, topic segments…), in insertion order; names unique.
    pub tags: Vec<(Name, Arc<str>)>,
    /// Typed fields, in insertion order; names unique.
    pub fields: Vec<(Name, Value)>,
    /// The raw payload as received, when kept (zero-copy slice of the network buffer).
    pub payload: Option<Bytes>,
    /// Source metadata.
    pub meta: Meta,
    /// Report this record's fate back to its source(s); empty when the source does not ack.
    pub finalizers: Finalizers,
}

impl Record {
    /// An empty record at `time` (ns since epoch).
    pub fn new(time: i64) -> Self {
        Record {
            time,
            ..Default::default()
        }
    }

    /// The value of tag `name`.
    pub fn tag(&self, name: &str) -> Option<&str> {
        self.tags
            .iter()
            .find(|(k, _)| &**k == name)
            .map(|(_, v)| &**v)
    }

    /// Sets (or replaces) tag `name`.
    pub fn set_tag(&mut self, name: &str, value: impl Into<Arc<str>>) {
        let value = value.into();
        match self.tags.iter_mut().find(|(k, _)| &**k == name) {
            Some(slot) => slot.1 = value,
            None => self.tags.push((intern(name), value)),
        }
    }

    /// Removes tag `name`, returning its value.
    pub fn remove_tag(&mut self, name: &str) -> Option<Arc<str>> {
        let pos = self.tags.iter().position(|(k, _)| &**k == name)?;
        Some(self.tags.remove(pos).1)
    }

    /// The value of field `name`.
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.fields
            .iter()
            .find(|(k, _)| &**k == name)
            .map(|(_, v)| v)
    }

    /// Sets (or replaces) field `name`.
    pub fn set_field(&mut self, name: &str, value: Value) {
        match self.fields.iter_mut().find(|(k, _)| &**k == name) {
            Some(slot) => slot.1 = value,
            None => self.fields.push((intern(name), value)),
        }
    }

    /// Sets field `name` with an already shared name (no interner lookup on the hot path).
    pub fn set_field_named(&mut self, name: &Name, value: Value) {
        match self
            .fields
            .iter_mut()
            .find(|(k, _)| Arc::ptr_eq(k, name) || k == name)
        {
            Some(slot) => slot.1 = value,
            None => self.fields.push((name.clone(), value)),
        }
    }

    /// Removes field `name`, returning its value.
    pub fn remove_field(&mut self, name: &str) -> Option<Value> {
        let pos = self.fields.iter().position(|(k, _)| &**k == name)?;
        Some(self.fields.remove(pos).1)
    }

    /// A rough size in bytes, used by sink batching (`max_bytes`) and byte metrics.
    pub fn size_hint(&self) -> usize {
        let tags: usize = self.tags.iter().map(|(k, v)| k.len() + v.len()).sum();
        let fields: usize = self
            .fields
            .iter()
            .map(|(k, v)| {
                k.len()
                    + match v {
                        Value::Str(s) => s.len(),
                        _ => 8,
                    }
            })
            .sum();
        16 + tags + fields + self.payload.as_ref().map_or(0, Bytes::len)
    }

    /// Reports this record's final status to its source(s) (no-op when it has no finalizer).
    pub fn finalize(&mut self, status: BatchStatus) {
        std::mem::take(&mut self.finalizers).finish(status);
    }

    /// Drops the record on purpose (a filter, a deduplication): it counts as delivered.
    pub fn discard(mut self) {
        self.finalize(BatchStatus::Delivered);
    }
}

/// A batch of records: the unit sent through channels.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    pub records: Vec<Record>,
}

impl Batch {
    pub fn new(records: Vec<Record>) -> Self {
        Batch { records }
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Sum of [`Record::size_hint`] over the batch.
    pub fn size_hint(&self) -> usize {
        self.records.iter().map(Record::size_hint).sum()
    }

    /// Reports `status` for every record of the batch and releases their finalizers.
    pub fn finalize(&mut self, status: BatchStatus) {
        for r in &mut self.records {
            r.finalize(status);
        }
    }
}

impl From<Vec<Record>> for Batch {
    fn from(records: Vec<Record>) -> Self {
        Batch { records }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interned_names_are_shared() {
        let a = intern("temp");
        let b = intern("temp");
        assert!(Arc::ptr_eq(&a, &b));
    }

    /// Device-chosen names (a new JSON key per message) must not grow the interner forever.
    #[test]
    fn interner_is_bounded() {
        let held = intern("still-held-name");
        for i in 0..100_000 {
            let n = intern(&format!("device-chosen-{i}"));
            assert_eq!(&*n, format!("device-chosen-{i}"));
        }
        assert!(
            interned_len() <= MAX_INTERNED,
            "{} names interned",
            interned_len()
        );
        // Names still in use stay shared through the sweeps.
        assert!(Arc::ptr_eq(&held, &intern("still-held-name")));
        assert!(interned_len() <= MAX_INTERNED);
    }

    #[test]
    fn set_and_replace_tags_and_fields() {
        let mut r = Record::new(5);
        r.set_tag("device_id", "a");
        r.set_tag("device_id", "b");
        assert_eq!(r.tags.len(), 1);
        assert_eq!(r.tag("device_id"), Some("b"));
        r.set_field("temp", Value::I64(3));
        r.set_field_named(&intern("temp"), Value::F64(4.5));
        assert_eq!(r.fields.len(), 1);
        assert_eq!(r.field("temp"), Some(&Value::F64(4.5)));
        assert_eq!(r.remove_field("temp"), Some(Value::F64(4.5)));
        assert!(r.field("temp").is_none());
        assert_eq!(r.remove_tag("device_id").as_deref(), Some("b"));
    }

    #[test]
    fn null_is_not_absent() {
        let mut r = Record::new(0);
        r.set_field("x", Value::Null);
        assert_eq!(r.field("x"), Some(&Value::Null));
        assert_eq!(r.field("y"), None);
    }
}
