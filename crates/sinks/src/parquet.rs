//! `parquet` sink: writes records as Parquet (or JSON lines) files into a partitioned lake on a
//! local directory or on S3, and acknowledges records only once the file holding them is
//! complete and visible.
//!
//! ```toml
//! [sinks.lake]
//! type = "parquet"
//! inputs = ["fleet"]
//! destination = "s3://my-bucket/telemetry/"      # or "file:///var/lib/sluice/lake", or a path
//! key = "tenant={tenant_id}/date={%Y-%m-%d}/hour={%H}/"
//! max_file_size = "128MiB"
//! max_age = "1m"
//! s3 = { region = "eu-west-1" }
//! ```
//!
//! **Columns.** Arrow columns are built directly from records: the event time as
//! `Timestamp(unit, "UTC")` (column `time`), every tag as a dictionary-encoded string, every field
//! with its own type (`f64` → DOUBLE, `i64` → BIGINT, `bool` → BOOLEAN, string → VARCHAR). A tag
//! or field named like the time column is not written.
//!
//! **Schema.** Without `schema`, columns are inferred and the sink remembers every column it has
//! seen; a new file starts with all of them (absent values are null). When a record brings a
//! field the open file lacks, or a float into an integer column, that partition's file is closed
//! and a **new file** with the wider schema is opened (a written file is never rewritten). With a
//! declared `schema = { temp = "f64", … }` the field columns are fixed (undeclared fields are not
//! written; tags are always written). A value that does not fit its column is handled by
//! `on_mismatch`: `coerce` converts it when the conversion keeps its meaning (integer ↔ float
//! when exact, numbers/booleans → string, numeric strings → numbers, …) and dead-letters the
//! record otherwise; `dead_letter` dead-letters any record with a mismatching value (an integer
//! in a float column is always accepted).
//!
//! **Bounded schema.** A file has at most `max_columns` tag + field columns (default 1000): a
//! record that would push the schema past it (devices inventing a field name per message) is
//! dead-lettered with the reason. Columns not seen for `max_age` are forgotten to make room
//! (declared ones never), so such a flood costs at most `max_columns` new columns per `max_age`.
//!
//! **Partition keys.** A rendered path segment longer than 200 bytes (a 300-character device
//! id) keeps a readable prefix and ends in `~` + a 16-digit hash of the whole segment (stable
//! across runs; distinct values stay distinct; the full value is still in the file's column).
//! On S3 the whole key is shortened, longest segments first, to fit 1,024 bytes. A key that
//! cannot fit, or a path the file system refuses (too long, invalid name), is a poison record:
//! dead-lettered with the reason, never retried forever.
//!
//! **Files.** One open file per partition (`key` rendered from tags and event time), at most
//! `max_open_files` (the least recently written is closed first). A file is closed at
//! `max_file_size`, `max_records`, `max_age` or shutdown. Encoding runs on blocking threads,
//! and a closing file is completed (final row group, fsync, rename, directory fsync, or the
//! upload) in the background while the sink goes on reading; files being completed count
//! against `max_open_files`. Names are
//! `{UTC open time}-{instance id}-{sequence}.parquet`: unique and sortable, so a restart never
//! overwrites. Local files are written as `.NAME.tmp` beside their final name and renamed (after
//! fsync) when complete; S3 objects are streamed with multipart upload and exist only once the
//! upload is completed. Row groups are encoded incrementally (`row_group_size`), so memory per
//! open file is about one row group (plus one upload part on S3), not the whole file.
//!
//! **Acknowledgements.** A record's source is told `Delivered` only when its file is complete
//! (renamed / upload completed). Sources therefore see acknowledgements up to `max_age` after
//! the data arrived: keep `max_age` below the source's redelivery or in-flight limits (an MQTT
//! broker's in-flight window, an SQS visibility timeout). A crash before that leaves no visible
//! partial file, and the unacknowledged records are redelivered by the source. Leftovers
//! (`.tmp` files, incomplete multipart uploads) older than `cleanup_after` are removed at
//! start-up.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arrow_array::builder::{
    BooleanBuilder, Float64Builder, Int64Builder, StringBuilder, StringDictionaryBuilder,
    TimestampMicrosecondBuilder, TimestampMillisecondBuilder, TimestampNanosecondBuilder,
};
use arrow_array::types::Int32Type;
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, SchemaRef, TimeUnit as ArrowTimeUnit};
use async_trait::async_trait;
use bytes::Bytes;
use chrono::format::{Item, StrftimeItems};
use chrono::{DateTime, Utc};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression as ParquetCompression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::ack::{BatchStatus, Finalizers};
use sluice_core::config::{ByteSize, HumanDuration};
use sluice_core::json;
use sluice_core::record::{intern, Name, Record, Value};
use sluice_core::registry::{BuildContext, SinkConfig};
use sluice_core::sink::{BatchConfig, Sink, SinkContext, SinkInput};
use sluice_core::BoxError;
use tokio::time::Instant;

use crate::s3;

/// Errors of the parquet sink's writers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("encoding {path}: {source}")]
    Parquet {
        path: String,
        source: parquet::errors::ParquetError,
    },
    #[error("building Arrow columns: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error("{0}")]
    S3(String),
    #[error("encoding task failed: {0}")]
    Task(String),
}

/// File format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Apache Parquet, one column per time/tag/field.
    Parquet,
    /// JSON lines in the record JSON shape (`sluice_core::json`): the raw archive.
    Jsonl,
}

/// Compression codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Zstandard (parquet only).
    Zstd,
    /// Snappy (parquet only).
    Snappy,
    /// gzip, the whole file (jsonl only).
    Gzip,
    /// No compression.
    None,
}

/// Resolution of the time column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TimeUnit {
    /// Milliseconds.
    Ms,
    /// Microseconds (what Spark, Athena and most engines read natively).
    Us,
    /// Nanoseconds (full precision of the record time).
    Ns,
}

/// A declared field type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    F64,
    I64,
    Bool,
    String,
}

/// What to do with a value that does not fit its column's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MismatchPolicy {
    /// Convert when the conversion keeps the value's meaning; dead-letter the record otherwise.
    Coerce,
    /// Dead-letter the record (an integer in a float column is still accepted).
    DeadLetter,
}

/// Writes records as Parquet (or JSON lines) files to a partitioned local directory or S3.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ParquetSinkConfig {
    /// Where files go: `s3://bucket/prefix`, `file:///absolute/dir` or a plain directory path.
    /// Required.
    pub destination: String,
    /// File format: "parquet" or "jsonl". Default "parquet".
    #[serde(default = "default_format")]
    pub format: Format,
    /// Partition template, appended to the destination: `{tag}` is a tag's value (escaped;
    /// `__HIVE_DEFAULT_PARTITION__` when missing), `{%…}` formats the event time (UTC,
    /// strftime). Default "date={%Y-%m-%d}/hour={%H}/".
    #[serde(default = "default_key")]
    pub key: String,
    /// "zstd", "snappy" or "none" for parquet; "gzip" or "none" for jsonl. Default: "zstd" for
    /// parquet, "none" for jsonl.
    #[serde(default)]
    pub compression: Option<Compression>,
    /// Rows per Parquet row group (the unit encoded in memory before it is written). Default
    /// 131072.
    #[serde(default = "default_row_group_size")]
    pub row_group_size: usize,
    /// Close a file once it reaches about this size (checked after each write). Default "128MiB".
    #[serde(default = "default_max_file_size")]
    pub max_file_size: ByteSize,
    /// Close a file once it holds this many records (exact). Default: no limit.
    #[serde(default)]
    pub max_records: Option<u64>,
    /// Close a file this long after it was opened; bounds how late sources get their
    /// acknowledgements. Default "1m".
    #[serde(default = "default_max_age")]
    pub max_age: HumanDuration,
    /// Open files (partitions being written, plus files still being completed) at most; the
    /// least recently written is closed to open another. Default 64.
    #[serde(default = "default_max_open_files")]
    pub max_open_files: usize,
    /// Most tag + field columns a file may have (the time column not counted). A record that
    /// would push the schema past it (e.g. devices inventing a field name per message) is
    /// dead-lettered with the reason; columns not seen for `max_age` are forgotten to make
    /// room. Default 1000.
    #[serde(default = "default_max_columns")]
    pub max_columns: usize,
    /// Name of the event-time column. Default "time".
    #[serde(default = "default_time_column")]
    pub time_column: String,
    /// Resolution of the event-time column: "ms", "us" or "ns". Default "us".
    #[serde(default = "default_time_unit")]
    pub time_unit: TimeUnit,
    /// Declared field types, e.g. `{ temp = "f64", seq = "i64", ok = "bool", status = "string" }`;
    /// only these fields are written, as columns in name order. Default: inferred from the
    /// records (see module docs).
    #[serde(default)]
    pub schema: Option<BTreeMap<String, FieldType>>,
    /// Values that do not fit their column: "coerce" or "dead_letter". Default "coerce".
    #[serde(default = "default_on_mismatch")]
    pub on_mismatch: MismatchPolicy,
    /// At start-up, remove `.tmp` files / abort multipart uploads under the destination older
    /// than this (left by a crash); must exceed `max_age`. Default "1h".
    #[serde(default = "default_cleanup_after")]
    pub cleanup_after: HumanDuration,
    /// Local directory only: fsync each file (and its directory) before acknowledging. Default
    /// true.
    #[serde(default = "default_true")]
    pub fsync: bool,
    /// S3 options (region, endpoint_url, force_path_style, storage_class, sse, sse_kms_key_id,
    /// part_size). Default: all from the standard AWS chain, parts of "8MiB".
    #[serde(default)]
    pub s3: s3::S3Options,
    /// How records are grouped per write. Default: 10000 records / 10MiB / 1s.
    #[serde(default = "default_batch")]
    pub batch: BatchConfig,
}

fn default_format() -> Format {
    Format::Parquet
}
fn default_key() -> String {
    "date={%Y-%m-%d}/hour={%H}/".into()
}
fn default_row_group_size() -> usize {
    131_072
}
fn default_max_file_size() -> ByteSize {
    ByteSize(128 * 1024 * 1024)
}
fn default_max_age() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_max_open_files() -> usize {
    64
}
fn default_max_columns() -> usize {
    1000
}
fn default_time_column() -> String {
    "time".into()
}
fn default_time_unit() -> TimeUnit {
    TimeUnit::Us
}
fn default_on_mismatch() -> MismatchPolicy {
    MismatchPolicy::Coerce
}
fn default_cleanup_after() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}
fn default_true() -> bool {
    true
}
fn default_batch() -> BatchConfig {
    BatchConfig {
        max_records: 10_000,
        ..BatchConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Destination and partition keys

/// Where the files go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A local directory.
    Local(PathBuf),
    /// A bucket and a key prefix (empty or ending in `/`).
    S3 { bucket: String, prefix: String },
}

impl Destination {
    /// Parses `s3://bucket/prefix`, `file:///dir` or a plain path.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!(
                    "`destination` {s:?} has no bucket (s3://BUCKET/prefix)"
                ));
            }
            let mut prefix = prefix.trim_start_matches('/').to_string();
            if !prefix.is_empty() && !prefix.ends_with('/') {
                prefix.push('/');
            }
            return Ok(Destination::S3 {
                bucket: bucket.to_string(),
                prefix,
            });
        }
        let path = s.strip_prefix("file://").unwrap_or(s);
        if path.is_empty() {
            return Err("`destination` is empty".into());
        }
        if let Some((scheme, _)) = path.split_once("://") {
            return Err(format!(
                "`destination` scheme {scheme:?} is not supported (use s3://, file:// or a path)"
            ));
        }
        Ok(Destination::Local(PathBuf::from(path)))
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(String),
    Tag(String),
    Time(String),
}

/// A parsed partition template (`tenant={tenant_id}/date={%Y-%m-%d}/`).
#[derive(Debug, Clone)]
pub struct KeyTemplate {
    segments: Vec<Segment>,
    /// Second-resolution cache of the rendered time segments (formats without sub-second
    /// specifiers only).
    cache: Option<(i64, Vec<String>)>,
    cacheable: bool,
    /// Longest rendered key in bytes (S3: what the 1,024-byte object key leaves after the
    /// prefix and the file name); `None` for a local directory.
    max_len: Option<usize>,
}

/// Value written for a missing tag (the Hive convention, read back as NULL).
pub const MISSING_PARTITION: &str = "__HIVE_DEFAULT_PARTITION__";

impl KeyTemplate {
    /// Parses a template; errors name the problem.
    pub fn parse(template: &str) -> Result<Self, String> {
        let mut segments = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                segments.push(Segment::Literal(rest[..open].to_string()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(format!("`key` {template:?}: `{{` without `}}`"));
            };
            let inner = &rest[open + 1..open + close];
            if inner.is_empty() {
                return Err(format!("`key` {template:?}: empty `{{}}`"));
            }
            if inner.starts_with('%') {
                if StrftimeItems::new(inner).any(|i| matches!(i, Item::Error)) {
                    return Err(format!("`key` {template:?}: invalid time format {inner:?}"));
                }
                segments.push(Segment::Time(inner.to_string()));
            } else {
                segments.push(Segment::Tag(inner.to_string()));
            }
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("`key` {template:?}: `}}` without `{{`"));
        }
        if !rest.is_empty() {
            segments.push(Segment::Literal(rest.to_string()));
        }
        let cacheable = segments.iter().all(|s| match s {
            Segment::Time(f) => !f.contains("%f") && !f.contains("%.") && !f.contains("%s"),
            _ => true,
        });
        let key = KeyTemplate {
            segments,
            cache: None,
            cacheable,
            max_len: None,
        };
        if key
            .segments
            .iter()
            .any(|s| matches!(s, Segment::Literal(l) if l.split('/').any(|p| p == "..")))
        {
            return Err(format!("`key` {template:?}: `..` is not allowed"));
        }
        Ok(key)
    }

    /// Limits rendered keys to `max_len` bytes (see [`KeyTemplate::render`]).
    pub fn with_max_len(mut self, max_len: usize) -> Self {
        self.max_len = Some(max_len);
        self
    }

    /// Renders the key of `record` into `out` (cleared first).
    ///
    /// A path segment longer than [`MAX_SEGMENT`] bytes (a 300-character device id) keeps a
    /// readable prefix and ends in `~` + a 16-digit hash of the whole segment, so distinct
    /// values stay distinct and the name fits a file system's 255-byte limit. With a
    /// `max_len`, the longest segments are shortened further until the key fits; the error
    /// says why when it cannot.
    pub fn render(&mut self, record: &Record, out: &mut String) -> Result<(), String> {
        self.render_unlimited(record, out);
        limit_key(out, self.max_len)
    }

    fn render_unlimited(&mut self, record: &Record, out: &mut String) {
        out.clear();
        let sec = record.time.div_euclid(1_000_000_000);
        let fresh = self.cacheable && matches!(&self.cache, Some((s, _)) if *s == sec);
        if !fresh {
            let dt = DateTime::<Utc>::from_timestamp_nanos(record.time);
            let v: Vec<String> = self
                .segments
                .iter()
                .filter_map(|s| match s {
                    Segment::Time(f) => Some(dt.format(f).to_string()),
                    _ => None,
                })
                .collect();
            self.cache = Some((sec, v));
        }
        let times: &[String] = self.cache.as_ref().map_or(&[], |(_, v)| v.as_slice());
        let mut t = times.iter();
        for s in &self.segments {
            match s {
                Segment::Literal(l) => out.push_str(l),
                Segment::Time(_) => {
                    if let Some(v) = t.next() {
                        out.push_str(v);
                    }
                }
                Segment::Tag(name) => match record.tag(name) {
                    Some(v) if !v.is_empty() => escape_segment(v, out),
                    _ => out.push_str(MISSING_PARTITION),
                },
            }
        }
    }
}

/// Longest path segment (bytes) of a rendered key; file systems allow 255 per name.
pub const MAX_SEGMENT: usize = 200;
/// Shortest a segment is cut to when a whole key must shrink (a readable prefix + hash).
const MIN_SEGMENT: usize = 40;
/// Room kept in an S3 key for the file name (`{time}-{instance}-{sequence}.jsonl.gz`).
const FILE_NAME_ROOM: usize = 64;
/// S3's limit on an object key, in bytes.
const S3_MAX_KEY: usize = 1024;

/// Shortens over-long segments of `key` and, with `max_len`, the whole key (see
/// [`KeyTemplate::render`]).
fn limit_key(key: &mut String, max_len: Option<usize>) -> Result<(), String> {
    if key.len() <= MAX_SEGMENT && max_len.is_none_or(|m| key.len() <= m) {
        return Ok(());
    }
    let mut segments: Vec<String> = key.split('/').map(|s| shorten(s, MAX_SEGMENT)).collect();
    let mut total = segments.iter().map(|s| s.len() + 1).sum::<usize>() - 1;
    if let Some(max) = max_len {
        while total > max {
            let Some((i, len)) = segments
                .iter()
                .map(String::len)
                .enumerate()
                .max_by_key(|(_, len)| *len)
            else {
                break;
            };
            if len <= MIN_SEGMENT {
                return Err(format!(
                    "partition key of {total} bytes cannot be shortened to the {max} bytes an S3 key leaves after the prefix and file name (too many segments in `key`?): {key:.200}"
                ));
            }
            let shorter = shorten(
                &segments[i],
                len.saturating_sub(total - max).max(MIN_SEGMENT),
            );
            total = total - len + shorter.len();
            segments[i] = shorter;
        }
    }
    *key = segments.join("/");
    Ok(())
}

/// `segment` cut to at most `max` bytes: a readable prefix, `~` and a stable 64-bit hash of
/// the whole segment (FNV-1a: the same on every run and machine).
fn shorten(segment: &str, max: usize) -> String {
    if segment.len() <= max {
        return segment.to_string();
    }
    let mut cut = max.saturating_sub(17);
    while !segment.is_char_boundary(cut) {
        cut -= 1;
    }
    // Do not split a `%XX` escape.
    if let Some(p) = segment[..cut].rfind('%') {
        if p + 3 > cut {
            cut = p;
        }
    }
    let hash = segment.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{}~{hash:016x}", &segment[..cut])
}

/// Escapes a tag value for use in a key/path segment (Hive-style percent escapes).
fn escape_segment(v: &str, out: &mut String) {
    if v == "." || v == ".." {
        for _ in 0..v.len() {
            out.push_str("%2E");
        }
        return;
    }
    for c in v.chars() {
        match c {
            '/' | '\\' | '=' | '%' | ':' | '*' | '?' | '"' | '<' | '>' | '|' | '#' | '{' | '}'
            | '[' | ']' | '^' | '\'' => {
                let _ = write!(out, "%{:02X}", c as u32);
            }
            c if c.is_control() => {
                let _ = write!(out, "%{:02X}", c as u32 & 0xff);
            }
            c => out.push(c),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Schema and encoding

/// The type of one column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// A tag: dictionary-encoded string.
    Tag,
    F64,
    I64,
    Bool,
    Str,
}

impl ColumnType {
    fn of(v: &Value) -> Option<Self> {
        match v {
            Value::F64(_) => Some(ColumnType::F64),
            Value::I64(_) => Some(ColumnType::I64),
            Value::Bool(_) => Some(ColumnType::Bool),
            Value::Str(_) => Some(ColumnType::Str),
            Value::Null => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ColumnType::Tag => "tag",
            ColumnType::F64 => "f64",
            ColumnType::I64 => "i64",
            ColumnType::Bool => "bool",
            ColumnType::Str => "string",
        }
    }

    fn data_type(self) -> DataType {
        match self {
            ColumnType::Tag => {
                DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
            }
            ColumnType::F64 => DataType::Float64,
            ColumnType::I64 => DataType::Int64,
            ColumnType::Bool => DataType::Boolean,
            ColumnType::Str => DataType::Utf8,
        }
    }
}

impl From<FieldType> for ColumnType {
    fn from(t: FieldType) -> Self {
        match t {
            FieldType::F64 => ColumnType::F64,
            FieldType::I64 => ColumnType::I64,
            FieldType::Bool => ColumnType::Bool,
            FieldType::String => ColumnType::Str,
        }
    }
}

/// The tag and field columns of a file (the time column is implicit and first).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Schema {
    columns: Vec<(Name, ColumnType)>,
    index: HashMap<Name, usize>,
}

impl Schema {
    /// An empty schema.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds column `name` (or changes its type when it exists).
    pub fn set(&mut self, name: &Name, ty: ColumnType) {
        match self.index.get(name) {
            Some(&i) => self.columns[i].1 = ty,
            None => {
                self.index.insert(name.clone(), self.columns.len());
                self.columns.push((name.clone(), ty));
            }
        }
    }

    /// The type of column `name`.
    pub fn get(&self, name: &str) -> Option<ColumnType> {
        self.index.get(name).map(|&i| self.columns[i].1)
    }

    /// Number of tag/field columns.
    pub fn len(&self) -> usize {
        self.columns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }

    /// Adds every column of `other` this schema lacks, and widens integer columns that are
    /// floats in `other`. Returns whether anything changed.
    fn absorb(&mut self, other: &Schema) -> bool {
        let mut changed = false;
        for (name, ty) in &other.columns {
            match self.get(name) {
                None => {
                    self.set(name, *ty);
                    changed = true;
                }
                Some(ColumnType::I64) if *ty == ColumnType::F64 => {
                    self.set(name, ColumnType::F64);
                    changed = true;
                }
                Some(_) => {}
            }
        }
        changed
    }
}

/// A value converted to its column's type.
enum Cell<'a> {
    F64(f64),
    I64(i64),
    Bool(bool),
    Str(std::borrow::Cow<'a, str>),
    Null,
}

/// Converts `v` for a column of type `ty` under `policy`; `None` when it does not fit.
fn convert(v: &Value, ty: ColumnType, policy: MismatchPolicy) -> Option<Cell<'_>> {
    use std::borrow::Cow;
    let coerce = policy == MismatchPolicy::Coerce;
    match (ty, v) {
        (_, Value::Null) => Some(Cell::Null),
        (ColumnType::F64, Value::F64(f)) => Some(Cell::F64(*f)),
        (ColumnType::F64, Value::I64(i)) => Some(Cell::F64(*i as f64)),
        (ColumnType::I64, Value::I64(i)) => Some(Cell::I64(*i)),
        (ColumnType::Bool, Value::Bool(b)) => Some(Cell::Bool(*b)),
        (ColumnType::Str | ColumnType::Tag, Value::Str(s)) => Some(Cell::Str(Cow::Borrowed(s))),
        _ if !coerce => None,
        (ColumnType::I64, Value::F64(f)) => {
            (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(Cell::I64(*f as i64))
        }
        (ColumnType::I64, Value::Bool(b)) => Some(Cell::I64(i64::from(*b))),
        (ColumnType::F64, Value::Bool(b)) => Some(Cell::F64(if *b { 1.0 } else { 0.0 })),
        (ColumnType::F64, Value::Str(s)) => s.trim().parse::<f64>().ok().map(Cell::F64),
        (ColumnType::I64, Value::Str(s)) => s.trim().parse::<i64>().ok().map(Cell::I64),
        (ColumnType::Bool, Value::Str(s)) => match s.trim() {
            "true" => Some(Cell::Bool(true)),
            "false" => Some(Cell::Bool(false)),
            _ => None,
        },
        (ColumnType::Bool, Value::I64(i)) if *i == 0 || *i == 1 => Some(Cell::Bool(*i == 1)),
        (ColumnType::Str | ColumnType::Tag, other) => {
            Some(Cell::Str(Cow::Owned(other.to_string())))
        }
        _ => None,
    }
}

enum ColumnBuilder {
    Tag(StringDictionaryBuilder<Int32Type>),
    F64(Float64Builder),
    I64(Int64Builder),
    Bool(BooleanBuilder),
    Str(StringBuilder),
}

impl ColumnBuilder {
    fn new(ty: ColumnType, rows: usize) -> Self {
        match ty {
            ColumnType::Tag => {
                ColumnBuilder::Tag(StringDictionaryBuilder::with_capacity(rows, 64, 1024))
            }
            ColumnType::F64 => ColumnBuilder::F64(Float64Builder::with_capacity(rows)),
            ColumnType::I64 => ColumnBuilder::I64(Int64Builder::with_capacity(rows)),
            ColumnType::Bool => ColumnBuilder::Bool(BooleanBuilder::with_capacity(rows)),
            ColumnType::Str => ColumnBuilder::Str(StringBuilder::with_capacity(rows, rows * 8)),
        }
    }

    fn append(&mut self, cell: Cell<'_>) {
        match (self, cell) {
            (ColumnBuilder::F64(b), Cell::F64(v)) => b.append_value(v),
            (ColumnBuilder::I64(b), Cell::I64(v)) => b.append_value(v),
            (ColumnBuilder::Bool(b), Cell::Bool(v)) => b.append_value(v),
            (ColumnBuilder::Str(b), Cell::Str(v)) => b.append_value(v),
            (ColumnBuilder::Tag(b), Cell::Str(v)) => b.append_value(v),
            (b, _) => b.append_null(),
        }
    }

    fn append_null(&mut self) {
        match self {
            ColumnBuilder::Tag(b) => b.append_null(),
            ColumnBuilder::F64(b) => b.append_null(),
            ColumnBuilder::I64(b) => b.append_null(),
            ColumnBuilder::Bool(b) => b.append_null(),
            ColumnBuilder::Str(b) => b.append_null(),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            ColumnBuilder::Tag(b) => Arc::new(b.finish()),
            ColumnBuilder::F64(b) => Arc::new(b.finish()),
            ColumnBuilder::I64(b) => Arc::new(b.finish()),
            ColumnBuilder::Bool(b) => Arc::new(b.finish()),
            ColumnBuilder::Str(b) => Arc::new(b.finish()),
        }
    }
}

/// How records become Arrow columns.
#[derive(Debug, Clone)]
pub struct EncodeOptions {
    /// Name of the time column.
    pub time_column: String,
    /// Resolution of the time column.
    pub time_unit: TimeUnit,
    /// Value/column type mismatch policy.
    pub on_mismatch: MismatchPolicy,
    /// Parquet compression (zstd, snappy or none).
    pub compression: Compression,
    /// Rows per row group.
    pub row_group_size: usize,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            time_column: default_time_column(),
            time_unit: default_time_unit(),
            on_mismatch: default_on_mismatch(),
            compression: Compression::Zstd,
            row_group_size: default_row_group_size(),
        }
    }
}

/// Why a record does not fit `schema` (`None` when it fits).
pub fn mismatch(record: &Record, schema: &Schema, policy: MismatchPolicy) -> Option<String> {
    for (name, value) in &record.tags {
        if let Some(ty) = schema.get(name) {
            if ty != ColumnType::Tag && convert(&Value::Str(value.clone()), ty, policy).is_none() {
                return Some(format!(
                    "tag `{name}` = {value:?} does not fit column type {} (on_mismatch = {policy:?})",
                    ty.name()
                ));
            }
        }
    }
    for (name, value) in &record.fields {
        if let Some(ty) = schema.get(name) {
            if convert(value, ty, policy).is_none() {
                return Some(format!(
                    "field `{name}` = {} {value} does not fit column type {} (on_mismatch = {})",
                    value.type_name(),
                    ty.name(),
                    match policy {
                        MismatchPolicy::Coerce => "coerce",
                        MismatchPolicy::DeadLetter => "dead_letter",
                    }
                ));
            }
        }
    }
    None
}

/// The columns `records` need beyond `schema` (new tags and fields, integer columns that see
/// floats), or `None` when `schema` already fits. With `fields_fixed` (a declared schema), only
/// tags are added.
pub fn evolve(schema: &Schema, records: &[Record], fields_fixed: bool) -> Option<Schema> {
    evolve_except(schema, records, fields_fixed, "")
}

/// [`evolve`], never adding a column named `reserved` (the time column's name: a tag or field
/// of that name is not written).
pub fn evolve_except(
    schema: &Schema,
    records: &[Record],
    fields_fixed: bool,
    reserved: &str,
) -> Option<Schema> {
    let mut next: Option<Schema> = None;
    for r in records {
        for (name, _) in &r.tags {
            if &**name == reserved {
                continue;
            }
            let current = next.as_ref().unwrap_or(schema);
            if current.get(name).is_none() {
                next.get_or_insert_with(|| schema.clone())
                    .set(name, ColumnType::Tag);
            }
        }
        if fields_fixed {
            continue;
        }
        for (name, value) in &r.fields {
            if &**name == reserved {
                continue;
            }
            let current = next.as_ref().unwrap_or(schema);
            let Some(vt) = ColumnType::of(value) else {
                continue;
            };
            match current.get(name) {
                None => next.get_or_insert_with(|| schema.clone()).set(name, vt),
                Some(ColumnType::I64) if vt == ColumnType::F64 => next
                    .get_or_insert_with(|| schema.clone())
                    .set(name, ColumnType::F64),
                Some(_) => {}
            }
        }
    }
    next
}

/// Builds the Arrow batch of `records` for `schema` (values that do not fit become null: call
/// [`mismatch`] first to dead-letter those records).
pub fn to_record_batch(
    records: &[Record],
    schema: &Schema,
    arrow_schema: &SchemaRef,
    options: &EncodeOptions,
) -> Result<RecordBatch, Error> {
    let rows = records.len();
    let mut builders: Vec<ColumnBuilder> = schema
        .columns
        .iter()
        .map(|(_, ty)| ColumnBuilder::new(*ty, rows))
        .collect();
    let mut filled = vec![false; builders.len()];
    // Records of one stream nearly always list their tags and fields in the same order with the
    // same interned names: remember the column of each position and check it by pointer.
    let mut tag_slots: Vec<(Name, usize)> = Vec::new();
    let mut field_slots: Vec<(Name, usize)> = Vec::new();
    let lookup = |slots: &mut Vec<(Name, usize)>, pos: usize, name: &Name| -> Option<usize> {
        if let Some((n, i)) = slots.get(pos) {
            if Arc::ptr_eq(n, name) {
                return Some(*i);
            }
        }
        let i = *schema.index.get(name)?;
        if pos < slots.len() {
            slots[pos] = (name.clone(), i);
        } else if pos == slots.len() {
            slots.push((name.clone(), i));
        }
        Some(i)
    };
    let mut times: Vec<i64> = Vec::with_capacity(rows);
    let policy = options.on_mismatch;
    for r in records {
        times.push(match options.time_unit {
            TimeUnit::Ns => r.time,
            TimeUnit::Us => r.time.div_euclid(1_000),
            TimeUnit::Ms => r.time.div_euclid(1_000_000),
        });
        for (pos, (name, value)) in r.tags.iter().enumerate() {
            let Some(i) = lookup(&mut tag_slots, pos, name) else {
                continue;
            };
            if filled[i] {
                continue;
            }
            filled[i] = true;
            let cell = if schema.columns[i].1 == ColumnType::Tag {
                Some(Cell::Str(std::borrow::Cow::Borrowed(&**value)))
            } else {
                let v = Value::Str(value.clone());
                convert(&v, schema.columns[i].1, policy).map(|c| match c {
                    Cell::Str(s) => Cell::Str(std::borrow::Cow::Owned(s.into_owned())),
                    Cell::F64(f) => Cell::F64(f),
                    Cell::I64(x) => Cell::I64(x),
                    Cell::Bool(b) => Cell::Bool(b),
                    Cell::Null => Cell::Null,
                })
            };
            builders[i].append(cell.unwrap_or(Cell::Null));
        }
        for (pos, (name, value)) in r.fields.iter().enumerate() {
            let Some(i) = lookup(&mut field_slots, pos, name) else {
                continue;
            };
            if filled[i] {
                continue;
            }
            filled[i] = true;
            builders[i].append(convert(value, schema.columns[i].1, policy).unwrap_or(Cell::Null));
        }
        for (b, f) in builders.iter_mut().zip(filled.iter_mut()) {
            if !*f {
                b.append_null();
            }
            *f = false;
        }
    }
    let tz: Arc<str> = Arc::from("UTC");
    let time: ArrayRef = match options.time_unit {
        TimeUnit::Ns => Arc::new(
            TimestampNanosecondBuilder::with_capacity(rows)
                .with_timezone(tz)
                .finish_with(times),
        ),
        TimeUnit::Us => Arc::new(
            TimestampMicrosecondBuilder::with_capacity(rows)
                .with_timezone(tz)
                .finish_with(times),
        ),
        TimeUnit::Ms => Arc::new(
            TimestampMillisecondBuilder::with_capacity(rows)
                .with_timezone(tz)
                .finish_with(times),
        ),
    };
    let mut columns = Vec::with_capacity(builders.len() + 1);
    columns.push(time);
    columns.extend(builders.iter_mut().map(ColumnBuilder::finish));
    Ok(RecordBatch::try_new(arrow_schema.clone(), columns)?)
}

/// Appends a whole vector of values to a timestamp builder and finishes it.
trait FinishWith {
    type Out;
    fn finish_with(self, values: Vec<i64>) -> Self::Out;
}

macro_rules! finish_with {
    ($b:ty, $a:ty) => {
        impl FinishWith for $b {
            type Out = $a;
            fn finish_with(mut self, values: Vec<i64>) -> $a {
                self.append_slice(&values);
                self.finish()
            }
        }
    };
}
finish_with!(
    TimestampNanosecondBuilder,
    arrow_array::TimestampNanosecondArray
);
finish_with!(
    TimestampMicrosecondBuilder,
    arrow_array::TimestampMicrosecondArray
);
finish_with!(
    TimestampMillisecondBuilder,
    arrow_array::TimestampMillisecondArray
);

/// The Arrow schema of a file with `schema`'s columns.
pub fn arrow_schema(schema: &Schema, options: &EncodeOptions) -> SchemaRef {
    let unit = match options.time_unit {
        TimeUnit::Ns => ArrowTimeUnit::Nanosecond,
        TimeUnit::Us => ArrowTimeUnit::Microsecond,
        TimeUnit::Ms => ArrowTimeUnit::Millisecond,
    };
    let mut fields = Vec::with_capacity(schema.len() + 1);
    fields.push(Field::new(
        &options.time_column,
        DataType::Timestamp(unit, Some(Arc::from("UTC"))),
        false,
    ));
    for (name, ty) in &schema.columns {
        fields.push(Field::new(&**name, ty.data_type(), true));
    }
    Arc::new(arrow_schema::Schema::new(fields))
}

/// A byte sink that counts what it was given: a local file, or memory drained into S3 parts.
#[derive(Debug)]
pub enum Out {
    File { file: std::fs::File, written: u64 },
    Memory { buf: Vec<u8>, written: u64 },
}

impl Out {
    /// An in-memory sink.
    pub fn memory() -> Self {
        Out::Memory {
            buf: Vec::new(),
            written: 0,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        match self {
            Out::File { written, .. } | Out::Memory { written, .. } => *written,
        }
    }

    /// The bytes buffered in memory (empty for a file).
    pub fn buffer(&mut self) -> Option<&mut Vec<u8>> {
        match self {
            Out::Memory { buf, .. } => Some(buf),
            Out::File { .. } => None,
        }
    }
}

impl Write for Out {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        match self {
            Out::File { file, written } => {
                let n = file.write(data)?;
                *written += n as u64;
                Ok(n)
            }
            Out::Memory { buf, written } => {
                buf.extend_from_slice(data);
                *written += data.len() as u64;
                Ok(data.len())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Out::File { file, .. } => file.flush(),
            Out::Memory { .. } => Ok(()),
        }
    }
}

/// A byte sink that knows how much it was given (for `max_file_size` of JSON lines).
pub trait Written {
    fn written(&self) -> u64;
}

impl Written for Vec<u8> {
    fn written(&self) -> u64 {
        self.len() as u64
    }
}

impl Written for Out {
    fn written(&self) -> u64 {
        Out::written(self)
    }
}

enum Encoding<W: Write + Send> {
    Parquet {
        writer: Box<ArrowWriter<W>>,
        schema: Schema,
        arrow_schema: SchemaRef,
    },
    Jsonl(W, Vec<u8>),
    JsonlGzip(flate2::write::GzEncoder<W>, Vec<u8>),
}

/// One file being encoded: Parquet row groups (or JSON lines) written incrementally to `W`.
///
/// ```
/// use sluice_core::record::{Record, Value};
/// use sluice_sinks::parquet::{evolve, EncodeOptions, Schema, Writer};
/// let mut r = Record::new(1_700_000_000_000_000_000);
/// r.set_tag("device_id", "dev-1");
/// r.set_field("temp", Value::F64(21.5));
/// let records = vec![r];
/// let schema = evolve(&Schema::new(), &records, false).unwrap_or_default();
/// let mut w = Writer::parquet(Vec::new(), schema, &EncodeOptions::default()).unwrap();
/// w.write(&records).unwrap();
/// let bytes = w.finish().unwrap();
/// assert_eq!(&bytes[..4], b"PAR1");
/// ```
pub struct Writer<W: Write + Send + Written> {
    encoding: Encoding<W>,
    options: EncodeOptions,
    records: u64,
    label: String,
}

impl<W: Write + Send + Written> Writer<W> {
    /// A Parquet writer with `schema`'s columns.
    pub fn parquet(out: W, schema: Schema, options: &EncodeOptions) -> Result<Self, Error> {
        let arrow_schema = arrow_schema(&schema, options);
        let compression = match options.compression {
            Compression::Zstd => ParquetCompression::ZSTD(ZstdLevel::default()),
            Compression::Snappy => ParquetCompression::SNAPPY,
            Compression::Gzip | Compression::None => ParquetCompression::UNCOMPRESSED,
        };
        // Dictionary encoding pays off for tags and string fields (few distinct values) but
        // costs a hash per value on noisy numeric readings and then falls back anyway.
        let mut props = WriterProperties::builder().set_dictionary_enabled(false);
        for (name, ty) in &schema.columns {
            if matches!(ty, ColumnType::Tag | ColumnType::Str) {
                props =
                    props.set_column_dictionary_enabled(ColumnPath::from(name.to_string()), true);
            }
        }
        let props = props
            .set_compression(compression)
            .set_max_row_group_size(options.row_group_size.max(1))
            .set_created_by(format!("sluice {}", env!("CARGO_PKG_VERSION")))
            .build();
        let writer = ArrowWriter::try_new(out, arrow_schema.clone(), Some(props)).map_err(|e| {
            Error::Parquet {
                path: String::new(),
                source: e,
            }
        })?;
        Ok(Writer {
            encoding: Encoding::Parquet {
                writer: Box::new(writer),
                schema,
                arrow_schema,
            },
            options: options.clone(),
            records: 0,
            label: String::new(),
        })
    }

    /// A JSON-lines writer, gzip-compressed with `gzip`.
    pub fn jsonl(out: W, gzip: bool) -> Self {
        let encoding = if gzip {
            Encoding::JsonlGzip(
                flate2::write::GzEncoder::new(out, flate2::Compression::default()),
                Vec::new(),
            )
        } else {
            Encoding::Jsonl(out, Vec::new())
        };
        Writer {
            encoding,
            options: EncodeOptions::default(),
            records: 0,
            label: String::new(),
        }
    }

    fn with_label(mut self, label: String) -> Self {
        self.label = label;
        self
    }

    /// The columns of a Parquet file (`None` for JSON lines).
    pub fn schema(&self) -> Option<&Schema> {
        match &self.encoding {
            Encoding::Parquet { schema, .. } => Some(schema),
            _ => None,
        }
    }

    /// Encodes `records` (they must fit the schema: see [`mismatch`] and [`evolve`]).
    pub fn write(&mut self, records: &[Record]) -> Result<(), Error> {
        let label = &self.label;
        let io = |source| Error::Io {
            path: label.clone(),
            source,
        };
        match &mut self.encoding {
            Encoding::Parquet {
                writer,
                schema,
                arrow_schema,
            } => {
                let batch = to_record_batch(records, schema, arrow_schema, &self.options)?;
                writer.write(&batch).map_err(|e| Error::Parquet {
                    path: label.clone(),
                    source: e,
                })?;
            }
            Encoding::Jsonl(out, buf) => {
                buf.clear();
                for r in records {
                    json::write_line(r, buf);
                }
                out.write_all(buf).map_err(io)?;
            }
            Encoding::JsonlGzip(out, buf) => {
                buf.clear();
                for r in records {
                    json::write_line(r, buf);
                }
                out.write_all(buf).map_err(io)?;
            }
        }
        self.records += records.len() as u64;
        Ok(())
    }

    /// Records written.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// The underlying sink (to drain buffered bytes).
    pub fn inner_mut(&mut self) -> &mut W {
        match &mut self.encoding {
            Encoding::Parquet { writer, .. } => writer.inner_mut(),
            Encoding::Jsonl(out, _) => out,
            Encoding::JsonlGzip(out, _) => out.get_mut(),
        }
    }

    /// Bytes encoded so far, excluding the open row group.
    pub fn bytes_written(&mut self) -> u64 {
        match &mut self.encoding {
            Encoding::Parquet { writer, .. } => writer.bytes_written() as u64,
            Encoding::Jsonl(out, _) => out.written(),
            Encoding::JsonlGzip(out, _) => out.get_mut().written(),
        }
    }

    /// Bytes in memory not yet written to the sink (the open Parquet row group).
    pub fn in_progress_size(&self) -> usize {
        match &self.encoding {
            Encoding::Parquet { writer, .. } => writer.in_progress_size(),
            _ => 0,
        }
    }

    /// Writes the footer (or gzip trailer) and returns the sink.
    pub fn finish(self) -> Result<W, Error> {
        let label = self.label;
        match self.encoding {
            // `into_inner` flushes the open row group and writes the footer.
            Encoding::Parquet { writer, .. } => {
                writer.into_inner().map_err(|source| Error::Parquet {
                    path: label.clone(),
                    source,
                })
            }
            Encoding::Jsonl(mut out, _) => {
                out.flush().map_err(|source| Error::Io {
                    path: label.clone(),
                    source,
                })?;
                Ok(out)
            }
            Encoding::JsonlGzip(out, _) => out.finish().map_err(|source| Error::Io {
                path: label.clone(),
                source,
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The sink

#[async_trait]
impl SinkConfig for ParquetSinkConfig {
    /// A record is acknowledged once its file is closed and uploaded: up to `max_age`.
    fn ack_hold(&self) -> Option<(Duration, &'static str)> {
        Some((self.max_age.0, "max_age"))
    }

    async fn build(&self, cx: &BuildContext) -> Result<Box<dyn Sink>, BoxError> {
        let destination = Destination::parse(&self.destination)?;
        let mut key = KeyTemplate::parse(&self.key)?;
        if let Destination::S3 { prefix, .. } = &destination {
            let room = S3_MAX_KEY.saturating_sub(prefix.len() + FILE_NAME_ROOM);
            if room < 2 * MIN_SEGMENT {
                return Err(format!(
                    "`destination` prefix of {} bytes leaves too little of S3's 1,024-byte key for partitions and file names",
                    prefix.len()
                )
                .into());
            }
            key = key.with_max_len(room);
        }
        let compression = match (self.format, self.compression) {
            (Format::Parquet, None) => Compression::Zstd,
            (Format::Jsonl, None) => Compression::None,
            (Format::Parquet, Some(c @ (Compression::Zstd | Compression::Snappy | Compression::None))) => c,
            (Format::Jsonl, Some(c @ (Compression::Gzip | Compression::None))) => c,
            (f, Some(c)) => {
                return Err(format!(
                    "`compression` {c:?} is not available for format {f:?} (parquet: zstd, snappy, none; jsonl: gzip, none)"
                )
                .into())
            }
        };
        if self.max_open_files == 0 {
            return Err("`max_open_files` must be at least 1".into());
        }
        if self.max_records == Some(0) {
            return Err("`max_records` must be at least 1".into());
        }
        if self.cleanup_after.0 <= self.max_age.0 {
            return Err(format!(
                "`cleanup_after` ({}) must be longer than `max_age` ({}): a live file could be removed",
                self.cleanup_after, self.max_age
            )
            .into());
        }
        if self.max_columns == 0 {
            return Err("`max_columns` must be at least 1".into());
        }
        if self
            .schema
            .as_ref()
            .is_some_and(|s| s.len() > self.max_columns)
        {
            return Err(format!(
                "`schema` declares more fields than `max_columns` ({})",
                self.max_columns
            )
            .into());
        }
        let mut declared = Schema::new();
        if let Some(fields) = &self.schema {
            for (name, ty) in fields {
                if *name == self.time_column {
                    return Err(format!("`schema` declares `{name}`, the time column").into());
                }
                declared.set(&intern(name), (*ty).into());
            }
        }
        let store = match &destination {
            Destination::Local(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create `destination` {}: {e}", dir.display()))?;
                let (root, older_than) = (dir.clone(), self.cleanup_after.0);
                let removed =
                    tokio::task::spawn_blocking(move || remove_stale_temp_files(&root, older_than))
                        .await
                        .unwrap_or(0);
                if removed > 0 {
                    tracing::info!(sink = %cx.name, removed, "removed temporary files left by an earlier run");
                }
                Store::Local(dir.clone())
            }
            Destination::S3 { bucket, prefix } => {
                let store = s3::Store::connect(bucket, prefix, &self.s3).await?;
                store.check().await?;
                let aborted = store.abort_stale_uploads(self.cleanup_after.0).await?;
                if aborted > 0 {
                    tracing::info!(sink = %cx.name, aborted, "aborted multipart uploads left by an earlier run");
                }
                Store::S3(store)
            }
        };
        Ok(Box::new(ParquetSink {
            config: self.clone(),
            options: EncodeOptions {
                time_column: self.time_column.clone(),
                time_unit: self.time_unit,
                on_mismatch: self.on_mismatch,
                compression,
                row_group_size: self.row_group_size,
            },
            key,
            store,
            known: Known::new(declared),
            fields_fixed: self.schema.is_some(),
            partitions: HashMap::new(),
            closing: tokio::task::JoinSet::new(),
            instance: instance_id(),
            sequence: 0,
        }))
    }
}

/// Removes `.NAME.tmp` files under `dir` older than `older_than`; returns how many.
fn remove_stale_temp_files(dir: &Path, older_than: Duration) -> usize {
    let mut removed = 0;
    let mut stack = vec![dir.to_path_buf()];
    let cutoff = SystemTime::now().checked_sub(older_than);
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(path);
                continue;
            }
            let name = e.file_name();
            let name = name.to_string_lossy();
            if !(name.starts_with('.') && name.ends_with(".tmp")) {
                continue;
            }
            let old = match (meta.modified(), cutoff) {
                (Ok(m), Some(c)) => m < c,
                _ => false,
            };
            if old && std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

/// A random-enough id of this sink instance (distinguishes concurrent and restarted writers).
fn instance_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{:08x}", h.finish() as u32)
}

enum Store {
    Local(PathBuf),
    S3(s3::Store),
}

enum Target {
    Local { temp: PathBuf, path: PathBuf },
    S3(s3::Upload),
}

struct OpenFile {
    label: String,
    writer: Writer<Out>,
    target: Target,
    finalizers: Finalizers,
    opened: Instant,
    last_write: Instant,
}

struct Partition {
    file: Option<OpenFile>,
}

/// The columns new files start with: every column seen within `max_age` (or declared), at
/// most `max_columns` of them.
struct Known {
    schema: Schema,
    /// When each column of `schema` (same position) was last in a record.
    seen: Vec<Instant>,
    /// The first `pinned` columns are declared (`schema`): never forgotten.
    pinned: usize,
}

impl Known {
    fn new(declared: Schema) -> Self {
        let now = Instant::now();
        Known {
            pinned: declared.len(),
            seen: vec![now; declared.len()],
            schema: declared,
        }
    }

    /// Columns of `other` this schema lacks.
    fn missing<'a>(&self, other: &'a Schema) -> Vec<&'a Name> {
        other
            .columns
            .iter()
            .filter(|(n, _)| self.schema.get(n).is_none())
            .map(|(n, _)| n)
            .collect()
    }

    /// Adds (or widens) `other`'s columns, all seen `now`.
    fn absorb(&mut self, other: &Schema, now: Instant) {
        self.schema.absorb(other);
        self.seen.resize(self.schema.len(), now);
        for (name, _) in &other.columns {
            if let Some(&i) = self.schema.index.get(name) {
                self.seen[i] = now;
            }
        }
    }

    /// Forgets the undeclared columns not seen since `cutoff` (except those in `keep`).
    fn forget_stale(&mut self, cutoff: Instant, keep: &Schema) {
        let old = std::mem::take(&mut self.schema);
        let seen = std::mem::take(&mut self.seen);
        for (i, ((name, ty), at)) in old.columns.into_iter().zip(seen).enumerate() {
            if i < self.pinned || at >= cutoff || keep.get(&name).is_some() {
                self.schema.set(&name, ty);
                self.seen.push(at);
            }
        }
    }
}

/// Why a record cannot join a schema of `len` columns (`max_columns` = `max`).
fn too_many_columns(new: &[&Name], len: usize, max: usize) -> String {
    let mut names: Vec<String> = new
        .iter()
        .take(5)
        .map(|n| format!("`{:.64}`", &***n))
        .collect();
    if new.len() > 5 {
        names.push(format!("… ({} in all)", new.len()));
    }
    format!(
        "record would add column(s) {} to a schema of {len} columns, beyond max_columns = {max} (columns unseen for max_age are forgotten)",
        names.join(", ")
    )
}

struct ParquetSink {
    config: ParquetSinkConfig,
    options: EncodeOptions,
    key: KeyTemplate,
    store: Store,
    known: Known,
    fields_fixed: bool,
    partitions: HashMap<String, Partition>,
    /// Files being completed (final encoding, fsync + rename or upload) off the sink's loop;
    /// they count against `max_open_files`.
    closing: tokio::task::JoinSet<()>,
    instance: String,
    sequence: u64,
}

#[async_trait]
impl Sink for ParquetSink {
    async fn run(
        mut self: Box<Self>,
        mut input: SinkInput,
        cx: SinkContext,
    ) -> Result<(), BoxError> {
        if let Store::S3(store) = &self.store {
            store.observe(&cx.name, cx.metrics.counter("timeouts"));
        }
        // `SinkInput::next_batch` is not cancel-safe, so it runs in its own task and hands
        // batches over a channel; this loop can then also wake up for `max_age` while idle.
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let batch_config = self.config.batch;
        let reader = tokio::spawn(async move {
            while let Some(batch) = input.next_batch(&batch_config).await {
                if tx.send(batch).await.is_err() {
                    break;
                }
            }
        });
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                batch = rx.recv() => match batch {
                    Some(batch) => self.write_batch(batch.records, &cx).await,
                    None => break,
                },
                Some(done) = self.closing.join_next(), if !self.closing.is_empty() => {
                    closed(done, &cx);
                }
                _ = sleep_until(deadline) => self.close_expired(&cx).await,
            }
        }
        self.close_all(&cx).await;
        reader
            .await
            .map_err(|e| format!("input task failed: {e}"))?;
        Ok(())
    }
}

/// Logs a completion task that failed (its records' finalizers were dropped: Errored).
fn closed(done: Result<(), tokio::task::JoinError>, cx: &SinkContext) {
    if let Err(e) = done {
        tracing::error!(sink = %cx.name, error = %e, "completing a file failed; its records will be redelivered");
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Whether an error opening a file is due to its path (the partition key), so that retrying
/// can never succeed: the name is too long or invalid for the file system.
fn is_path_error(e: &Error) -> bool {
    match e {
        Error::Io { source, .. } => matches!(
            source.kind(),
            std::io::ErrorKind::InvalidFilename | std::io::ErrorKind::InvalidInput
        ),
        _ => false,
    }
}

impl ParquetSink {
    fn next_deadline(&self) -> Option<Instant> {
        self.partitions
            .values()
            .filter_map(|p| p.file.as_ref())
            .map(|f| f.opened + self.config.max_age.0)
            .min()
    }

    fn open_files(&self) -> usize {
        self.partitions
            .values()
            .filter(|p| p.file.is_some())
            .count()
    }

    async fn write_batch(&mut self, records: Vec<Record>, cx: &SinkContext) {
        // Group by partition, keeping arrival order within each.
        let mut groups: Vec<(String, Vec<Record>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut unkeyed: Vec<(String, Record)> = Vec::new();
        let mut key = String::new();
        for r in records {
            if let Err(reason) = self.key.render(&r, &mut key) {
                unkeyed.push((reason, r));
                continue;
            }
            match index.get(key.as_str()) {
                Some(&i) => groups[i].1.push(r),
                None => {
                    index.insert(key.clone(), groups.len());
                    groups.push((key.clone(), vec![r]));
                }
            }
        }
        for (reason, r) in unkeyed {
            cx.reject(vec![r], &reason).await;
        }
        for (key, records) in groups {
            self.write_partition(key, records, cx).await;
        }
    }

    /// Admits the records' columns into the known schema within `max_columns`; returns the
    /// records that fit and dead-letters the others.
    async fn admit_columns(&mut self, records: Vec<Record>, cx: &SinkContext) -> Vec<Record> {
        let reserved = self.options.time_column.as_str();
        let max = self.config.max_columns;
        let now = Instant::now();
        let group = evolve_except(&Schema::new(), &records, self.fields_fixed, reserved)
            .unwrap_or_default();
        let adds = self.known.missing(&group).len();
        if adds > 0 && self.known.schema.len() + adds > max {
            if let Some(cutoff) = now.checked_sub(self.config.max_age.0) {
                self.known.forget_stale(cutoff, &group);
            }
        }
        if self.known.schema.len() + adds <= max {
            self.known.absorb(&group, now);
            return records;
        }
        // Device-chosen names: admit record by record while they fit.
        let mut kept = Vec::with_capacity(records.len());
        let mut rejected: Vec<(String, Record)> = Vec::new();
        for r in records {
            let own = evolve_except(
                &Schema::new(),
                std::slice::from_ref(&r),
                self.fields_fixed,
                reserved,
            )
            .unwrap_or_default();
            let new = self.known.missing(&own);
            if self.known.schema.len() + new.len() <= max {
                self.known.absorb(&own, now);
                kept.push(r);
            } else {
                let reason = too_many_columns(&new, self.known.schema.len(), max);
                rejected.push((reason, r));
            }
        }
        for (reason, r) in rejected {
            cx.reject(vec![r], &reason).await;
        }
        kept
    }

    async fn write_partition(&mut self, key: String, mut records: Vec<Record>, cx: &SinkContext) {
        if self.config.format == Format::Parquet {
            records = self.admit_columns(records, cx).await;
            // Schema evolution: a file never changes its columns, so a wider schema means a new file.
            let reserved = self.options.time_column.as_str();
            let stale = self
                .partitions
                .get(&key)
                .and_then(|p| p.file.as_ref())
                .and_then(|f| f.writer.schema())
                .is_some_and(|s| evolve_except(s, &records, self.fields_fixed, reserved).is_some());
            if stale {
                self.close(&key, cx);
            }
            // Dead-letter what does not fit (checked against the schema the file will have).
            let schema = self
                .partitions
                .get(&key)
                .and_then(|p| p.file.as_ref())
                .and_then(|f| f.writer.schema())
                .unwrap_or(&self.known.schema);
            let mut rejected: Vec<(String, Record)> = Vec::new();
            let mut kept = Vec::with_capacity(records.len());
            for r in records {
                match mismatch(&r, schema, self.options.on_mismatch) {
                    Some(reason) => rejected.push((reason, r)),
                    None => kept.push(r),
                }
            }
            records = kept;
            for (reason, r) in rejected {
                cx.reject(vec![r], &reason).await;
            }
        }
        while !records.is_empty() {
            if self.partitions.get(&key).is_none_or(|p| p.file.is_none()) {
                if let Err(e) = self.open(&key, cx).await {
                    if is_path_error(&e) {
                        // Retrying cannot help: a poison record, not a transient failure.
                        let reason = format!("partition `{key:.300}` cannot be written: {e}");
                        tracing::warn!(sink = %cx.name, error = %e, records = records.len(), "partition path refused; records dead-lettered");
                        cx.reject(records, &reason).await;
                        return;
                    }
                    cx.metrics.add_errors(records.len());
                    tracing::error!(sink = %cx.name, error = %e, records = records.len(), "cannot open a file; records will be redelivered");
                    for r in &mut records {
                        r.finalize(BatchStatus::Errored);
                    }
                    return;
                }
            }
            let Some(file) = self.partitions.get_mut(&key).and_then(|p| p.file.take()) else {
                return;
            };
            // `max_records` is exact: split the records at the file's remaining room.
            let room = self.config.max_records.map_or(usize::MAX, |m| {
                m.saturating_sub(file.writer.records()) as usize
            });
            let rest = if records.len() > room {
                records.split_off(room)
            } else {
                Vec::new()
            };
            let (file, result) = write_into(file, records, &self.store).await;
            records = rest;
            let Some(mut file) = file else {
                if let Err(e) = result {
                    tracing::error!(sink = %cx.name, error = %e, "encoding failed; file abandoned, records will be redelivered");
                }
                self.partitions.remove(&key);
                continue;
            };
            if let Err(e) = result {
                self.partitions.remove(&key);
                fail(file, e, cx).await;
                continue;
            }
            let full = file.writer.records() >= self.config.max_records.unwrap_or(u64::MAX)
                || file.writer.bytes_written() + file.writer.in_progress_size() as u64
                    >= self.config.max_file_size.0;
            self.partitions
                .insert(key.clone(), Partition { file: Some(file) });
            if full {
                self.close(&key, cx);
            }
        }
    }

    async fn open(&mut self, key: &str, cx: &SinkContext) -> Result<(), Error> {
        // Open files and files still being completed hold memory: at most `max_open_files`.
        loop {
            while let Some(done) = self.closing.try_join_next() {
                closed(done, cx);
            }
            let open = self.open_files();
            if open + self.closing.len() < self.config.max_open_files {
                break;
            }
            if open >= self.config.max_open_files {
                let oldest = self
                    .partitions
                    .iter()
                    .filter_map(|(k, p)| p.file.as_ref().map(|f| (f.last_write, k.clone())))
                    .min();
                if let Some((_, k)) = oldest {
                    self.close(&k, cx);
                    continue;
                }
            }
            match self.closing.join_next().await {
                Some(done) => closed(done, cx),
                None => break,
            }
        }
        self.sequence += 1;
        let ext = match (self.config.format, self.options.compression) {
            (Format::Parquet, _) => "parquet",
            (Format::Jsonl, Compression::Gzip) => "jsonl.gz",
            (Format::Jsonl, _) => "jsonl",
        };
        let name = format!(
            "{}-{}-{:06}.{ext}",
            Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
            self.instance,
            self.sequence
        );
        let relative = format!("{key}{name}");
        let (out, target, label) = match &self.store {
            Store::Local(dir) => {
                let path = dir.join(&relative);
                let parent = path.parent().unwrap_or(dir).to_path_buf();
                let temp = parent.join(format!(".{name}.tmp"));
                let label = path.display().to_string();
                let create = {
                    let temp = temp.clone();
                    move || {
                        let io = |source| Error::Io {
                            path: temp.display().to_string(),
                            source,
                        };
                        std::fs::create_dir_all(&parent).map_err(io)?;
                        std::fs::File::create(&temp).map_err(io)
                    }
                };
                let file = blocking(create).await?;
                (
                    Out::File { file, written: 0 },
                    Target::Local { temp, path },
                    label,
                )
            }
            Store::S3(store) => {
                let key = store.key(&relative);
                let label = store.url(&key);
                (Out::memory(), Target::S3(store.upload(key)), label)
            }
        };
        let writer = match self.config.format {
            Format::Parquet => Writer::parquet(out, self.known.schema.clone(), &self.options)?,
            Format::Jsonl => Writer::jsonl(out, self.options.compression == Compression::Gzip),
        }
        .with_label(label.clone());
        let now = Instant::now();
        self.partitions.insert(
            key.to_string(),
            Partition {
                file: Some(OpenFile {
                    label,
                    writer,
                    target,
                    finalizers: Finalizers::new(),
                    opened: now,
                    last_write: now,
                }),
            },
        );
        Ok(())
    }

    /// Starts completing the partition's file in the background; its records are acknowledged
    /// when it is complete (`Errored` if that fails).
    fn close(&mut self, key: &str, cx: &SinkContext) {
        let Some(file) = self.partitions.remove(key).and_then(|p| p.file) else {
            return;
        };
        let metrics = cx.metrics.clone();
        let name = cx.name.clone();
        let fsync = self.config.fsync;
        self.closing.spawn(async move {
            let records = file.writer.records();
            let started = std::time::Instant::now();
            let label = file.label;
            let finalizers = file.finalizers;
            let result = complete(file.writer, file.target, fsync).await;
            metrics.observe_latency(started.elapsed());
            match result {
                Ok(bytes) => {
                    metrics.add_out(records as usize);
                    metrics.add_bytes(bytes as usize);
                    tracing::debug!(sink = %name, file = %label, records, bytes, "file complete");
                    finalizers.finish(BatchStatus::Delivered);
                }
                Err(e) => {
                    metrics.add_errors(records as usize);
                    tracing::error!(sink = %name, file = %label, error = %e, records, "cannot complete file; records will be redelivered");
                    finalizers.finish(BatchStatus::Errored);
                }
            }
        });
    }

    async fn close_expired(&mut self, cx: &SinkContext) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .partitions
            .iter()
            .filter(|(_, p)| {
                p.file
                    .as_ref()
                    .is_some_and(|f| f.opened + self.config.max_age.0 <= now)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            self.close(&k, cx);
        }
    }

    async fn close_all(&mut self, cx: &SinkContext) {
        let keys: Vec<String> = self.partitions.keys().cloned().collect();
        for k in keys {
            self.close(&k, cx);
        }
        while let Some(done) = self.closing.join_next().await {
            closed(done, cx);
        }
    }
}

/// Runs blocking file-system or encoding work off the runtime's threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Task(e.to_string()))?
}

/// Abandons a file after a write error: its records are redelivered.
async fn fail(file: OpenFile, e: Error, cx: &SinkContext) {
    let records = file.writer.records();
    cx.metrics.add_errors(records as usize);
    tracing::error!(sink = %cx.name, file = %file.label, error = %e, records, "write failed; file abandoned, records will be redelivered");
    match file.target {
        Target::Local { temp, .. } => {
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(temp)).await;
        }
        Target::S3(mut upload) => upload.abort().await,
    }
    file.finalizers.finish(BatchStatus::Errored);
}

/// Encodes `records` into `file` on a blocking thread (the records' finalizers stay with the
/// file), then ships full parts to S3. Returns the file, or `None` if the encoding panicked
/// (its records' finalizers were dropped with it: Errored).
async fn write_into(
    mut file: OpenFile,
    mut records: Vec<Record>,
    store: &Store,
) -> (Option<OpenFile>, Result<(), Error>) {
    for r in records.iter_mut() {
        file.finalizers.merge(std::mem::take(&mut r.finalizers));
    }
    let encoded = tokio::task::spawn_blocking(move || {
        let result = file.writer.write(&records);
        drop(records);
        (file, result)
    })
    .await;
    let (mut file, result) = match encoded {
        Ok(done) => done,
        Err(e) => return (None, Err(Error::Task(e.to_string()))),
    };
    if result.is_err() {
        return (Some(file), result);
    }
    file.last_write = Instant::now();
    if let (Store::S3(store), Target::S3(upload)) = (store, &mut file.target) {
        let part = store.part_size();
        while let Some(buf) = file.writer.inner_mut().buffer() {
            if buf.len() < part {
                break;
            }
            let rest = buf.split_off(part);
            let chunk = std::mem::replace(buf, rest);
            if let Err(e) = upload.write_part(Bytes::from(chunk)).await {
                return (Some(file), Err(Error::S3(e)));
            }
        }
    }
    (Some(file), Ok(()))
}

/// Finishes the encoding and makes the file visible; returns its size. The encoding, fsync
/// and rename run on a blocking thread.
async fn complete(writer: Writer<Out>, target: Target, fsync: bool) -> Result<u64, Error> {
    let label = writer.label.clone();
    match target {
        Target::Local { temp, path } => {
            blocking(move || {
                let io = |source| Error::Io {
                    path: label.clone(),
                    source,
                };
                let result = (|| {
                    let out = writer.finish()?;
                    let size = out.written();
                    if let Out::File { file, .. } = out {
                        if fsync {
                            file.sync_all().map_err(io)?;
                        }
                    }
                    std::fs::rename(&temp, &path).map_err(io)?;
                    if fsync {
                        if let Some(dir) = path.parent() {
                            std::fs::File::open(dir)
                                .and_then(|d| d.sync_all())
                                .map_err(io)?;
                        }
                    }
                    Ok(size)
                })();
                if result.is_err() {
                    let _ = std::fs::remove_file(&temp);
                }
                result
            })
            .await
        }
        Target::S3(mut upload) => {
            let out = match blocking(move || writer.finish()).await {
                Ok(out) => out,
                Err(e) => {
                    upload.abort().await;
                    return Err(e);
                }
            };
            let size = out.written();
            let tail = match out {
                Out::Memory { buf, .. } => buf,
                Out::File { .. } => Vec::new(),
            };
            upload
                .complete(Bytes::from(tail))
                .await
                .map_err(Error::S3)?;
            Ok(size)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(time: i64, device: &str, fields: &[(&str, Value)]) -> Record {
        let mut r = Record::new(time);
        r.set_tag("device_id", device);
        for (k, v) in fields {
            r.set_field(k, v.clone());
        }
        r
    }

    #[test]
    fn destinations() {
        assert_eq!(
            Destination::parse("s3://b/p/q"),
            Ok(Destination::S3 {
                bucket: "b".into(),
                prefix: "p/q/".into()
            })
        );
        assert_eq!(
            Destination::parse("s3://b"),
            Ok(Destination::S3 {
                bucket: "b".into(),
                prefix: "".into()
            })
        );
        assert_eq!(
            Destination::parse("file:///var/lake"),
            Ok(Destination::Local("/var/lake".into()))
        );
        assert_eq!(
            Destination::parse("out/lake"),
            Ok(Destination::Local("out/lake".into()))
        );
        assert!(Destination::parse("gs://x").is_err());
        assert!(Destination::parse("s3:///x").is_err());
    }

    #[test]
    fn key_template_renders_tags_and_time() {
        let mut k =
            KeyTemplate::parse("tenant={tenant}/date={%Y-%m-%d}/hour={%H}/").expect("valid");
        let mut r = record(1_764_115_200_000_000_000 + 3 * 3_600_000_000_000, "d", &[]);
        r.set_tag("tenant", "a/b=c");
        let mut out = String::new();
        k.render(&r, &mut out).expect("fits");
        assert_eq!(out, "tenant=a%2Fb%3Dc/date=2025-11-26/hour=03/");
        r.remove_tag("tenant");
        k.render(&r, &mut out).expect("fits");
        assert_eq!(
            out,
            "tenant=__HIVE_DEFAULT_PARTITION__/date=2025-11-26/hour=03/"
        );
        r.set_tag("tenant", "..");
        k.render(&r, &mut out).expect("fits");
        assert_eq!(out, "tenant=%2E%2E/date=2025-11-26/hour=03/");
        assert!(KeyTemplate::parse("x={%Q}/").is_err());
        assert!(KeyTemplate::parse("x={a/").is_err());
        assert!(KeyTemplate::parse("../x/").is_err());
    }

    #[test]
    fn long_partition_values_are_shortened_with_a_hash() {
        let mut k = KeyTemplate::parse("a={tenant}/b={device_id}/").expect("valid");
        let mut r = record(0, &format!("{}1", "é".repeat(150)), &[]);
        r.set_tag("tenant", "t");
        let mut one = String::new();
        k.render(&r, &mut one).expect("fits");
        let segments: Vec<&str> = one.split('/').collect();
        assert_eq!(segments[0], "a=t");
        assert!(segments[1].len() <= MAX_SEGMENT && segments[1].starts_with("b=éé"));
        assert!(segments[1].contains('~'), "{one}");
        r.set_tag("device_id", format!("{}2", "é".repeat(150)).as_str());
        let mut two = String::new();
        k.render(&r, &mut two).expect("fits");
        assert_ne!(one, two, "distinct values stay distinct");
        k.render(&r, &mut one).expect("fits");
        assert_eq!(one, two, "stable");
        // An escape is never split.
        let escaped = shorten(&"%2F".repeat(100), 60);
        assert!(escaped.len() <= 60 && escaped.split('~').next().is_some_and(|p| p.len() % 3 == 0));
        // A whole-key budget shortens the longest segments first.
        let mut k = KeyTemplate::parse("a={x}/b={y}/c={z}/")
            .expect("valid")
            .with_max_len(300);
        let mut r = Record::new(0);
        for t in ["x", "y", "z"] {
            r.set_tag(t, "v".repeat(180).as_str());
        }
        k.render(&r, &mut one).expect("fits");
        assert!(
            one.len() <= 300 && one.starts_with("a=vvv"),
            "{} {one}",
            one.len()
        );
        let mut k = KeyTemplate::parse("{a}/{b}/{c}/{d}/{e}/{f}/{g}/{h}/")
            .expect("valid")
            .with_max_len(200);
        let mut r = Record::new(0);
        for t in ["a", "b", "c", "d", "e", "f", "g", "h"] {
            r.set_tag(t, "v".repeat(100).as_str());
        }
        assert!(k.render(&r, &mut one).is_err(), "cannot fit: {one}");
    }

    #[test]
    fn known_columns_are_forgotten_after_max_age_unless_declared() {
        let mut declared = Schema::new();
        declared.set(&intern("temp"), ColumnType::F64);
        let mut known = Known::new(declared);
        let t0 = Instant::now();
        let a = evolve(
            &Schema::new(),
            &[record(0, "d", &[("a", Value::I64(1))])],
            false,
        )
        .unwrap_or_default();
        known.absorb(&a, t0);
        assert_eq!(known.schema.len(), 3, "temp, device_id, a");
        let b = evolve(
            &Schema::new(),
            &[record(0, "d", &[("b", Value::I64(1))])],
            false,
        )
        .unwrap_or_default();
        assert_eq!(known.missing(&b).len(), 1);
        // `device_id` is in `b` (kept), `a` is stale, `temp` is declared (kept).
        known.forget_stale(t0 + Duration::from_secs(1), &b);
        assert!(known.schema.get("a").is_none());
        assert!(known.schema.get("temp").is_some() && known.schema.get("device_id").is_some());
        assert_eq!(known.seen.len(), known.schema.len());
    }

    #[test]
    fn evolution_adds_columns_and_widens_integers() {
        let a = vec![record(0, "d", &[("seq", Value::I64(1))])];
        let s = evolve(&Schema::new(), &a, false).expect("new columns");
        assert_eq!(s.get("device_id"), Some(ColumnType::Tag));
        assert_eq!(s.get("seq"), Some(ColumnType::I64));
        assert!(evolve(&s, &a, false).is_none());
        let b = vec![record(0, "d", &[("seq", Value::F64(1.5))])];
        let wider = evolve(&s, &b, false).expect("widened");
        assert_eq!(wider.get("seq"), Some(ColumnType::F64));
        let c = vec![record(0, "d", &[("new", Value::Bool(true))])];
        assert!(
            evolve(&s, &c, true).is_none(),
            "declared schema: fields fixed"
        );
        let d = vec![record(0, "d", &[("time", Value::I64(5))])];
        let t = evolve_except(&Schema::new(), &d, false, "time").expect("tag column");
        assert_eq!(t.get("time"), None, "the time column's name is reserved");
    }

    #[test]
    fn mismatch_policy() {
        let mut s = Schema::new();
        s.set(&intern("temp"), ColumnType::F64);
        s.set(&intern("seq"), ColumnType::I64);
        let int_in_float = record(0, "d", &[("temp", Value::I64(3))]);
        assert!(mismatch(&int_in_float, &s, MismatchPolicy::DeadLetter).is_none());
        let numeric_string = record(0, "d", &[("temp", Value::from("21.5"))]);
        assert!(mismatch(&numeric_string, &s, MismatchPolicy::Coerce).is_none());
        assert!(mismatch(&numeric_string, &s, MismatchPolicy::DeadLetter).is_some());
        let junk = record(0, "d", &[("temp", Value::from("hot"))]);
        let reason = mismatch(&junk, &s, MismatchPolicy::Coerce).expect("mismatch");
        assert!(
            reason.contains("`temp`") && reason.contains("f64"),
            "{reason}"
        );
        let fraction = record(0, "d", &[("seq", Value::F64(2.5))]);
        assert!(mismatch(&fraction, &s, MismatchPolicy::Coerce).is_some());
        let integral = record(0, "d", &[("seq", Value::F64(2.0))]);
        assert!(mismatch(&integral, &s, MismatchPolicy::Coerce).is_none());
    }

    #[test]
    fn record_batch_columns_and_nulls() {
        let records = vec![
            record(
                1_000_000_000,
                "a",
                &[("temp", Value::F64(1.5)), ("seq", Value::I64(1))],
            ),
            record(
                2_000_000_000,
                "b",
                &[("seq", Value::I64(2)), ("ok", Value::Bool(true))],
            ),
        ];
        let schema = evolve(&Schema::new(), &records, false).expect("schema");
        let options = EncodeOptions::default();
        let arrow = arrow_schema(&schema, &options);
        let batch = to_record_batch(&records, &schema, &arrow, &options).expect("batch");
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.num_columns(), 5);
        let temp = batch.column_by_name("temp").expect("temp");
        assert_eq!(temp.null_count(), 1);
        let time = batch
            .column(0)
            .as_any()
            .downcast_ref::<arrow_array::TimestampMicrosecondArray>()
            .expect("us timestamps");
        assert_eq!(time.value(1), 2_000_000);
        assert!(matches!(
            batch
                .column_by_name("device_id")
                .map(|c| c.data_type().clone()),
            Some(DataType::Dictionary(_, _))
        ));
    }
}
