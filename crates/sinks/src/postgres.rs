//! `postgres` sink: writes records as rows of a PostgreSQL (or TimescaleDB) table.
//!
//! ```toml
//! [sinks.pg]
//! type = "postgres"
//! inputs = ["messages"]
//! url = "postgres://sluice@127.0.0.1:5432/sluice"   # password: `password` or $PGPASSWORD
//! table = "iot_messages"
//! create_table = true
//! key = ["time", "tenant_id", "project_id"]
//! on_conflict = "nothing"                             # a redelivered message is a no-op
//! retention = "3d"
//! [sinks.pg.columns]
//! time = "time"
//! tenant_id = "tag:tenant"
//! project_id = "tag:project"
//! mqtt_topic = "topic"
//! payload = "payload"
//! created_at = { type = "TIMESTAMPTZ", default = "now()" }
//! ```
//!
//! Each batch is written in one transaction: binary `COPY` into a session-local staging table,
//! then `INSERT INTO table SELECT … FROM staging ON CONFLICT …`, then `COMMIT`; records are
//! `Delivered` only after the COMMIT succeeded. When every column is encoded natively and
//! `on_conflict` is "nothing" or "error", the sink first tries a plain `COPY` into the table
//! (no staging, no per-row conflict check: what `psql \copy` does); a batch that meets an
//! existing key is written again through staging, as are the next 16 batches (a redelivery
//! burst after a restart). Values are converted to the column types on the
//! client, so a value that does not fit its column (a string in a `DOUBLE PRECISION` column, a
//! missing tag for a `NOT NULL` column) is dead-lettered with the column and the value before
//! anything is sent. Rows the server refuses (constraint violations, data exceptions) are found
//! by halving the batch: they go to `dead_letter` with the server's message, the rest is
//! written. Connection errors, serialization failures, deadlocks and server shutdowns are
//! retried with backoff on a fresh connection; when the retries run out the records are
//! `Errored` and the source redelivers them, which `on_conflict = "nothing"` (or `"update"`)
//! turns into a no-op for rows already written.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use futures::SinkExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::ack::BatchStatus;
use sluice_core::config::{ByteSize, HumanDuration, Secret};
use sluice_core::record::{Record, Value};
use sluice_core::registry::{BuildContext, SinkConfig};
use sluice_core::sink::{BatchConfig, Sink, SinkContext, SinkInput};
use sluice_core::BoxError;
use tokio::task::JoinSet;
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::retry::{Backoff, RetryConfig};

/// Writes records as rows of a PostgreSQL table (binary COPY + INSERT … ON CONFLICT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection string, as a URL ("postgres://user@host:5432/db?sslmode=require") or in
    /// libpq key=value form ("host=127.0.0.1 user=sluice dbname=sluice"). `host`, `port`,
    /// `user`, `dbname` and `password` override its parts. It may hold the password, so it is
    /// never logged either. Default: none (host 127.0.0.1, port 5432, user and database
    /// "postgres").
    #[serde(default)]
    pub url: Option<Secret>,
    /// Server host name or address. Default: from `url`, else "127.0.0.1".
    #[serde(default)]
    pub host: Option<String>,
    /// Server port. Default: from `url`, else 5432.
    #[serde(default)]
    pub port: Option<u16>,
    /// Role to connect as. Default: from `url`, else "postgres".
    #[serde(default)]
    pub user: Option<String>,
    /// Database name. Default: from `url`, else the user name.
    #[serde(default)]
    pub dbname: Option<String>,
    /// Password (never logged). Default: from `url`, else the `PGPASSWORD` environment
    /// variable, else none.
    #[serde(default)]
    pub password: Option<Secret>,
    /// TLS, as libpq: "disable"; "prefer" (TLS when the server offers it) and "require"
    /// (TLS or no connection) encrypt without checking the server's certificate unless
    /// `ssl_root_cert` is set (then it must chain to that CA and name the host);
    /// "verify-full" always checks it (against `ssl_root_cert` or the system roots). Default:
    /// from `url`, else "prefer".
    #[serde(default)]
    pub sslmode: Option<SslMode>,
    /// PEM file with the CA certificate(s) that signed the server's certificate. Default: the
    /// system's root certificates.
    #[serde(default)]
    pub ssl_root_cert: Option<std::path::PathBuf>,
    /// Target table, optionally schema-qualified ("telemetry.iot_messages"). Required.
    pub table: String,
    /// Column mapping: column name -> what to write into it: "time" (event time), "topic"
    /// (MQTT/Kafka topic), "payload" (the raw message), "payload:/POINTER" (the value at a JSON
    /// pointer in the raw payload, as JSON text; e.g. "payload:/payload" for the device's
    /// message in a bridge envelope; needs `decode.keep_payload`), "tag:NAME", "field:NAME", or a table
    /// `{ value = "tag:NAME", type = "TEXT", not_null = true, default = "now()" }` (`type`,
    /// `not_null` and `default` are used by `create_table`; a column without `value` is only
    /// created, the server fills it). Default: inferred from the existing table: a column
    /// named `time`, `topic` or `payload` gets that, every other column without a default the
    /// record's tag of the same name, else its field of that name (NULL when neither exists).
    #[serde(default)]
    pub columns: BTreeMap<String, ColumnSpec>,
    /// The conflict key for `on_conflict` (a primary key or unique index of the table).
    /// Default: the table's primary key.
    #[serde(default)]
    pub key: Vec<String>,
    /// What a row whose key already exists does: "nothing" (skip it: redelivered records are
    /// no-ops), "update" (overwrite the mapped non-key columns; within one batch the last
    /// record of a key wins) or "error" (the row is dead-lettered). Default "nothing".
    #[serde(default)]
    pub on_conflict: OnConflict,
    /// Create the table (from `columns`, with `key` as primary key) and its indexes when it
    /// does not exist. Default false.
    #[serde(default)]
    pub create_table: bool,
    /// Indexes `create_table` creates, each a list of column expressions, e.g.
    /// [["tenant_id", "time DESC"]]. Default: one (column, time DESC) index per key column
    /// mapped from a tag.
    #[serde(default)]
    pub indexes: Option<Vec<Vec<String>>>,
    /// Delete rows older than this: the sink runs `DELETE FROM table WHERE <time column> <
    /// now() - retention` at start and every `retention_interval` (plain PostgreSQL; on
    /// TimescaleDB prefer `hypertable.retention`). Default: none (keep everything).
    #[serde(default)]
    pub retention: Option<HumanDuration>,
    /// How often the retention DELETE runs. Default "5m".
    #[serde(default = "default_retention_interval")]
    pub retention_interval: HumanDuration,
    /// TimescaleDB: with `create_table`, convert the table into a hypertable and add a
    /// retention policy, when the `timescaledb` extension is installed in the database
    /// (otherwise a warning, and `hypertable.retention` is run by the sink like `retention`).
    /// Default: none (a plain table).
    #[serde(default)]
    pub hypertable: Option<HypertableConfig>,
    /// Batching: rows per transaction and linger. Default: 5000 records / 16MiB / 1s.
    #[serde(default = "default_batch")]
    pub batch: BatchConfig,
    /// Connections (and so transactions) in flight at once. Default 2.
    #[serde(default = "default_in_flight")]
    pub in_flight: usize,
    /// Deadline of connecting, and of one batch's transaction. Default "30s".
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Retries of transient failures (connection lost, server restarting, serialization
    /// failure, deadlock, timeout). Default: 8 retries, 100ms doubling up to 30s.
    #[serde(default)]
    pub retry: RetryConfig,
}

/// TLS mode of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

/// What an insert whose key exists does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnConflict {
    #[default]
    Nothing,
    Update,
    Error,
}

/// One entry of `columns`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ColumnSpec {
    /// "time", "topic", "payload", "tag:NAME" or "field:NAME".
    Value(String),
    /// The long form.
    Full(ColumnDef),
}

/// The long form of a column mapping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ColumnDef {
    /// What to write: as the short form. Default: nothing (the server fills the column).
    #[serde(default)]
    pub value: Option<String>,
    /// SQL type for `create_table`. Default: TIMESTAMPTZ for "time", DOUBLE PRECISION for a
    /// field, TEXT otherwise.
    #[serde(default, rename = "type")]
    pub sql_type: Option<String>,
    /// `create_table`: NOT NULL. Default: true for "time" and key columns, else false.
    #[serde(default)]
    pub not_null: Option<bool>,
    /// `create_table`: the column's DEFAULT expression, e.g. "now()". Default: none.
    #[serde(default)]
    pub default: Option<String>,
}

/// TimescaleDB hypertable options (`create_table` only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HypertableConfig {
    /// The time column partitioned on. Default: the column mapped from "time".
    #[serde(default)]
    pub time_column: Option<String>,
    /// Chunk interval. Default "1d".
    #[serde(default = "default_chunk")]
    pub chunk: HumanDuration,
    /// Drop chunks older than this (`add_retention_policy`). Default: none.
    #[serde(default)]
    pub retention: Option<HumanDuration>,
}

fn default_chunk() -> HumanDuration {
    HumanDuration(Duration::from_secs(86_400))
}
fn default_retention_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}
fn default_batch() -> BatchConfig {
    BatchConfig {
        max_records: 5000,
        max_bytes: ByteSize(16 * 1024 * 1024),
        max_age: HumanDuration(Duration::from_secs(1)),
    }
}
fn default_in_flight() -> usize {
    2
}
fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

/// Where a column's value comes from.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    Time,
    Topic,
    Payload,
    /// The value at a JSON pointer in the raw payload ("payload:/payload" in a bridge envelope).
    PayloadPointer(String),
    Tag(String),
    Field(String),
    /// Inferred mapping: the tag of this name, else the field.
    TagOrField(String),
}

impl Source {
    fn parse(text: &str) -> Result<Source, String> {
        Ok(match text {
            "time" => Source::Time,
            "topic" => Source::Topic,
            "payload" => Source::Payload,
            _ => match text.split_once(':') {
                Some(("payload", pointer)) if pointer.starts_with('/') => {
                    Source::PayloadPointer(pointer.to_string())
                }
                Some(("tag", name)) if !name.is_empty() => Source::Tag(name.to_string()),
                Some(("field", name)) if !name.is_empty() => Source::Field(name.to_string()),
                _ => {
                    return Err(format!(
                        "{text:?} is not a column value: use \"time\", \"topic\", \"payload\", \"payload:/JSON/POINTER\", \"tag:NAME\" or \"field:NAME\""
                    ))
                }
            },
        })
    }

    fn describe(&self) -> String {
        match self {
            Source::Time => "the time".into(),
            Source::Topic => "a topic".into(),
            Source::Payload => "a payload".into(),
            Source::PayloadPointer(p) => format!("payload value `{p}`"),
            Source::Tag(n) => format!("tag `{n}`"),
            Source::Field(n) => format!("field `{n}`"),
            Source::TagOrField(n) => format!("tag or field `{n}`"),
        }
    }
}

/// How a column is encoded in the binary COPY into the staging table.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Timestamptz,
    Timestamp,
    Text,
    Json,
    Jsonb,
    F8,
    F4,
    I8,
    I4,
    I2,
    Bool,
    Bytea,
    /// Any other type: staged as text, cast by the server in the INSERT.
    Cast,
}

impl Kind {
    fn of(oid: u32) -> Kind {
        match Type::from_oid(oid) {
            Some(Type::TIMESTAMPTZ) => Kind::Timestamptz,
            Some(Type::TIMESTAMP) => Kind::Timestamp,
            Some(Type::TEXT) | Some(Type::VARCHAR) | Some(Type::BPCHAR) | Some(Type::NAME) => {
                Kind::Text
            }
            Some(Type::JSON) => Kind::Json,
            Some(Type::JSONB) => Kind::Jsonb,
            Some(Type::FLOAT8) => Kind::F8,
            Some(Type::FLOAT4) => Kind::F4,
            Some(Type::INT8) => Kind::I8,
            Some(Type::INT4) => Kind::I4,
            Some(Type::INT2) => Kind::I2,
            Some(Type::BOOL) => Kind::Bool,
            Some(Type::BYTEA) => Kind::Bytea,
            _ => Kind::Cast,
        }
    }
}

/// A written column: its name, value source, SQL type and encoding.
#[derive(Debug, Clone)]
struct Column {
    name: String,
    source: Source,
    sql_type: String,
    kind: Kind,
    not_null: bool,
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Quotes an identifier ("a""b"); a dotted name is quoted per part.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_table(name: &str) -> String {
    name.split('.')
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(".")
}

fn interval(d: Duration) -> String {
    format!("{} milliseconds", d.as_millis())
}

/// Cuts `s` for an error message.
fn excerpt(s: &str) -> String {
    const MAX: usize = 120;
    if s.len() <= MAX {
        return format!("{s:?}");
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &s[..end], s.len())
}

/// A value read from a record, before conversion to the column's type.
enum Got<'a> {
    Time(i64),
    Str(&'a str),
    Bytes(&'a [u8]),
    Val(&'a Value),
    /// JSON text (an object, array, number, boolean) taken out of the payload.
    Json(String),
    /// A string taken out of the payload.
    Owned(String),
    Missing,
}

fn get<'a>(record: &'a Record, source: &Source) -> Got<'a> {
    match source {
        Source::Time => Got::Time(record.time),
        Source::Topic => record.meta.topic().map_or(Got::Missing, Got::Str),
        Source::Payload => record.payload.as_deref().map_or(Got::Missing, Got::Bytes),
        Source::PayloadPointer(p) => {
            let Some(payload) = record.payload.as_deref() else {
                return Got::Missing;
            };
            match serde_json::from_slice::<serde_json::Value>(payload) {
                Ok(doc) => match doc.pointer(p) {
                    None | Some(serde_json::Value::Null) => Got::Missing,
                    Some(serde_json::Value::String(s)) => Got::Owned(s.clone()),
                    Some(v) => Got::Json(v.to_string()),
                },
                Err(_) => Got::Missing,
            }
        }
        Source::Tag(n) => record.tag(n).map_or(Got::Missing, Got::Str),
        Source::Field(n) => record.field(n).map_or(Got::Missing, Got::Val),
        Source::TagOrField(n) => match record.tag(n) {
            Some(t) => Got::Str(t),
            None => record.field(n).map_or(Got::Missing, Got::Val),
        },
    }
}

/// Appends one binary COPY field (length + bytes) to `out`.
fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_i32(b.len() as i32);
    out.put_slice(b);
}

fn check_text(s: &str) -> Result<&str, String> {
    if s.contains('\0') {
        return Err(format!("text with a NUL byte {}", excerpt(s)));
    }
    Ok(s)
}

fn parse_num<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, String> {
    s.trim()
        .parse::<T>()
        .map_err(|_| format!("{} is not {what}", excerpt(s)))
}

fn int_in_range(v: i64, kind: Kind) -> Result<i64, String> {
    let (lo, hi, name) = match kind {
        Kind::I2 => (i16::MIN as i64, i16::MAX as i64, "smallint"),
        Kind::I4 => (i32::MIN as i64, i32::MAX as i64, "integer"),
        _ => (i64::MIN, i64::MAX, "bigint"),
    };
    if v < lo || v > hi {
        return Err(format!("{v} is out of range for {name}"));
    }
    Ok(v)
}

fn f64_to_int(v: f64, kind: Kind) -> Result<i64, String> {
    if !v.is_finite() || v.fract() != 0.0 || !(-9.2e18..=9.2e18).contains(&v) {
        return Err(format!("{v} is not an integer"));
    }
    int_in_range(v as i64, kind)
}

fn put_int(out: &mut BytesMut, v: i64, kind: Kind) {
    match kind {
        Kind::I2 => {
            out.put_i32(2);
            out.put_i16(v as i16);
        }
        Kind::I4 => {
            out.put_i32(4);
            out.put_i32(v as i32);
        }
        _ => {
            out.put_i32(8);
            out.put_i64(v);
        }
    }
}

fn put_time(out: &mut BytesMut, ns: i64) {
    out.put_i32(8);
    out.put_i64(ns.div_euclid(1000) - PG_EPOCH_OFFSET_US);
}

fn put_json(out: &mut BytesMut, json: &str, kind: Kind) {
    if kind == Kind::Jsonb {
        out.put_i32(json.len() as i32 + 1);
        out.put_u8(1);
        out.put_slice(json.as_bytes());
    } else {
        put_bytes(out, json.as_bytes());
    }
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "t" | "1" | "yes" | "on" => Ok(true),
        "false" | "f" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("{} is not a boolean", excerpt(s))),
    }
}

/// Encodes a string value into a column of `kind`.
fn put_str(out: &mut BytesMut, s: &str, kind: Kind) -> Result<(), String> {
    match kind {
        Kind::Text | Kind::Cast => put_bytes(out, check_text(s)?.as_bytes()),
        Kind::Json | Kind::Jsonb => {
            let json = serde_json::to_string(check_text(s)?).map_err(|e| e.to_string())?;
            put_json(out, &json, kind);
        }
        Kind::Bytea => put_bytes(out, s.as_bytes()),
        Kind::F8 => {
            out.put_i32(8);
            out.put_f64(parse_num::<f64>(s, "a number")?);
        }
        Kind::F4 => {
            out.put_i32(4);
            out.put_f32(parse_num::<f32>(s, "a number")?);
        }
        Kind::I8 | Kind::I4 | Kind::I2 => {
            let v = int_in_range(parse_num::<i64>(s, "an integer")?, kind)?;
            put_int(out, v, kind);
        }
        Kind::Bool => {
            out.put_i32(1);
            out.put_u8(parse_bool(s)? as u8);
        }
        Kind::Timestamptz | Kind::Timestamp => {
            let ns = sluice_core::json::parse_time(s)
                .map_err(|_| format!("{} is not an RFC 3339 time", excerpt(s)))?;
            put_time(out, ns);
        }
    }
    Ok(())
}

/// Appends the binary COPY field of `got` for column `col`. `Err` says what does not fit.
fn encode(out: &mut BytesMut, col: &Column, got: Got<'_>) -> Result<(), String> {
    let kind = col.kind;
    match got {
        Got::Missing | Got::Val(Value::Null) => {
            if col.not_null {
                return Err(format!(
                    "the column is NOT NULL and the record has no {}",
                    col.source.describe()
                ));
            }
            out.put_i32(-1);
        }
        Got::Time(ns) => match kind {
            Kind::Timestamptz | Kind::Timestamp => put_time(out, ns),
            Kind::I8 => put_int(out, ns, kind),
            Kind::F8 => {
                out.put_i32(8);
                out.put_f64(ns as f64 / 1e9);
            }
            Kind::Text | Kind::Cast | Kind::Json | Kind::Jsonb => {
                put_str(out, &sluice_core::json::format_time(ns), kind)?
            }
            _ => return Err("a time does not fit this column type".into()),
        },
        Got::Str(s) => put_str(out, s, kind)?,
        Got::Owned(s) => put_str(out, &s, kind)?,
        Got::Json(text) => match kind {
            Kind::Json | Kind::Jsonb => put_json(out, &text, kind),
            _ => put_str(out, &text, kind)?,
        },
        Got::Bytes(b) => match kind {
            Kind::Bytea => put_bytes(out, b),
            Kind::Json | Kind::Jsonb => {
                let s = std::str::from_utf8(b)
                    .map_err(|_| "a payload that is not UTF-8".to_string())?;
                if serde_json::from_str::<serde::de::IgnoredAny>(s).is_err() {
                    return Err(format!("the payload is not JSON: {}", excerpt(s)));
                }
                put_json(out, check_text(s)?, kind);
            }
            _ => {
                let s = std::str::from_utf8(b).map_err(|_| {
                    format!(
                        "a payload that is not UTF-8 ({} bytes; use a BYTEA column)",
                        b.len()
                    )
                })?;
                put_str(out, s, kind)?
            }
        },
        Got::Val(Value::Str(s)) => put_str(out, s, kind)?,
        Got::Val(Value::F64(v)) => match kind {
            Kind::F8 => {
                out.put_i32(8);
                out.put_f64(*v);
            }
            Kind::F4 => {
                out.put_i32(4);
                out.put_f32(*v as f32);
            }
            Kind::I8 | Kind::I4 | Kind::I2 => put_int(out, f64_to_int(*v, kind)?, kind),
            Kind::Text | Kind::Cast => put_str(out, &v.to_string(), kind)?,
            Kind::Json | Kind::Jsonb => {
                if !v.is_finite() {
                    return Err(format!("{v} has no JSON form"));
                }
                put_json(out, &serde_json::Value::from(*v).to_string(), kind)
            }
            _ => return Err(format!("the number {v} does not fit this column type")),
        },
        Got::Val(Value::I64(v)) => match kind {
            Kind::I8 | Kind::I4 | Kind::I2 => put_int(out, int_in_range(*v, kind)?, kind),
            Kind::F8 => {
                out.put_i32(8);
                out.put_f64(*v as f64);
            }
            Kind::F4 => {
                out.put_i32(4);
                out.put_f32(*v as f32);
            }
            Kind::Text | Kind::Cast => put_str(out, &v.to_string(), kind)?,
            Kind::Json | Kind::Jsonb => put_json(out, &v.to_string(), kind),
            _ => return Err(format!("the integer {v} does not fit this column type")),
        },
        Got::Val(Value::Bool(v)) => match kind {
            Kind::Bool => {
                out.put_i32(1);
                out.put_u8(*v as u8);
            }
            Kind::Text | Kind::Cast => put_bytes(out, if *v { b"true" } else { b"false" }),
            Kind::Json | Kind::Jsonb => put_json(out, if *v { "true" } else { "false" }, kind),
            _ => return Err(format!("the boolean {v} does not fit this column type")),
        },
    }
    Ok(())
}

/// The value of a record's column as text, for an error message.
fn describe_value(record: &Record, source: &Source) -> String {
    match get(record, source) {
        Got::Time(ns) => sluice_core::json::format_time(ns),
        Got::Str(s) => excerpt(s),
        Got::Owned(s) | Got::Json(s) => excerpt(&s),
        Got::Bytes(b) => excerpt(&String::from_utf8_lossy(b)),
        Got::Val(Value::Str(s)) => excerpt(s),
        Got::Val(v) => v.to_string(),
        Got::Missing => "(missing)".into(),
    }
}

/// Rows encoded for COPY, and the records they came from (row `i` is `records[i]`).
struct Request {
    data: BytesMut,
    rows: Vec<Range<usize>>,
    records: Vec<Record>,
}

impl Request {
    fn new() -> Request {
        Request {
            data: BytesMut::new(),
            rows: Vec::new(),
            records: Vec::new(),
        }
    }

    fn split(mut self) -> (Request, Request) {
        let mid = self.records.len() / 2;
        let mut a = Request::new();
        let mut b = Request::new();
        for (i, record) in self.records.drain(..).enumerate() {
            let target = if i < mid { &mut a } else { &mut b };
            let start = target.data.len();
            target
                .data
                .extend_from_slice(&self.data[self.rows[i].clone()]);
            target.rows.push(start..target.data.len());
            target.records.push(record);
        }
        (a, b)
    }
}

/// The connection settings, built once.
#[derive(Clone)]
struct Connector {
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// "host:port/db" for messages (no credentials).
    target: String,
    timeout: Duration,
}

impl Connector {
    async fn connect(&self) -> Result<Client, String> {
        let fut = async {
            match &self.tls {
                Some(tls) => {
                    let (client, conn) = self.config.connect(tls.clone()).await?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "postgres connection ended");
                        }
                    });
                    Ok::<_, tokio_postgres::Error>(client)
                }
                None => {
                    let (client, conn) = self.config.connect(tokio_postgres::NoTls).await?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "postgres connection ended");
                        }
                    });
                    Ok(client)
                }
            }
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(format!(
                "cannot connect to {}: {}",
                self.target,
                error_text(&e)
            )),
            Err(_) => Err(format!(
                "cannot connect to {}: no answer within {:?}",
                self.target, self.timeout
            )),
        }
    }
}

/// The server's message with its detail, or the client error.
fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} ({})", db.message(), db.code().code());
            if let Some(col) = db.column() {
                let _ = write!(s, "; column `{col}`");
            }
            if let Some(detail) = db.detail() {
                let _ = write!(s, "; {detail}");
            }
            s
        }
        None => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                let _ = write!(s, ": {inner}");
                source = inner.source();
            }
            s
        }
    }
}

/// How a failed transaction is handled.
enum Failure {
    /// Connection lost, server restarting, serialization failure, timeout…: retry.
    Transient(String),
    /// A constraint violation or data exception caused by some row(s): find them.
    Rows(String),
    /// A direct COPY hit an existing key (`on_conflict = "nothing"`): write through staging.
    Duplicate,
}

fn classify(e: &tokio_postgres::Error) -> Failure {
    let text = error_text(e);
    match e.code().map(|c| c.code()) {
        Some(code) if code.starts_with("22") || code.starts_with("23") || code == "21000" => {
            Failure::Rows(text)
        }
        _ => Failure::Transient(text),
    }
}

/// Everything a writer task needs; shared.
struct Shared {
    connector: Connector,
    columns: Vec<Column>,
    stage_ddl: String,
    copy_sql: String,
    insert_sql: String,
    /// COPY straight into the table, when every column is encoded natively and
    /// `on_conflict` is not "update": no staging, no speculative insertion. With "nothing" it
    /// is tried optimistically; a batch holding an existing key is written again through
    /// staging, and so are the next `STAGED_AFTER_DUPLICATE` batches (a redelivery burst).
    direct_copy_sql: Option<String>,
    on_conflict: OnConflict,
    /// Batches left to write through staging after a duplicate.
    staged_left: std::sync::atomic::AtomicU32,
    retry: RetryConfig,
    timeout: Duration,
    name: String,
}

/// After a direct COPY met an existing key, this many batches go through staging.
const STAGED_AFTER_DUPLICATE: u32 = 16;

/// A pooled connection slot (empty until connected, emptied when the connection broke).
struct Slot(Option<Client>);

impl Shared {
    async fn ensure(&self, slot: &mut Slot) -> Result<(), String> {
        if slot.0.as_ref().is_some_and(|c| !c.is_closed()) {
            return Ok(());
        }
        slot.0 = None;
        let client = self.connector.connect().await?;
        client
            .batch_execute(&self.stage_ddl)
            .await
            .map_err(|e| format!("cannot create the staging table: {}", error_text(&e)))?;
        slot.0 = Some(client);
        Ok(())
    }

    /// One transaction: COPY the rows into staging, INSERT … SELECT, COMMIT.
    /// Whether the next batch may try a direct COPY.
    fn direct(&self) -> bool {
        use std::sync::atomic::Ordering;
        match (&self.direct_copy_sql, self.on_conflict) {
            (Some(_), OnConflict::Error) => true,
            (Some(_), OnConflict::Nothing) => self
                .staged_left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_err(),
            _ => false,
        }
    }

    /// One transaction: COPY the rows into staging, INSERT … SELECT, COMMIT (or, `direct`,
    /// COPY into the table and COMMIT).
    async fn write_once(
        &self,
        client: &mut Client,
        req: &Request,
        direct: bool,
    ) -> Result<u64, Failure> {
        let copy_sql = match (&self.direct_copy_sql, direct) {
            (Some(sql), true) => sql,
            _ => &self.copy_sql,
        };
        let work = async {
            let tx = client.transaction().await?;
            let copied = {
                let sink = tx.copy_in::<_, Bytes>(copy_sql).await?;
                let mut sink = std::pin::pin!(sink);
                let mut chunk = BytesMut::with_capacity(256 * 1024);
                chunk.put_slice(b"PGCOPY\n\xff\r\n\0");
                chunk.put_i32(0);
                chunk.put_i32(0);
                for row in &req.rows {
                    chunk.extend_from_slice(&req.data[row.clone()]);
                    if chunk.len() >= 256 * 1024 {
                        sink.send(chunk.split().freeze()).await?;
                    }
                }
                chunk.put_i16(-1);
                sink.send(chunk.freeze()).await?;
                sink.as_mut().finish().await?
            };
            let n = if direct {
                copied
            } else {
                tx.execute(&self.insert_sql, &[]).await?
            };
            tx.commit().await?;
            Ok::<u64, tokio_postgres::Error>(n)
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e))
                if direct
                    && self.on_conflict == OnConflict::Nothing
                    && e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
            {
                Err(Failure::Duplicate)
            }
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(Failure::Transient(format!(
                "the transaction did not finish within {:?}",
                self.timeout
            ))),
        }
    }

    /// Writes `req`, finding rows the server refuses by halving. Every record ends
    /// `Delivered` (after COMMIT), dead-lettered or `Errored` (retries used up).
    async fn deliver(&self, slot: &mut Slot, req: Request, cx: &SinkContext) {
        let retries = cx.metrics.counter("retries");
        let staged = cx.metrics.counter("duplicate_fallbacks");
        let mut work = vec![req];
        while let Some(mut req) = work.pop() {
            let mut backoff = Backoff::new(self.retry);
            let mut direct = self.direct();
            loop {
                let started = Instant::now();
                let result = match self.ensure(slot).await {
                    Err(e) => Err(Failure::Transient(e)),
                    Ok(()) => match slot.0.as_mut() {
                        Some(client) => self.write_once(client, &req, direct).await,
                        None => Err(Failure::Transient("not connected".into())),
                    },
                };
                cx.metrics.observe_latency(started.elapsed());
                match result {
                    Ok(_) => {
                        cx.metrics.add_out(req.records.len());
                        cx.metrics.add_bytes(req.data.len());
                        for r in &mut req.records {
                            r.finalize(BatchStatus::Delivered);
                        }
                        break;
                    }
                    Err(Failure::Duplicate) => {
                        staged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        self.staged_left
                            .store(STAGED_AFTER_DUPLICATE, std::sync::atomic::Ordering::Relaxed);
                        direct = false;
                    }
                    Err(Failure::Rows(message)) => {
                        if req.records.len() == 1 {
                            let reason = format!("postgres: {message}");
                            cx.reject(std::mem::take(&mut req.records), &reason).await;
                        } else {
                            let (a, b) = req.split();
                            work.push(b);
                            work.push(a);
                        }
                        break;
                    }
                    Err(Failure::Transient(message)) => {
                        if slot.0.as_ref().is_some_and(Client::is_closed) {
                            slot.0 = None;
                        }
                        match backoff.next_delay(None) {
                            Some(delay) => {
                                retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                tracing::warn!(sink = %self.name, error = %message, retry = backoff.retries(), ?delay, "postgres write failed; retrying");
                                // A failed statement may have left the session unusable
                                // (e.g. a timeout mid-COPY): start over on a new connection.
                                slot.0 = None;
                                tokio::time::sleep(delay).await;
                            }
                            None => {
                                tracing::error!(sink = %self.name, error = %message, records = req.records.len(), "giving up; records will be redelivered");
                                cx.metrics.add_errors(req.records.len());
                                for r in &mut req.records {
                                    r.finalize(BatchStatus::Errored);
                                }
                                break;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// What `build` found out about the table.
struct TableInfo {
    /// name -> (format_type, type oid, NOT NULL, has default)
    columns: Vec<(String, String, u32, bool, bool)>,
    primary_key: Vec<String>,
}

async fn table_info(client: &Client, table: &str) -> Result<Option<TableInfo>, String> {
    let quoted = quote_table(table);
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid, a.attnotnull, a.atthasdef \
             FROM pg_attribute a WHERE a.attrelid = to_regclass($1::text) AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&quoted],
        )
        .await
        .map_err(|e| format!("cannot read the columns of {table}: {}", error_text(&e)))?;
    if rows.is_empty() {
        return Ok(None);
    }
    let columns = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let pk = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = to_regclass($1::text) AND i.indisprimary ORDER BY k.ord",
            &[&quoted],
        )
        .await
        .map_err(|e| format!("cannot read the primary key of {table}: {}", error_text(&e)))?;
    Ok(Some(TableInfo {
        columns,
        primary_key: pk.iter().map(|r| r.get(0)).collect(),
    }))
}

/// A `columns` entry: column name, value source (none: the server fills it), the spec.
type Mapped<'a> = (String, Option<Source>, &'a ColumnSpec);

impl PostgresConfig {
    /// The mapped (written) columns in declaration order, parsed.
    fn mapping(&self) -> Result<Vec<Mapped<'_>>, String> {
        self.columns
            .iter()
            .map(|(name, spec)| {
                let value = match spec {
                    ColumnSpec::Value(v) => Some(v.as_str()),
                    ColumnSpec::Full(d) => d.value.as_deref(),
                };
                let source = value
                    .map(Source::parse)
                    .transpose()
                    .map_err(|e| format!("`columns.{name}`: {e}"))?;
                Ok((name.clone(), source, spec))
            })
            .collect()
    }

    fn time_column(&self) -> Option<String> {
        self.columns.iter().find_map(|(name, spec)| {
            let v = match spec {
                ColumnSpec::Value(v) => Some(v.as_str()),
                ColumnSpec::Full(d) => d.value.as_deref(),
            };
            (v == Some("time")).then(|| name.clone())
        })
    }

    /// CREATE TABLE / CREATE INDEX statements for `create_table`.
    fn create_statements(&self) -> Result<Vec<String>, String> {
        if self.columns.is_empty() {
            return Err("`create_table` needs `columns` (the types come from the mapping)".into());
        }
        let table = quote_table(&self.table);
        let mut defs = Vec::new();
        for (name, source, spec) in self.mapping()? {
            let def = match spec {
                ColumnSpec::Full(d) => Some(d),
                ColumnSpec::Value(_) => None,
            };
            let sql_type = def
                .and_then(|d| d.sql_type.clone())
                .unwrap_or_else(|| match source {
                    Some(Source::Time) => "TIMESTAMPTZ".into(),
                    Some(Source::Field(_)) => "DOUBLE PRECISION".into(),
                    _ => "TEXT".into(),
                });
            let not_null = def
                .and_then(|d| d.not_null)
                .unwrap_or(source == Some(Source::Time) || self.key.contains(&name));
            let mut col = format!("{} {sql_type}", quote_ident(&name));
            if not_null {
                col.push_str(" NOT NULL");
            }
            if let Some(default) = def.and_then(|d| d.default.as_deref()) {
                let _ = write!(col, " DEFAULT {default}");
            }
            defs.push(col);
        }
        if !self.key.is_empty() {
            let key: Vec<String> = self.key.iter().map(|k| quote_ident(k)).collect();
            defs.push(format!("PRIMARY KEY ({})", key.join(", ")));
        }
        let mut out = vec![format!(
            "CREATE TABLE IF NOT EXISTS {table} ({})",
            defs.join(", ")
        )];
        let time = self.time_column();
        let indexes = match &self.indexes {
            Some(ix) => ix.clone(),
            None => {
                let tags: Vec<String> = self
                    .mapping()?
                    .into_iter()
                    .filter(|(n, s, _)| {
                        matches!(s, Some(Source::Tag(_))) && self.key.iter().any(|k| k == n)
                    })
                    .map(|(n, _, _)| n)
                    .collect();
                match &time {
                    Some(t) => tags
                        .into_iter()
                        .map(|c| vec![quote_ident(&c), format!("{} DESC", quote_ident(t))])
                        .collect(),
                    None => Vec::new(),
                }
            }
        };
        let base = self.table.rsplit('.').next().unwrap_or(&self.table);
        for cols in indexes {
            let suffix: String = cols
                .iter()
                .map(|c| {
                    c.chars()
                        .filter(|ch| ch.is_ascii_alphanumeric() || *ch == '_' || *ch == ' ')
                        .collect::<String>()
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_string()
                })
                .collect::<Vec<_>>()
                .join("_");
            let name: String = format!("{base}_{suffix}_idx").chars().take(63).collect();
            out.push(format!(
                "CREATE INDEX IF NOT EXISTS {} ON {table} ({})",
                quote_ident(&name),
                cols.join(", ")
            ));
        }
        Ok(out)
    }

    fn connector(&self) -> Result<Connector, String> {
        let mut pg = match &self.url {
            Some(url) => url
                .expose()
                .parse::<tokio_postgres::Config>()
                .map_err(|e| format!("`url`: cannot parse the connection string: {e}"))?,
            None => tokio_postgres::Config::new(),
        };
        if let Some(h) = &self.host {
            pg.host(h);
        } else if pg.get_hosts().is_empty() {
            pg.host("127.0.0.1");
        }
        if let Some(p) = self.port {
            pg.port(p);
        }
        if let Some(u) = &self.user {
            pg.user(u);
        } else if pg.get_user().is_none() {
            pg.user("postgres");
        }
        if let Some(d) = &self.dbname {
            pg.dbname(d);
        }
        if let Some(p) = &self.password {
            pg.password(p.expose());
        } else if pg.get_password().is_none() {
            if let Ok(p) = std::env::var("PGPASSWORD") {
                pg.password(p);
            }
        }
        if let Some(mode) = self.sslmode {
            pg.ssl_mode(match mode {
                SslMode::Disable => PgSslMode::Disable,
                SslMode::Prefer => PgSslMode::Prefer,
                SslMode::Require | SslMode::VerifyFull => PgSslMode::Require,
            });
        }
        let verify = self.sslmode == Some(SslMode::VerifyFull) || self.ssl_root_cert.is_some();
        pg.connect_timeout(self.timeout.0.min(Duration::from_secs(10)));
        pg.application_name("sluice");
        let tls = match pg.get_ssl_mode() {
            PgSslMode::Disable => None,
            _ => Some(tokio_postgres_rustls::MakeRustlsConnect::new(
                self.tls_config(verify)?,
            )),
        };
        let host = match pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "?".into(),
        };
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let target = format!(
            "PostgreSQL at {host}:{port}/{} as {}",
            pg.get_dbname().or(pg.get_user()).unwrap_or("?"),
            pg.get_user().unwrap_or("?")
        );
        Ok(Connector {
            config: pg,
            tls,
            target,
            timeout: self.timeout.0,
        })
    }

    /// The rustls configuration; `verify` = check the server's certificate (else encrypt
    /// only, as libpq's "prefer"/"require" without a root certificate).
    fn tls_config(&self, verify: bool) -> Result<rustls::ClientConfig, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: {e}"))?;
        if !verify {
            return Ok(builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
                .with_no_client_auth());
        }
        let mut roots = rustls::RootCertStore::empty();
        match &self.ssl_root_cert {
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("`ssl_root_cert` = {}: {e}", path.display()))?;
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert =
                        cert.map_err(|e| format!("`ssl_root_cert` = {}: {e}", path.display()))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("`ssl_root_cert` = {}: {e}", path.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!(
                        "`ssl_root_cert` = {}: no PEM certificate in the file",
                        path.display()
                    ));
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        Ok(builder.with_root_certificates(roots).with_no_client_auth())
    }
}

/// libpq's "prefer"/"require" without a root certificate: the connection is encrypted, the
/// server's certificate is not checked (its signatures over the handshake still are).
#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[async_trait]
impl SinkConfig for PostgresConfig {
    async fn build(&self, cx: &BuildContext) -> Result<Box<dyn Sink>, BoxError> {
        let name = &cx.name;
        if self.in_flight == 0 {
            return Err("`in_flight` must be at least 1".into());
        }
        if self.table.is_empty() {
            return Err("`table` must not be empty".into());
        }
        let mapping = self.mapping()?;
        let connector = self.connector()?;
        let client = connector
            .connect()
            .await
            .map_err(|e| format!("sink `{name}`: {e} (is the server running, and are `url`/`host`/`user`/password right?)"))?;

        if self.create_table {
            for stmt in self.create_statements()? {
                client
                    .batch_execute(&stmt)
                    .await
                    .map_err(|e| format!("sink `{name}`: {stmt}: {}", error_text(&e)))?;
            }
            if let Some(h) = &self.hypertable {
                self.hypertable_setup(&client, h, name).await?;
            }
        } else if self.hypertable.is_some() {
            return Err("`hypertable` needs `create_table = true`".into());
        }

        let info = table_info(&client, &self.table).await?.ok_or_else(|| {
            format!(
                "sink `{name}`: table {} does not exist in {} (create it, or set `create_table = true` with `columns`)",
                self.table, connector.target
            )
        })?;

        // Written columns: the mapping, or inferred from the table.
        let mut columns = Vec::new();
        let find = |col: &str| info.columns.iter().find(|c| c.0 == col);
        if mapping.is_empty() {
            for (col, ty, oid, not_null, has_default) in &info.columns {
                let source = match col.as_str() {
                    "time" => Source::Time,
                    "topic" => Source::Topic,
                    "payload" => Source::Payload,
                    _ if *has_default => continue,
                    other => Source::TagOrField(other.to_string()),
                };
                columns.push(Column {
                    name: col.clone(),
                    source,
                    sql_type: ty.clone(),
                    kind: Kind::of(*oid),
                    not_null: *not_null,
                });
            }
        } else {
            for (col, source, _) in mapping {
                let Some(source) = source else { continue };
                let (_, ty, oid, not_null, _) = find(&col).ok_or_else(|| {
                    format!(
                        "sink `{name}`: `columns.{col}`: table {} has no column {col:?} (it has: {})",
                        self.table,
                        info.columns.iter().map(|c| c.0.as_str()).collect::<Vec<_>>().join(", ")
                    )
                })?;
                columns.push(Column {
                    name: col,
                    source,
                    sql_type: ty.clone(),
                    kind: Kind::of(*oid),
                    not_null: *not_null,
                });
            }
        }
        if columns.is_empty() {
            return Err(format!("sink `{name}`: no column to write").into());
        }

        let key = if self.key.is_empty() {
            info.primary_key.clone()
        } else {
            for k in &self.key {
                if !columns.iter().any(|c| &c.name == k) {
                    return Err(format!(
                        "sink `{name}`: `key` column {k:?} is not a written column of {}",
                        self.table
                    )
                    .into());
                }
            }
            self.key.clone()
        };
        if self.on_conflict == OnConflict::Update && key.is_empty() {
            return Err(format!(
                "sink `{name}`: `on_conflict = \"update\"` needs `key` (table {} has no primary key)",
                self.table
            )
            .into());
        }

        // The staging table: same types as the target (text for those cast by the server),
        // plus the row's position for `update` (the last record of a key wins).
        let stage_cols: Vec<String> = columns
            .iter()
            .map(|c| {
                let ty = if c.kind == Kind::Cast {
                    "text"
                } else {
                    c.sql_type.as_str()
                };
                format!("{} {ty}", quote_ident(&c.name))
            })
            .collect();
        let stage_ddl = format!(
            "CREATE TEMP TABLE IF NOT EXISTS sluice_stage ({}, sluice_ord bigint GENERATED ALWAYS AS IDENTITY) ON COMMIT DELETE ROWS",
            stage_cols.join(", ")
        );
        let names: Vec<String> = columns.iter().map(|c| quote_ident(&c.name)).collect();
        let direct_copy_sql = (self.on_conflict != OnConflict::Update
            && columns.iter().all(|c| c.kind != Kind::Cast))
        .then(|| {
            format!(
                "COPY {} ({}) FROM STDIN (FORMAT binary)",
                quote_table(&self.table),
                names.join(", ")
            )
        });
        let copy_sql = format!(
            "COPY sluice_stage ({}) FROM STDIN (FORMAT binary)",
            names.join(", ")
        );
        let select: Vec<String> = columns
            .iter()
            .map(|c| {
                if c.kind == Kind::Cast {
                    format!("CAST({} AS {})", quote_ident(&c.name), c.sql_type)
                } else {
                    quote_ident(&c.name)
                }
            })
            .collect();
        let key_q: Vec<String> = key.iter().map(|k| quote_ident(k)).collect();
        let table = quote_table(&self.table);
        let insert_sql = match self.on_conflict {
            OnConflict::Error => format!(
                "INSERT INTO {table} ({}) SELECT {} FROM sluice_stage",
                names.join(", "),
                select.join(", ")
            ),
            OnConflict::Nothing => format!(
                "INSERT INTO {table} ({}) SELECT {} FROM sluice_stage ON CONFLICT {} DO NOTHING",
                names.join(", "),
                select.join(", "),
                if key.is_empty() {
                    String::new()
                } else {
                    format!("({})", key_q.join(", "))
                }
            ),
            OnConflict::Update => {
                let set: Vec<String> = columns
                    .iter()
                    .filter(|c| !key.contains(&c.name))
                    .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(&c.name)))
                    .collect();
                let action = if set.is_empty() {
                    "NOTHING".to_string()
                } else {
                    format!("UPDATE SET {}", set.join(", "))
                };
                format!(
                    "INSERT INTO {table} ({}) SELECT DISTINCT ON ({}) {} FROM sluice_stage ORDER BY {}, sluice_ord DESC ON CONFLICT ({}) DO {action}",
                    names.join(", "),
                    key_q.join(", "),
                    select.join(", "),
                    key_q.join(", "),
                    key_q.join(", "),
                )
            }
        };
        // Check the statements now (a key without a unique index, a cast that does not exist)
        // rather than on the first batch.
        client
            .batch_execute(&stage_ddl)
            .await
            .map_err(|e| format!("sink `{name}`: {stage_ddl}: {}", error_text(&e)))?;
        client
            .prepare(&insert_sql)
            .await
            .map_err(|e| format!("sink `{name}`: {insert_sql}: {}", error_text(&e)))?;

        let retention = match (&self.retention, &self.hypertable) {
            (Some(r), _) => Some(r.0),
            (None, Some(h)) if !has_timescaledb(&client).await => h.retention.map(|r| r.0),
            _ => None,
        };
        let retention = match retention {
            Some(r) => {
                let column = self
                    .hypertable
                    .as_ref()
                    .and_then(|h| h.time_column.clone())
                    .or_else(|| {
                        columns
                            .iter()
                            .find(|c| c.source == Source::Time)
                            .map(|c| c.name.clone())
                    })
                    .ok_or_else(|| {
                        format!("sink `{name}`: `retention` needs a column mapped from \"time\"")
                    })?;
                Some(format!(
                    "DELETE FROM {table} WHERE {} < now() - interval '{}'",
                    quote_ident(&column),
                    interval(r)
                ))
            }
            None => None,
        };
        tracing::info!(sink = %name, target = %connector.target, table = %self.table, columns = columns.len(), "postgres sink connected");
        Ok(Box::new(PostgresSink {
            shared: Arc::new(Shared {
                connector,
                columns,
                stage_ddl,
                copy_sql,
                insert_sql,
                direct_copy_sql,
                on_conflict: self.on_conflict,
                staged_left: std::sync::atomic::AtomicU32::new(0),
                retry: self.retry,
                timeout: self.timeout.0,
                name: name.clone(),
            }),
            first: Some(client),
            batch: self.batch,
            in_flight: self.in_flight,
            retention,
            retention_interval: self.retention_interval.0,
        }))
    }
}

async fn has_timescaledb(client: &Client) -> bool {
    client
        .query_opt(
            "SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'",
            &[],
        )
        .await
        .ok()
        .flatten()
        .is_some()
}

impl PostgresConfig {
    async fn hypertable_setup(
        &self,
        client: &Client,
        h: &HypertableConfig,
        name: &str,
    ) -> Result<(), BoxError> {
        if !has_timescaledb(client).await {
            tracing::warn!(sink = %name, table = %self.table, "`hypertable` is set but the timescaledb extension is not installed: a plain table is used, and the sink runs `hypertable.retention` as a periodic DELETE");
            return Ok(());
        }
        let column = h
            .time_column
            .clone()
            .or_else(|| self.time_column())
            .ok_or("`hypertable` needs `time_column` or a column mapped from \"time\"")?;
        let table = quote_table(&self.table);
        let stmt = format!(
            "SELECT create_hypertable('{}', '{}', chunk_time_interval => interval '{}', if_not_exists => TRUE, migrate_data => TRUE)",
            table.replace('\'', "''"),
            column.replace('\'', "''"),
            interval(h.chunk.0)
        );
        client
            .batch_execute(&stmt)
            .await
            .map_err(|e| format!("sink `{name}`: {stmt}: {}", error_text(&e)))?;
        if let Some(r) = h.retention {
            let stmt = format!(
                "SELECT add_retention_policy('{}', interval '{}', if_not_exists => TRUE)",
                table.replace('\'', "''"),
                interval(r.0)
            );
            client
                .batch_execute(&stmt)
                .await
                .map_err(|e| format!("sink `{name}`: {stmt}: {}", error_text(&e)))?;
        }
        Ok(())
    }
}

struct PostgresSink {
    shared: Arc<Shared>,
    /// The connection `build` opened (already has the staging table).
    first: Option<Client>,
    batch: BatchConfig,
    in_flight: usize,
    /// The retention DELETE statement, when `retention` is set.
    retention: Option<String>,
    retention_interval: Duration,
}

impl PostgresSink {
    /// Encodes `records` into COPY rows; the ones that do not fit their columns go to
    /// `rejected` with the reason.
    fn encode(&self, records: Vec<Record>, rejected: &mut Vec<(String, Record)>) -> Request {
        let columns = &self.shared.columns;
        let mut req = Request::new();
        req.data.reserve(records.len() * 64);
        for record in records {
            let start = req.data.len();
            req.data.put_i16(columns.len() as i16);
            let mut failed = None;
            for col in columns {
                if let Err(e) = encode(&mut req.data, col, get(&record, &col.source)) {
                    failed = Some(format!(
                        "postgres: column `{}` ({}) from {} = {}: {e}",
                        col.name,
                        col.sql_type,
                        col.source.describe(),
                        describe_value(&record, &col.source)
                    ));
                    break;
                }
            }
            match failed {
                Some(reason) => {
                    req.data.truncate(start);
                    rejected.push((reason, record));
                }
                None => {
                    req.rows.push(start..req.data.len());
                    req.records.push(record);
                }
            }
        }
        req
    }
}

#[async_trait]
impl Sink for PostgresSink {
    async fn run(self: Box<Self>, mut input: SinkInput, cx: SinkContext) -> Result<(), BoxError> {
        let mut this = *self;
        let first = this.first.take();
        let this = this;
        let cx = Arc::new(cx);
        let retention_task = this.retention.clone().map(|stmt| {
            let shared = this.shared.clone();
            let every = this.retention_interval;
            let deleted = cx.metrics.counter("retention_deleted");
            tokio::spawn(async move { retention_loop(shared, stmt, every, deleted).await })
        });
        let mut idle: Vec<Slot> = (0..this.in_flight).map(|_| Slot(None)).collect();
        if let Some(slot) = idle.first_mut() {
            slot.0 = first;
        }
        let mut tasks: JoinSet<Slot> = JoinSet::new();
        while let Some(batch) = input.next_batch(&this.batch).await {
            let mut rejected = Vec::new();
            let req = this.encode(batch.records, &mut rejected);
            // Group the rejected records by reason (one dead-letter batch per reason).
            let mut by_reason: Vec<(String, Vec<Record>)> = Vec::new();
            for (reason, record) in rejected {
                match by_reason.iter_mut().find(|(r, _)| *r == reason) {
                    Some((_, v)) => v.push(record),
                    None => by_reason.push((reason, vec![record])),
                }
            }
            for (reason, records) in by_reason {
                cx.reject(records, &reason).await;
            }
            if req.records.is_empty() {
                continue;
            }
            let mut slot = match idle.pop() {
                Some(s) => s,
                None => match tasks.join_next().await {
                    Some(Ok(s)) => s,
                    Some(Err(e)) => return Err(format!("postgres write task failed: {e}").into()),
                    None => Slot(None),
                },
            };
            let shared = this.shared.clone();
            let cx = cx.clone();
            tasks.spawn(async move {
                shared.deliver(&mut slot, req, &cx).await;
                slot
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.map_err(|e| format!("postgres write task failed: {e}"))?;
        }
        if let Some(t) = retention_task {
            t.abort();
        }
        Ok(())
    }
}

/// Runs the retention DELETE now and every `every`, on its own connection.
async fn retention_loop(
    shared: Arc<Shared>,
    stmt: String,
    every: Duration,
    deleted: Arc<std::sync::atomic::AtomicI64>,
) {
    let mut client: Option<Client> = None;
    loop {
        if client.as_ref().is_none_or(Client::is_closed) {
            client = shared.connector.connect().await.ok();
        }
        if let Some(c) = &client {
            match c.execute(&stmt, &[]).await {
                Ok(n) => {
                    deleted.fetch_add(n as i64, std::sync::atomic::Ordering::Relaxed);
                    if n > 0 {
                        tracing::info!(sink = %shared.name, rows = n, "retention: deleted old rows");
                    }
                }
                Err(e) => {
                    tracing::warn!(sink = %shared.name, error = %error_text(&e), "retention DELETE failed; retrying at the next interval")
                }
            }
        } else {
            tracing::warn!(sink = %shared.name, "retention: cannot connect; retrying at the next interval");
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(kind: Kind, not_null: bool) -> Column {
        Column {
            name: "c".into(),
            source: Source::Field("f".into()),
            sql_type: "t".into(),
            kind,
            not_null,
        }
    }

    #[test]
    fn sources_parse() {
        assert_eq!(Source::parse("time"), Ok(Source::Time));
        assert_eq!(
            Source::parse("tag:tenant"),
            Ok(Source::Tag("tenant".into()))
        );
        assert_eq!(Source::parse("field:t"), Ok(Source::Field("t".into())));
        assert!(Source::parse("tag:").is_err());
        assert!(Source::parse("nonsense").is_err());
    }

    #[test]
    fn encodes_and_refuses_values() {
        let mut out = BytesMut::new();
        encode(&mut out, &col(Kind::F8, false), Got::Val(&Value::I64(3))).expect("int as float");
        assert_eq!(&out[..], &[0, 0, 0, 8, 64, 8, 0, 0, 0, 0, 0, 0]);
        out.clear();
        let e = encode(&mut out, &col(Kind::F8, false), Got::Str("abc")).expect_err("text");
        assert!(e.contains("\"abc\" is not a number"), "{e}");
        let e = encode(
            &mut out,
            &col(Kind::I2, false),
            Got::Val(&Value::I64(70_000)),
        )
        .expect_err("range");
        assert!(e.contains("out of range for smallint"), "{e}");
        let e = encode(&mut out, &col(Kind::Text, true), Got::Missing).expect_err("not null");
        assert!(e.contains("NOT NULL"), "{e}");
        out.clear();
        encode(
            &mut out,
            &col(Kind::Jsonb, false),
            Got::Val(&Value::Bool(false)),
        )
        .expect("json");
        assert_eq!(&out[..], b"\0\0\0\x06\x01false");
        let e =
            encode(&mut out, &col(Kind::Jsonb, false), Got::Bytes(b"{oops")).expect_err("bad json");
        assert!(e.contains("not JSON"), "{e}");
        let e = encode(&mut out, &col(Kind::Text, false), Got::Str("a\0b")).expect_err("nul");
        assert!(e.contains("NUL"), "{e}");
    }

    #[test]
    fn payload_pointer_takes_json_out_of_an_envelope() {
        let mut r = Record::new(0);
        r.payload = Some(Bytes::from_static(
            br#"{"tenant_id":"acme","payload":{"temp":21.5,"s":"x"},"note":"hi"}"#,
        ));
        let text = |source: &str| {
            let mut out = BytesMut::new();
            let source = Source::parse(source).expect("source");
            encode(&mut out, &col(Kind::Text, false), get(&r, &source)).expect("encode");
            String::from_utf8(out[4..].to_vec()).expect("utf8")
        };
        assert_eq!(text("payload:/payload"), r#"{"temp":21.5,"s":"x"}"#);
        assert_eq!(text("payload:/note"), "hi");
        assert!(matches!(
            get(&r, &Source::parse("payload:/missing").expect("source")),
            Got::Missing
        ));
    }

    #[test]
    fn times_are_microseconds_since_2000() {
        let mut out = BytesMut::new();
        encode(
            &mut out,
            &col(Kind::Timestamptz, true),
            Got::Time(946_684_800_000_001_999),
        )
        .expect("time");
        assert_eq!(&out[4..], &1i64.to_be_bytes());
    }

    #[test]
    fn create_statements_from_mapping() {
        let config: PostgresConfig = toml::from_str(
            r#"
table = "iot_messages"
key = ["time", "tenant_id", "project_id"]
create_table = true
[columns]
time = "time"
tenant_id = "tag:tenant"
project_id = "tag:project"
mqtt_topic = "topic"
payload = "payload"
created_at = { type = "TIMESTAMPTZ", default = "now()" }
"#,
        )
        .expect("config");
        let stmts = config.create_statements().expect("statements");
        assert!(
            stmts[0].contains("\"tenant_id\" TEXT NOT NULL"),
            "{}",
            stmts[0]
        );
        assert!(
            stmts[0].contains("\"created_at\" TIMESTAMPTZ DEFAULT now()"),
            "{}",
            stmts[0]
        );
        assert!(
            stmts[0].contains("PRIMARY KEY (\"time\", \"tenant_id\", \"project_id\")"),
            "{}",
            stmts[0]
        );
        assert_eq!(stmts.len(), 3, "{stmts:?}");
        assert!(
            stmts[1].contains("(\"project_id\", \"time\" DESC)"),
            "{}",
            stmts[1]
        );
        assert!(
            stmts[2].contains("(\"tenant_id\", \"time\" DESC)"),
            "{}",
            stmts[2]
        );
    }
}
