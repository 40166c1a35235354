//! Payload decoding shared by every source (`decode = { codec = "json", … }`).
//!
//! Codecs:
//! * `json` (default): a JSON object per payload. Its `time_key` (default `ts`) is the event
//!   time; keys listed in `tags` become tags; every other scalar becomes a typed field (nested
//!   objects are flattened with `.`: `{"gps":{"lat":1}}` → `gps.lat`). When `fields` is set,
//!   only those keys become fields.
//! * `record`: sluice's own record JSON (what the `file` sink writes), see [`crate::json`].
//! * `line_protocol`: InfluxDB line protocol, one record per line (a payload may hold many);
//!   the measurement becomes the tag `measurement`, tags stay tags, fields keep their types,
//!   the timestamp is read in `time_unit` (InfluxDB writes nanoseconds by default: set
//!   `time_unit = "ns"`); a line without one gets the receive time. Each bad line is
//!   dead-lettered on its own.
//! * `raw`: no parsing; the payload is kept on the record and the receive time is the event time.
//!
//! With `topic_pattern = "devices/{device_id}/data"` the captures of the message's topic
//! become tags. Payloads that cannot be decoded, are larger than `max_payload`, or whose topic
//! does not match the pattern produce a [`DecodeError`]; sources send those records (with the
//! payload and the error text) to their `dead_letter` output.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::config::ByteSize;
use crate::json::{self, json_scalar};
use crate::record::{intern, Meta, Name, Record, Value};
use crate::topic::TopicPattern;

/// Payload format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Codec {
    /// A JSON object mapped to tags and fields.
    #[default]
    Json,
    /// Sluice's record JSON shape (as written by the `file` sink).
    Record,
    /// InfluxDB line protocol, one record per line.
    LineProtocol,
    /// Keep the payload as is.
    Raw,
}

/// Unit of numeric event times.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TimeUnit {
    S,
    #[default]
    Ms,
    Us,
    Ns,
}

impl TimeUnit {
    /// Nanoseconds in one unit.
    fn nanos(self) -> i64 {
        match self {
            TimeUnit::S => 1_000_000_000,
            TimeUnit::Ms => 1_000_000,
            TimeUnit::Us => 1_000,
            TimeUnit::Ns => 1,
        }
    }

    /// An integer time in this unit as ns; exact (f64 would round nanoseconds).
    fn int_to_ns(self, v: i64) -> Option<i64> {
        v.checked_mul(self.nanos())
    }

    fn to_ns(self, v: f64) -> Option<i64> {
        let ns = v * self.nanos() as f64;
        (ns.is_finite() && ns.abs() < 9.2e18).then_some(ns as i64)
    }
}

/// How a source turns payloads into records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DecodeConfig {
    /// Payload format: `json` (default), `record`, `line_protocol` or `raw`.
    #[serde(default)]
    pub codec: Codec,
    /// JSON key holding the event time (number in `time_unit`, or an RFC 3339 string). When
    /// absent from a payload, the receive time is used. Default "ts".
    #[serde(default = "default_time_key")]
    pub time_key: String,
    /// Unit of numeric times: `s`, `ms` (default), `us`, `ns`.
    #[serde(default)]
    pub time_unit: TimeUnit,
    /// JSON keys whose values become tags instead of fields. Default [].
    #[serde(default)]
    pub tags: Vec<String>,
    /// When set, only these JSON keys become fields (others are ignored). Default: all.
    #[serde(default)]
    pub fields: Option<Vec<String>>,
    /// Topic pattern whose `{name}` segments become tags, e.g. "devices/{device_id}/data".
    /// A message whose topic does not match goes to `dead_letter`. Default: none.
    #[serde(default)]
    pub topic_pattern: Option<String>,
    /// Keep the raw payload on decoded records (always kept for `raw` and dead letters).
    /// Default false.
    #[serde(default)]
    pub keep_payload: bool,
    /// Larger payloads go to `dead_letter` without being parsed. Default "1MiB".
    #[serde(default = "default_max_payload")]
    pub max_payload: ByteSize,
}

fn default_time_key() -> String {
    "ts".into()
}
fn default_max_payload() -> ByteSize {
    ByteSize(1024 * 1024)
}

impl Default for DecodeConfig {
    fn default() -> Self {
        DecodeConfig {
            codec: Codec::Json,
            time_key: default_time_key(),
            time_unit: TimeUnit::Ms,
            tags: Vec::new(),
            fields: None,
            topic_pattern: None,
            keep_payload: false,
            max_payload: default_max_payload(),
        }
    }
}

/// Why a payload could not become a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// A compiled [`DecodeConfig`]. Keeps a small cache of names so the hot path does not touch
/// the global interner.
#[derive(Debug, Clone)]
pub struct Decoder {
    config: DecodeConfig,
    topic: Option<TopicPattern>,
    names: HashMap<Box<str>, Name>,
    /// The top-level keys of the last JSON payload, by position: telemetry repeats its keys
    /// in the same order, so most lookups are one string comparison instead of a hash.
    recent: Vec<Option<Name>>,
    /// The last string value seen at each top-level position (a status that rarely changes
    /// is then one shared allocation, not one per record).
    recent_values: Vec<Option<Arc<str>>>,
    /// Tag values seen lately (tags are series identifiers: few distinct values, repeated).
    tag_values: HashSet<Arc<str>>,
    /// Tags and fields of the last record: the next one reserves as many (one allocation each).
    tags_hint: usize,
    fields_hint: usize,
}

impl Decoder {
    /// Compiles `config`; the error names the bad option.
    pub fn new(config: DecodeConfig) -> Result<Self, String> {
        let topic = match &config.topic_pattern {
            Some(p) => {
                Some(TopicPattern::new(p).map_err(|e| format!("decode.topic_pattern: {e}"))?)
            }
            None => None,
        };
        Ok(Decoder {
            config,
            topic,
            names: HashMap::new(),
            recent: Vec::new(),
            recent_values: Vec::new(),
            tag_values: HashSet::new(),
            tags_hint: 0,
            fields_hint: 0,
        })
    }

    /// The largest payload accepted (`max_payload`), in bytes: line readers stop buffering
    /// a line beyond it.
    pub fn max_payload(&self) -> u64 {
        self.config.max_payload.0
    }

    /// The topic pattern, if configured.
    pub fn topic_pattern(&self) -> Option<&TopicPattern> {
        self.topic.as_ref()
    }

    fn name(&mut self, key: &str) -> Name {
        if let Some(n) = self.names.get(key) {
            return n.clone();
        }
        let n = intern(key);
        if self.names.len() < 4096 {
            self.names.insert(key.into(), n.clone());
        }
        n
    }

    /// [`Decoder::name`] of the `pos`-th top-level key, checked first against the key seen at
    /// that position in the last payload.
    fn name_at(&mut self, pos: usize, key: &str) -> Name {
        if let Some(Some(n)) = self.recent.get(pos) {
            if **n == *key {
                return n.clone();
            }
        }
        let n = self.name(key);
        if pos < 64 {
            // Positions of the time key and of skipped keys stay empty.
            if pos >= self.recent.len() {
                self.recent.resize(pos + 1, None);
            }
            self.recent[pos] = Some(n.clone());
        }
        n
    }

    /// The string value `s` at top-level position `pos`: the last one's allocation when equal.
    fn value_at(&mut self, pos: usize, s: &str) -> Arc<str> {
        if let Some(Some(v)) = self.recent_values.get(pos) {
            if **v == *s {
                return v.clone();
            }
        }
        let v: Arc<str> = Arc::from(s);
        if pos < 64 && s.len() <= MAX_SHARED_LEN {
            if pos >= self.recent_values.len() {
                self.recent_values.resize(pos + 1, None);
            }
            self.recent_values[pos] = Some(v.clone());
        }
        v
    }

    /// Decodes one payload. `received` (ns since epoch) is the event time when the payload
    /// has none. On error the record to dead-letter is built with [`Decoder::dead_letter`].
    pub fn decode(
        &mut self,
        payload: Bytes,
        topic: Option<&str>,
        received: i64,
        mut meta: Meta,
    ) -> Result<Record, DecodeError> {
        self.decode_ref(&payload, topic, received, &mut meta)
    }

    /// [`Decoder::decode`] without taking the payload and metadata: on success the record
    /// takes `meta`'s source and origin; on error both are left whole for the dead letter
    /// (so the hot path clones neither).
    fn decode_ref(
        &mut self,
        payload: &Bytes,
        topic: Option<&str>,
        received: i64,
        meta: &mut Meta,
    ) -> Result<Record, DecodeError> {
        if payload.len() as u64 > self.config.max_payload.0 {
            return Err(DecodeError(format!(
                "payload of {} bytes exceeds max_payload ({})",
                payload.len(),
                self.config.max_payload
            )));
        }
        let mut record = match self.config.codec {
            Codec::Raw => Record::new(received),
            Codec::Record => json::from_json(payload).map_err(DecodeError)?,
            Codec::LineProtocol => {
                let text = std::str::from_utf8(payload)
                    .map_err(|e| DecodeError(format!("line protocol is not UTF-8: {e}")))?;
                self.decode_line(text.trim_end(), received)?
            }
            Codec::Json => self.decode_json(payload, received)?,
        };
        if self.config.keep_payload || self.config.codec == Codec::Raw {
            record.payload = Some(payload.clone());
        }
        if let (Some(pattern), Some(topic)) = (&self.topic, topic) {
            // Straight into the record: on a mismatch the record is dropped anyway.
            let tags = &mut record.tags;
            let cache = &mut self.tag_values;
            let matched = pattern.captures(topic, |n, v| {
                let v = shared_tag_value(cache, v);
                match tags.iter_mut().find(|(k, _)| k == n) {
                    Some(slot) => slot.1 = v,
                    None => tags.push((n.clone(), v)),
                }
            });
            if !matched {
                return Err(DecodeError(format!(
                    "topic {topic:?} does not match topic_pattern {:?}",
                    pattern.as_str()
                )));
            }
        }
        self.tags_hint = record.tags.len();
        self.fields_hint = record.fields.len();
        if record.meta.source.is_none() {
            record.meta.source = meta.source.take();
        }
        if record.meta.origin == Default::default() {
            record.meta.origin = std::mem::take(&mut meta.origin);
        }
        Ok(record)
    }

    /// The dead-letter record for a payload that failed with `error`: receive time, the raw
    /// payload and the error text.
    pub fn dead_letter(payload: Bytes, received: i64, meta: Meta, error: &DecodeError) -> Record {
        let mut r = Record::new(received);
        r.payload = Some(payload);
        r.meta = meta;
        r.meta.error = Some(Arc::from(error.0.as_str()));
        r
    }

    fn decode_line(&mut self, line: &str, received: i64) -> Result<Record, DecodeError> {
        let parsed = crate::line_protocol::parse_line(line)
            .map_err(|e| DecodeError(format!("invalid line protocol: {e}")))?;
        let time = match parsed.time {
            Some(t) => self
                .config
                .time_unit
                .int_to_ns(t)
                .ok_or_else(|| DecodeError(format!("timestamp {t} is out of range")))?,
            None => received,
        };
        let mut record = Record::new(time);
        let measurement = self.name("measurement");
        record
            .tags
            .push((measurement, Arc::from(parsed.measurement.as_str())));
        for (k, v) in parsed.tags {
            let n = self.name(&k);
            record.tags.push((n, Arc::from(v.as_str())));
        }
        for (k, v) in parsed.fields {
            if let Some(only) = &self.config.fields {
                if !only.contains(&k) {
                    continue;
                }
            }
            let n = self.name(&k);
            record.fields.push((n, v));
        }
        Ok(record)
    }

    /// Whether payloads may hold several records (line protocol: one per line).
    pub fn is_multi_record(&self) -> bool {
        self.config.codec == Codec::LineProtocol
    }

    fn decode_json(&mut self, payload: &[u8], received: i64) -> Result<Record, DecodeError> {
        // Streams the top-level object straight into the record: no intermediate map of
        // owned keys per message (the hot path of every JSON source).
        let mut record = Record::new(received);
        // Room for the topic captures too, so they do not grow the vector again.
        record.tags.reserve(self.tags_hint);
        record.fields.reserve(self.fields_hint);
        let mut failure: Option<DecodeError> = None;
        let mut de = serde_json::Deserializer::from_slice(payload);
        let visitor = ObjectVisitor {
            decoder: self,
            record: &mut record,
            failure: &mut failure,
        };
        let result = serde::Deserializer::deserialize_any(&mut de, visitor).and_then(|()| de.end());
        if let Some(e) = failure {
            return Err(e);
        }
        if let Err(e) = result {
            // Slow path for the error message only: not JSON, or JSON but not an object.
            return Err(match serde_json::from_slice::<Json>(payload) {
                Ok(Json::Object(_)) | Err(_) => DecodeError(format!("invalid JSON: {e}")),
                Ok(other) => DecodeError(format!(
                    "expected a JSON object, found {}",
                    json_kind(&other)
                )),
            });
        }
        Ok(record)
    }

    /// The `pos`-th top-level entry of a JSON object.
    fn json_entry(
        &mut self,
        record: &mut Record,
        pos: usize,
        key: &str,
        item: Item<'_>,
    ) -> Result<(), DecodeError> {
        if key == self.config.time_key {
            record.time = self.time(item)?;
        } else if self.config.tags.iter().any(|t| t == key) {
            let s: Arc<str> = match item {
                Item::Str(s) => shared_tag_value(&mut self.tag_values, &s),
                Item::Null => return Ok(()),
                Item::Nested(_) => {
                    return Err(DecodeError(format!("tag `{key}` must be a scalar")))
                }
                other => Arc::from(other.into_json().to_string().as_str()),
            };
            let n = self.name_at(pos, key);
            // A repeated key: the last value wins (as with a parsed map).
            match record.tags.iter_mut().find(|(k, _)| *k == n) {
                Some(slot) => slot.1 = s,
                None => record.tags.push((n, s)),
            }
        } else {
            let value = match item {
                Item::Nested(v) => {
                    self.add_field(record, key, &v);
                    return Ok(());
                }
                Item::Null => Value::Null,
                Item::Bool(b) => Value::Bool(b),
                Item::I64(i) => Value::I64(i),
                Item::U64(u) => match i64::try_from(u) {
                    Ok(i) => Value::I64(i),
                    Err(_) => Value::F64(u as f64),
                },
                Item::F64(f) => Value::F64(f),
                Item::Str(s) => Value::Str(self.value_at(pos, &s)),
            };
            if let Some(only) = &self.config.fields {
                if !only.iter().any(|f| f == key) {
                    return Ok(());
                }
            }
            let n = self.name_at(pos, key);
            match record.fields.iter_mut().find(|(k, _)| *k == n) {
                Some(slot) => slot.1 = value,
                None => record.fields.push((n, value)),
            }
        }
        Ok(())
    }

    fn add_field(&mut self, record: &mut Record, key: &str, v: &Json) {
        match v {
            Json::Object(inner) => {
                for (k, v) in inner {
                    self.add_field(record, &format!("{key}.{k}"), v);
                }
            }
            _ => {
                if let Some(only) = &self.config.fields {
                    if !only.iter().any(|f| f == key) {
                        return;
                    }
                }
                let value =
                    json_scalar(v).unwrap_or_else(|| Value::Str(Arc::from(v.to_string().as_str())));
                let n = self.name(key);
                match record.fields.iter_mut().find(|(k, _)| *k == n) {
                    Some(slot) => slot.1 = value,
                    None => record.fields.push((n, value)),
                }
            }
        }
    }

    fn time(&self, item: Item<'_>) -> Result<i64, DecodeError> {
        let key = &self.config.time_key;
        let unit = self.config.time_unit;
        let out_of_range =
            |n: &dyn std::fmt::Display| DecodeError(format!("time `{key}` = {n} is out of range"));
        match item {
            Item::I64(i) => unit.int_to_ns(i).ok_or_else(|| out_of_range(&i)),
            Item::U64(u) => match i64::try_from(u) {
                Ok(i) => unit.int_to_ns(i),
                Err(_) => unit.to_ns(u as f64),
            }
            .ok_or_else(|| out_of_range(&u)),
            Item::F64(f) => unit
                .to_ns(f)
                .ok_or_else(|| match serde_json::Number::from_f64(f) {
                    Some(n) => out_of_range(&n),
                    None => out_of_range(&f),
                }),
            Item::Str(s) => {
                json::parse_time(&s).map_err(|e| DecodeError(format!("time `{key}`: {e}")))
            }
            other => Err(DecodeError(format!(
                "time `{key}` must be a number or an RFC 3339 string, found {}",
                json_kind(&other.into_json())
            ))),
        }
    }
}

/// Longest string value shared between records (longer ones are rarely repeated).
const MAX_SHARED_LEN: usize = 64;

/// Most tag values [`shared_tag_value`] remembers before it starts over.
const MAX_TAG_VALUES: usize = 4096;

/// The tag value `s`, sharing the allocation of an equal value seen lately. The set is
/// bounded: when full it starts over, so a stream of ever new values costs a lookup each but
/// never more memory.
fn shared_tag_value(cache: &mut HashSet<Arc<str>>, s: &str) -> Arc<str> {
    if let Some(v) = cache.get(s) {
        return v.clone();
    }
    let v: Arc<str> = Arc::from(s);
    if s.len() <= MAX_SHARED_LEN {
        if cache.len() >= MAX_TAG_VALUES {
            cache.clear();
        }
        cache.insert(v.clone());
    }
    v
}

/// Records decoded from a run of payloads, split into good ones and dead letters, ready to
/// send as (at most) two batches.
#[derive(Debug, Default)]
pub struct Decoded {
    pub records: Vec<Record>,
    pub dead: Vec<Record>,
}

impl Decoded {
    pub fn with_capacity(n: usize) -> Self {
        Decoded {
            records: Vec::with_capacity(n),
            dead: Vec::new(),
        }
    }

    /// Decodes one payload into `records`, or into `dead` with the error attached.
    pub fn push(
        &mut self,
        decoder: &mut Decoder,
        payload: Bytes,
        topic: Option<&str>,
        received: i64,
        meta: Meta,
    ) {
        if decoder.is_multi_record() && payload.contains(&b'\n') {
            // One record per line; every bad line is dead-lettered on its own.
            let mut start = 0;
            for (i, b) in payload.iter().enumerate() {
                if *b == b'\n' || i + 1 == payload.len() {
                    let end = if *b == b'\n' { i } else { i + 1 };
                    let line = payload.slice(start..end);
                    start = i + 1;
                    let trimmed = line.trim_ascii();
                    if trimmed.is_empty() || trimmed.starts_with(b"#") {
                        continue;
                    }
                    self.push_one(decoder, line, topic, received, meta.clone());
                }
            }
            return;
        }
        self.push_one(decoder, payload, topic, received, meta);
    }

    fn push_one(
        &mut self,
        decoder: &mut Decoder,
        payload: Bytes,
        topic: Option<&str>,
        received: i64,
        mut meta: Meta,
    ) {
        match decoder.decode_ref(&payload, topic, received, &mut meta) {
            Ok(r) => self.records.push(r),
            Err(e) => self
                .dead
                .push(Decoder::dead_letter(payload, received, meta, &e)),
        }
    }

    pub fn len(&self) -> usize {
        self.records.len() + self.dead.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.dead.is_empty()
    }

    /// Gives every record (good and dead) a clone of `finalizer`.
    pub fn attach(&mut self, finalizer: &crate::ack::Finalizer) {
        for r in self.records.iter_mut().chain(self.dead.iter_mut()) {
            r.finalizers.push(finalizer.clone());
        }
    }

    /// Sends the good records to the default output and the rest to `dead_letter`, counting
    /// records in and decode errors.
    pub async fn send(self, out: &crate::channel::Outputs) -> Result<(), crate::channel::Closed> {
        let m = out.metrics();
        m.add_in(self.len());
        if !self.dead.is_empty() {
            m.add_errors(self.dead.len());
            out.send_to(
                crate::channel::DEAD_LETTER,
                crate::record::Batch::new(self.dead),
            )
            .await?;
        }
        out.send(crate::record::Batch::new(self.records)).await
    }
}

/// Feeds the entries of a top-level JSON object to [`Decoder::json_entry`] as they are parsed.
struct ObjectVisitor<'a> {
    decoder: &'a mut Decoder,
    record: &'a mut Record,
    failure: &'a mut Option<DecodeError>,
}

impl<'de> serde::de::Visitor<'de> for ObjectVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut pos = 0;
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let item = map.next_value_seed(ItemSeed)?;
            if let Err(e) = self.decoder.json_entry(self.record, pos, &key, item) {
                *self.failure = Some(e);
                return Err(serde::de::Error::custom("invalid entry"));
            }
            pos += 1;
        }
        Ok(())
    }
}

/// A map key, borrowed from the input when it has no escapes.
struct KeySeed;

impl<'de> serde::de::DeserializeSeed<'de> for KeySeed {
    type Value = std::borrow::Cow<'de, str>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(KeySeed)
    }
}

impl<'de> serde::de::Visitor<'de> for KeySeed {
    type Value = std::borrow::Cow<'de, str>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string key")
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Borrowed(v))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Owned(v.to_string()))
    }
}

/// A top-level JSON value as the `json` codec needs it: scalars are read straight from the
/// input (a string without escapes is borrowed), so only nested values build a
/// `serde_json::Value`.
enum Item<'de> {
    Null,
    Bool(bool),
    I64(i64),
    U64(u64),
    F64(f64),
    Str(std::borrow::Cow<'de, str>),
    /// An object (flattened into fields) or an array (kept as its JSON text).
    Nested(Json),
}

impl Item<'_> {
    /// The value as `serde_json` would have parsed it (for error messages and odd tag types).
    fn into_json(self) -> Json {
        match self {
            Item::Null => Json::Null,
            Item::Bool(b) => Json::Bool(b),
            Item::I64(i) => Json::from(i),
            Item::U64(u) => Json::from(u),
            // Parsed JSON numbers are finite.
            Item::F64(f) => serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number),
            Item::Str(s) => Json::String(s.into_owned()),
            Item::Nested(v) => v,
        }
    }
}

struct ItemSeed;

impl<'de> serde::de::DeserializeSeed<'de> for ItemSeed {
    type Value = Item<'de>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(ItemSeed)
    }
}

impl<'de> serde::de::Visitor<'de> for ItemSeed {
    type Value = Item<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(Item::Null)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(Item::Null)
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Item::Bool(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Item::I64(v))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Item::U64(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Item::F64(v))
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Item::Str(std::borrow::Cow::Borrowed(v)))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Item::Str(std::borrow::Cow::Owned(v.to_string())))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Item::Str(std::borrow::Cow::Owned(v)))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        serde::Deserialize::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
            .map(Item::Nested)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        serde::Deserialize::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            .map(Item::Nested)
    }
}

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder(f: impl FnOnce(&mut DecodeConfig)) -> Decoder {
        let mut c = DecodeConfig::default();
        f(&mut c);
        Decoder::new(c).expect("valid")
    }

    #[test]
    fn json_streaming_edge_cases() {
        let mut d = decoder(|c| c.tags = vec!["site".into()]);
        let r = d
            .decode(
                Bytes::from_static(
                    br#"{"a\u0062":1,"site":"x","t":{"in":{"deep":2}},"a":[1,2],"ab":3,"site":"y"}"#,
                ),
                None,
                7,
                Meta::default(),
            )
            .expect("decodes");
        assert_eq!(
            r.field("ab"),
            Some(&Value::I64(3)),
            "repeated key: last wins"
        );
        assert_eq!(r.fields.iter().filter(|(k, _)| &**k == "ab").count(), 1);
        assert_eq!(r.tag("site"), Some("y"));
        assert_eq!(r.field("t.in.deep"), Some(&Value::I64(2)));
        assert_eq!(r.field("a"), Some(&Value::Str("[1,2]".into())));
        assert_eq!(r.time, 7);
        let err = d
            .decode(Bytes::from_static(b"[1]"), None, 0, Meta::default())
            .expect_err("array");
        assert!(
            err.0.contains("expected a JSON object, found an array"),
            "{err}"
        );
        let err = d
            .decode(Bytes::from_static(b"{\"a\":1"), None, 0, Meta::default())
            .expect_err("cut");
        assert!(err.0.starts_with("invalid JSON"), "{err}");
        let err = d
            .decode(Bytes::from_static(b"{\"a\":1} x"), None, 0, Meta::default())
            .expect_err("trailing");
        assert!(err.0.starts_with("invalid JSON"), "{err}");
        let err = d
            .decode(
                Bytes::from_static(br#"{"ts":"nope"}"#),
                None,
                0,
                Meta::default(),
            )
            .expect_err("bad time");
        assert!(err.0.contains("time `ts`"), "{err}");
    }

    /// The `json` codec as it was defined on a parsed `serde_json::Value` (top-level entries in
    /// order, tags as strings, nested objects flattened, arrays as JSON text, the last of a
    /// repeated key wins): the streaming decoder must give the same record.
    type Tags = Vec<(String, String)>;
    type Fields = Vec<(String, Value)>;

    fn reference(payload: &[u8], tags: &[&str]) -> (Tags, Fields) {
        fn flatten(key: &str, v: &Json, out: &mut Fields) {
            match v {
                Json::Object(m) => m
                    .iter()
                    .for_each(|(k, v)| flatten(&format!("{key}.{k}"), v, out)),
                _ => {
                    let value = json_scalar(v).unwrap_or_else(|| Value::Str(v.to_string().into()));
                    match out.iter_mut().find(|(k, _)| k == key) {
                        Some(slot) => slot.1 = value,
                        None => out.push((key.to_string(), value)),
                    }
                }
            }
        }
        let Ok(Json::Object(map)) = serde_json::from_slice::<Json>(payload) else {
            panic!("reference payloads are objects");
        };
        let (mut t, mut f) = (Vec::new(), Vec::new());
        for (k, v) in &map {
            if k == "ts" {
                continue;
            }
            if tags.contains(&k.as_str()) {
                match v {
                    Json::Null => {}
                    Json::String(s) => t.push((k.clone(), s.clone())),
                    other => t.push((k.clone(), other.to_string())),
                }
            } else {
                flatten(k, v, &mut f);
            }
        }
        (t, f)
    }

    #[test]
    fn streaming_json_matches_the_value_definition() {
        let tags = ["site", "n", "flag"];
        let mut d = decoder(|c| c.tags = tags.iter().map(|t| t.to_string()).collect());
        let payloads: &[&[u8]] = &[
            br#"{"ts":1,"temp":21.5,"site":"a","status":"online","seq":3}"#,
            br#"{"ts":2,"temp":21.25,"site":"b","status":"offline","seq":4}"#,
            br#"{"seq":5,"temp":-0.0,"site":"c\u00e9\n","ts":3}"#,
            br#"{"big":18446744073709551615,"neg":-9223372036854775808,"i":9223372036854775807}"#,
            br#"{"n":1.5e3,"flag":true,"site":null,"x":null,"e":"esc\"aped"}"#,
            br#"{"gps":{"lat":1.5,"lon":{"deg":2}},"arr":[1,"two",{"three":3.0}],"gps.lat":7}"#,
            br#"{"f":92.27798059999999,"g":2.2250738585072014e-308,"h":1e300,"k":0.3}"#,
            br#"{"a":1,"a":"again","site":"x","site":"y","empty":{},"list":[]}"#,
            br#"{}"#,
        ];
        for p in payloads {
            let r = d
                .decode(Bytes::from_static(p), None, 0, Meta::default())
                .expect("decodes");
            let (t, f) = reference(p, &tags);
            let got_t: Tags = r
                .tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let got_f: Fields = r
                .fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            let text = String::from_utf8_lossy(p);
            assert_eq!(got_t, t, "tags of {text}");
            assert_eq!(got_f.len(), f.len(), "fields of {text}: {got_f:?}");
            for ((gk, gv), (k, v)) in got_f.iter().zip(&f) {
                assert_eq!(gk, k, "{text}");
                match (gv, v) {
                    (Value::F64(a), Value::F64(b)) => {
                        assert_eq!(a.to_bits(), b.to_bits(), "{text}")
                    }
                    _ => assert_eq!(gv, v, "{text}"),
                }
            }
        }
        let err = d
            .decode(
                Bytes::from_static(br#"{"site":{"a":1}}"#),
                None,
                0,
                Meta::default(),
            )
            .expect_err("object tag");
        assert_eq!(err.0, "tag `site` must be a scalar");
        let err = d
            .decode(
                Bytes::from_static(br#"{"ts":1e30}"#),
                None,
                0,
                Meta::default(),
            )
            .expect_err("time out of range");
        // As `serde_json::Number` prints it (the message of a parsed `Value`).
        let n = serde_json::Number::from_f64(1e30).expect("finite");
        assert_eq!(err.0, format!("time `ts` = {n} is out of range"));
        let err = d
            .decode(
                Bytes::from_static(br#"{"ts":[1]}"#),
                None,
                0,
                Meta::default(),
            )
            .expect_err("array time");
        assert!(err.0.ends_with("found an array"), "{err}");
    }

    /// The hot path no longer clones the payload and metadata per record: a dead letter must
    /// still get both whole, and a good record the source's metadata.
    #[test]
    fn dead_letters_keep_payload_and_metadata() {
        let mut d = decoder(|c| c.topic_pattern = Some("devices/{id}/data".into()));
        let meta = Meta {
            source: Some(intern("src")),
            origin: crate::record::Origin::Mqtt {
                topic: Arc::from("devices/a/data"),
            },
            error: None,
        };
        let mut out = Decoded::default();
        for (payload, topic) in [
            (&b"{\"a\":1}"[..], "devices/a/data"),
            (&b"{\"a\":"[..], "devices/a/data"),
            (&b"{\"a\":2}"[..], "elsewhere"),
        ] {
            out.push(
                &mut d,
                Bytes::from_static(payload),
                Some(topic),
                9,
                meta.clone(),
            );
        }
        assert_eq!(out.records.len(), 1);
        assert_eq!(out.records[0].meta, meta);
        assert!(out.records[0].payload.is_none());
        assert_eq!(out.dead.len(), 2);
        for (dead, payload) in out.dead.iter().zip([&b"{\"a\":"[..], &b"{\"a\":2}"[..]]) {
            assert_eq!(dead.payload.as_deref(), Some(payload));
            assert_eq!(dead.meta.source, meta.source);
            assert_eq!(dead.meta.origin, meta.origin);
            assert!(dead.meta.error.is_some());
            assert_eq!(dead.time, 9);
        }
    }

    /// Repeated tag values and unchanged string fields share one allocation; the tag value
    /// set stays bounded under ever new values, which still decode correctly.
    #[test]
    fn repeated_strings_are_shared_and_the_cache_is_bounded() {
        let mut d = decoder(|c| {
            c.tags = vec!["site".into()];
            c.topic_pattern = Some("devices/{device_id}/data".into());
        });
        let mut decode = |p: String, t: &str| {
            d.decode(Bytes::from(p), Some(t), 0, Meta::default())
                .expect("decodes")
        };
        let a = decode(
            r#"{"site":"n1","status":"online"}"#.into(),
            "devices/d1/data",
        );
        let b = decode(
            r#"{"site":"n1","status":"online"}"#.into(),
            "devices/d1/data",
        );
        let same_tag = |n: &str| {
            let find = |r: &Record| {
                r.tags
                    .iter()
                    .find(|(k, _)| &**k == n)
                    .map(|(_, v)| v.clone())
            };
            Arc::ptr_eq(&find(&a).expect("tag"), &find(&b).expect("tag"))
        };
        assert!(same_tag("site") && same_tag("device_id"));
        match (a.field("status"), b.field("status")) {
            (Some(Value::Str(x)), Some(Value::Str(y))) => assert!(Arc::ptr_eq(x, y)),
            other => panic!("status: {other:?}"),
        }
        for i in 0..3 * MAX_TAG_VALUES {
            let r = decode(
                format!(r#"{{"site":"s{i}","status":"st{i}"}}"#),
                &format!("devices/d{i}/data"),
            );
            assert_eq!(r.tag("site"), Some(format!("s{i}").as_str()));
            assert_eq!(r.tag("device_id"), Some(format!("d{i}").as_str()));
            assert_eq!(
                r.field("status"),
                Some(&Value::Str(format!("st{i}").into()))
            );
        }
        assert!(
            d.tag_values.len() <= MAX_TAG_VALUES,
            "{}",
            d.tag_values.len()
        );
    }

    #[test]
    fn json_with_time_tags_fields_and_topic() {
        let mut d = decoder(|c| {
            c.tags = vec!["device_status".into()];
            c.topic_pattern = Some("devices/{device_id}/data".into());
        });
        let payload = Bytes::from_static(
            br#"{"ts":1764000000123,"temp":21.5,"humidity":40,"device_status":"online","gps":{"lat":1.5}}"#,
        );
        let r = d
            .decode(payload, Some("devices/d1/data"), 0, Meta::default())
            .expect("decodes");
        assert_eq!(r.time, 1_764_000_000_123_000_000);
        assert_eq!(r.tag("device_status"), Some("online"));
        assert_eq!(r.tag("device_id"), Some("d1"));
        assert_eq!(r.field("temp"), Some(&Value::F64(21.5)));
        assert_eq!(r.field("humidity"), Some(&Value::I64(40)));
        assert_eq!(r.field("gps.lat"), Some(&Value::F64(1.5)));
        assert!(r.payload.is_none());
    }

    #[test]
    fn errors_are_clear() {
        let mut d = decoder(|c| c.topic_pattern = Some("devices/{id}/data".into()));
        let err = |d: &mut Decoder, p: &'static [u8], t: &str| {
            d.decode(Bytes::from_static(p), Some(t), 0, Meta::default())
                .expect_err("fails")
                .0
        };
        assert!(err(&mut d, b"{\"temp\":", "devices/a/data").starts_with("invalid JSON"));
        assert_eq!(
            err(&mut d, b"[1]", "devices/a/data"),
            "expected a JSON object, found an array"
        );
        assert!(err(&mut d, b"{}", "other/a").contains("does not match topic_pattern"));
        assert!(err(&mut d, b"{\"ts\":true}", "devices/a/data").contains("must be a number"));
        let mut small = decoder(|c| c.max_payload = ByteSize(4));
        assert!(err(&mut small, b"{\"a\":1}", "x").contains("exceeds max_payload"));
    }

    #[test]
    fn field_selection_and_time_strings() {
        let mut d = decoder(|c| {
            c.fields = Some(vec!["temp".into()]);
            c.time_key = "time".into();
        });
        let r = d
            .decode(
                Bytes::from_static(br#"{"time":"2026-01-01T00:00:00Z","temp":1,"other":2}"#),
                None,
                0,
                Meta::default(),
            )
            .expect("decodes");
        assert_eq!(r.time, 1_767_225_600_000_000_000);
        assert_eq!(r.fields.len(), 1);
    }

    #[test]
    fn line_protocol_one_record_per_line_and_bad_lines_dead_lettered() {
        let mut d = decoder(|c| {
            c.codec = Codec::LineProtocol;
            c.time_unit = TimeUnit::Ns;
        });
        let mut out = Decoded::default();
        let payload = Bytes::from_static(
            b"weather,site=a temp=21.5,n=3i 1700000000000000001\n# comment\n\nbroken line\nweather,site=b ok=true\n",
        );
        out.push(&mut d, payload, None, 42, Meta::default());
        assert_eq!(out.records.len(), 2);
        assert_eq!(out.dead.len(), 1);
        let r = &out.records[0];
        assert_eq!(r.time, 1_700_000_000_000_000_001);
        assert_eq!(r.tag("measurement"), Some("weather"));
        assert_eq!(r.tag("site"), Some("a"));
        assert_eq!(r.field("temp"), Some(&Value::F64(21.5)));
        assert_eq!(r.field("n"), Some(&Value::I64(3)));
        assert_eq!(out.records[1].time, 42, "no timestamp: receive time");
        assert_eq!(out.dead[0].payload.as_deref(), Some(&b"broken line"[..]));
        assert!(out.dead[0]
            .meta
            .error
            .as_deref()
            .unwrap_or("")
            .starts_with("invalid line protocol"));

        let mut ms = decoder(|c| c.codec = Codec::LineProtocol);
        let r = ms
            .decode(
                Bytes::from_static(b"m v=1 1700000000000"),
                None,
                0,
                Meta::default(),
            )
            .expect("single line");
        assert_eq!(r.time, 1_700_000_000_000_000_000);
    }

    #[test]
    fn raw_keeps_payload_and_receive_time() {
        let mut d = decoder(|c| c.codec = Codec::Raw);
        let r = d
            .decode(Bytes::from_static(b"\x00\x01"), None, 42, Meta::default())
            .expect("raw");
        assert_eq!(r.time, 42);
        assert_eq!(r.payload.as_deref(), Some(&b"\x00\x01"[..]));
    }
}
