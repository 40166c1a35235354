//! `timestream` sink: writes records to Amazon Timestream with `WriteRecords`.
//!
//! ```toml
//! [sinks.timestream]
//! type = "timestream"
//! inputs = ["devices"]
//! database = "iot"
//! table = "telemetry"
//! region = "eu-west-1"
//! dimensions = ["device_id", "site"]
//! ```
//!
//! By default each record becomes one multi-measure record (all its non-null fields, typed
//! DOUBLE / BIGINT / BOOLEAN / VARCHAR from the field types) named `measure_name`, with the
//! chosen tags as dimensions; `mode = "single"` writes one record per field instead. Records
//! sharing their dimensions are sent together with the dimensions in `CommonAttributes`, at
//! most 100 per request, `in_flight` requests at once. Limits are checked before sending
//! (dimension value ≤ 1 KiB, record ≤ 2 KiB); records over them, with NaN/infinite values or
//! refused by Timestream (`RejectedRecordsException`: version conflict, outside the retention
//! window, …) go to `dead_letter` with the reason, and the rest of their request is delivered.
//! A request refused as a whole without per-record detail (`ValidationException`, another
//! 4xx) is split in halves and each half sent again, down to single records: only the
//! records Timestream refuses on their own are dead-lettered.
//! Throttling, 5xx and network errors are retried with capped exponential backoff; a request
//! still failing after `retry.max_retries` is reported `Errored` (the source redelivers).
//! Every attempt has a deadline (`connect_timeout`, `timeout`): an endpoint that stops
//! answering is retried the same way, each timeout logged at WARN with the endpoint and
//! counted in the sink's `timeouts` metric.
//! Access denied or a missing table stop the sink.
//!
//! With `endpoint_url` set (a local emulator), endpoint discovery is skipped and a plain client
//! is used; without it the client discovers the ingestion endpoint as Timestream requires.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_timestreamwrite::config::retry::RetryConfig as SdkRetryConfig;
use aws_sdk_timestreamwrite::config::timeout::TimeoutConfig;
use aws_sdk_timestreamwrite::config::Region;
use aws_sdk_timestreamwrite::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_timestreamwrite::operation::write_records::WriteRecordsError;
use aws_sdk_timestreamwrite::types::{
    Dimension, DimensionValueType, MeasureValue, MeasureValueType, Record as TsRecord,
    RetentionProperties, TimeUnit,
};
use aws_sdk_timestreamwrite::Client;
use aws_smithy_http_client::tls;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::ack::BatchStatus;
use sluice_core::config::{ByteSize, HumanDuration};
use sluice_core::record::{Record, Value};
use sluice_core::registry::{BuildContext, SinkConfig};
use sluice_core::sink::{BatchConfig, Sink, SinkContext, SinkInput};
use sluice_core::BoxError;
use tokio::task::JoinSet;

use crate::retry::{Backoff, RetryConfig};

/// Timestream's limit of records per `WriteRecords` request.
pub const MAX_RECORDS_PER_REQUEST: usize = 100;
/// Largest dimension value accepted (bytes).
pub const MAX_DIMENSION_VALUE: usize = 1024;
/// Largest record accepted (bytes: dimensions, measure names and values, time).
pub const MAX_RECORD_SIZE: usize = 2048;

/// Writes records to an Amazon Timestream table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TimestreamConfig {
    /// Timestream database. Required.
    pub database: String,
    /// Table in `database`. Required.
    pub table: String,
    /// AWS region. Default: from the environment (AWS_REGION, profile).
    #[serde(default)]
    pub region: Option<String>,
    /// Endpoint URL (e.g. a local emulator); when set, endpoint discovery is skipped.
    /// Default: none (discover the ingestion endpoint).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Record tags written as dimensions (others are left out). Default: all tags.
    #[serde(default)]
    pub dimensions: Option<Vec<String>>,
    /// Name of the multi-measure records (`mode = "multi"`). Default "metrics".
    #[serde(default = "default_measure_name")]
    pub measure_name: String,
    /// "multi": one multi-measure record per record with all its fields; "single": one record
    /// per field, named after the field. Default "multi".
    #[serde(default)]
    pub mode: Mode,
    /// Unit of the written timestamps: "milliseconds", "seconds", "microseconds" or
    /// "nanoseconds" (times are truncated to it). Default "milliseconds".
    #[serde(default)]
    pub time_unit: Unit,
    /// Create the database and table at start-up when they do not exist. Default false (a
    /// missing table stops the pipeline at start-up).
    #[serde(default)]
    pub create_if_missing: bool,
    /// Memory store retention of a created table, in hours. Default 24.
    #[serde(default = "default_memory_hours")]
    pub memory_retention_hours: i64,
    /// Magnetic store retention of a created table, in days. Default 365.
    #[serde(default = "default_magnetic_days")]
    pub magnetic_retention_days: i64,
    /// Batching before writing (each batch is split into requests of at most 100 records).
    /// Default: 500 records / 10MiB / 1s.
    #[serde(default = "default_batch")]
    pub batch: BatchConfig,
    /// `WriteRecords` requests in flight at once. Default 4.
    #[serde(default = "default_in_flight")]
    pub in_flight: usize,
    /// Deadline of one request attempt (connect, send, answer); a timed-out attempt is
    /// retried like a 5xx (`retry`), logged at WARN and counted in `timeouts`. Default "30s".
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Deadline for opening a connection. Default "10s".
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Retries of throttling, 5xx and network errors. Default: 8 retries, 100ms doubling up to
    /// 30s.
    #[serde(default)]
    pub retry: RetryConfig,
}

/// How fields map to Timestream records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One multi-measure record per record.
    #[default]
    Multi,
    /// One single-measure record per field.
    Single,
}

/// Timestamp unit written to Timestream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    #[default]
    Milliseconds,
    Seconds,
    Microseconds,
    Nanoseconds,
}

impl Unit {
    fn nanos(self) -> i64 {
        match self {
            Unit::Nanoseconds => 1,
            Unit::Microseconds => 1_000,
            Unit::Milliseconds => 1_000_000,
            Unit::Seconds => 1_000_000_000,
        }
    }

    fn sdk(self) -> TimeUnit {
        match self {
            Unit::Nanoseconds => TimeUnit::Nanoseconds,
            Unit::Microseconds => TimeUnit::Microseconds,
            Unit::Milliseconds => TimeUnit::Milliseconds,
            Unit::Seconds => TimeUnit::Seconds,
        }
    }
}

fn default_measure_name() -> String {
    "metrics".into()
}
fn default_memory_hours() -> i64 {
    24
}
fn default_magnetic_days() -> i64 {
    365
}
fn default_batch() -> BatchConfig {
    BatchConfig {
        max_records: 500,
        max_bytes: ByteSize(10 * 1024 * 1024),
        max_age: HumanDuration(Duration::from_secs(1)),
    }
}
fn default_in_flight() -> usize {
    4
}
fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

#[async_trait]
impl SinkConfig for TimestreamConfig {
    async fn build(&self, cx: &BuildContext) -> Result<Box<dyn Sink>, BoxError> {
        let name = &cx.name;
        if self.in_flight == 0 {
            return Err(format!("sink `{name}`: `in_flight` must be at least 1").into());
        }
        if self.mode == Mode::Multi && self.measure_name.is_empty() {
            return Err(format!("sink `{name}`: `measure_name` must not be empty").into());
        }
        if self.timeout.0.is_zero() || self.connect_timeout.0.is_zero() {
            return Err(format!(
                "sink `{name}`: `timeout` and `connect_timeout` must be above zero"
            )
            .into());
        }
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
        if let Some(region) = &self.region {
            loader = loader.region(Region::new(region.clone()));
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(format!(
                "sink `{name}`: no AWS region: set `region` or AWS_REGION (or a region in the AWS profile)"
            )
            .into());
        }
        // Retries are ours (backoff with jitter, dead-lettering of rejected records).
        let mut conf = aws_sdk_timestreamwrite::config::Builder::from(&sdk)
            .retry_config(SdkRetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(self.connect_timeout.0)
                    .operation_attempt_timeout(self.timeout.0)
                    .build(),
            );
        // An empty value (`endpoint_url = "${VAR:-}"` with VAR unset) means "not set".
        let endpoint_url = self.endpoint_url.as_deref().filter(|u| !u.is_empty());
        if let Some(url) = endpoint_url {
            conf = conf.endpoint_url(url);
        }
        let client = Client::from_conf(conf.build());
        let endpoint = match endpoint_url {
            Some(url) => url.to_string(),
            None => format!(
                "the discovered Timestream ingestion endpoint of {}",
                sdk.region().map(|r| r.as_ref()).unwrap_or("?")
            ),
        };
        let client = if endpoint_url.is_some() {
            client
        } else {
            let (client, reload) = client.with_endpoint_discovery_enabled().await.map_err(|e| {
                format!("sink `{name}`: Timestream endpoint discovery failed: {e} (check credentials and region)")
            })?;
            tokio::spawn(reload.reload_task());
            client
        };
        let writer = Writer {
            client,
            config: self.clone(),
            name: name.clone(),
            endpoint,
        };
        writer.prepare().await?;
        Ok(Box::new(TimestreamSink { writer }))
    }
}

struct TimestreamSink {
    writer: Writer,
}

/// One `WriteRecords` request: Timestream records, the `dimensions` they all share (sent as
/// `CommonAttributes`), and the records they came from (`owner[i]` is the index in `records` of Timestream record `i`).
struct Request {
    dimensions: Vec<(String, String)>,
    ts: Vec<TsRecord>,
    owner: Vec<usize>,
    records: Vec<Record>,
}

impl Request {
    /// Splits off the second half of the records (with their Timestream records); both
    /// halves keep the common dimensions, which every record of the request has.
    fn split_off_half(&mut self) -> Request {
        let mid = self.records.len() / 2;
        let records = self.records.split_off(mid);
        let at = self.owner.partition_point(|&o| o < mid);
        let ts = self.ts.split_off(at);
        let owner = self
            .owner
            .split_off(at)
            .into_iter()
            .map(|o| o - mid)
            .collect();
        Request {
            dimensions: self.dimensions.clone(),
            ts,
            owner,
            records,
        }
    }
}

/// A record converted for Timestream: its dimensions and its Timestream record(s).
#[derive(Debug, Clone, PartialEq)]
pub struct Converted {
    /// Dimensions, sorted by name.
    pub dimensions: Vec<(String, String)>,
    /// Without dimensions (added per request: shared ones go to `CommonAttributes`).
    pub records: Vec<TsRecord>,
}

/// Converts one record, or says why it cannot be written (the dead-letter reason).
pub fn convert(config: &TimestreamConfig, record: &Record) -> Result<Converted, String> {
    let mut dimensions: Vec<(String, String)> = Vec::new();
    let mut size = 0;
    for (k, v) in &record.tags {
        if v.is_empty() {
            continue;
        }
        if let Some(wanted) = &config.dimensions {
            if !wanted.iter().any(|w| w.as_str() == &**k) {
                continue;
            }
        }
        if v.len() > MAX_DIMENSION_VALUE {
            return Err(format!(
                "timestream: dimension `{k}` is {} bytes; Timestream allows at most {MAX_DIMENSION_VALUE}",
                v.len()
            ));
        }
        size += k.len() + v.len();
        dimensions.push((k.to_string(), v.to_string()));
    }
    dimensions.sort();
    let time = record.time.div_euclid(config.time_unit.nanos()).to_string();
    size += time.len();
    let mut measures: Vec<(String, String, MeasureValueType)> = Vec::new();
    for (name, value) in &record.fields {
        let (text, ty) = match value {
            Value::Null => continue,
            Value::F64(v) if !v.is_finite() => {
                return Err(format!(
                    "timestream: field `{name}` is {v}; Timestream DOUBLE measures must be finite"
                ))
            }
            Value::F64(v) => (
                ryu::Buffer::new().format_finite(*v).to_string(),
                MeasureValueType::Double,
            ),
            Value::I64(v) => (v.to_string(), MeasureValueType::Bigint),
            Value::Bool(v) => (v.to_string(), MeasureValueType::Boolean),
            Value::Str(s) => (s.to_string(), MeasureValueType::Varchar),
        };
        size += name.len() + text.len();
        measures.push((name.to_string(), text, ty));
    }
    if measures.is_empty() {
        return Err("timestream: record has no non-null field to write as a measure".into());
    }
    match config.mode {
        Mode::Multi => size += config.measure_name.len(),
        Mode::Single => size += measures.iter().map(|m| m.0.len()).sum::<usize>(),
    }
    if size > MAX_RECORD_SIZE {
        return Err(format!(
            "timestream: record is {size} bytes; Timestream allows at most {MAX_RECORD_SIZE}"
        ));
    }
    let records = match config.mode {
        Mode::Multi => {
            let values = measures
                .into_iter()
                .map(|(name, value, ty)| {
                    MeasureValue::builder()
                        .name(name)
                        .value(value)
                        .r#type(ty)
                        .build()
                        .map_err(|e| format!("timestream: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            vec![TsRecord::builder()
                .time(time)
                .set_measure_values(Some(values))
                .build()]
        }
        Mode::Single => {
            if measures.len() > MAX_RECORDS_PER_REQUEST {
                return Err(format!(
                    "timestream: {} fields make {} single-measure records, more than one request holds ({MAX_RECORDS_PER_REQUEST})",
                    measures.len(),
                    measures.len()
                ));
            }
            measures
                .into_iter()
                .map(|(name, value, ty)| {
                    TsRecord::builder()
                        .time(time.clone())
                        .measure_name(name)
                        .measure_value(value)
                        .measure_value_type(ty)
                        .build()
                })
                .collect()
        }
    };
    Ok(Converted {
        dimensions,
        records,
    })
}

/// Splits converted records into requests of at most 100 Timestream records (a record's
/// Timestream records never straddle two requests). Records are ordered by dimensions first, so
/// a device's records travel together; dimensions shared by a whole request go to its
/// `CommonAttributes`, the others stay on each record.
fn plan_requests(mut items: Vec<(Converted, Record)>) -> Vec<Request> {
    items.sort_by(|a, b| a.0.dimensions.cmp(&b.0.dimensions));
    let mut requests = Vec::new();
    let mut chunk: Vec<(Converted, Record)> = Vec::new();
    let mut chunk_len = 0;
    for item in items {
        if chunk_len + item.0.records.len() > MAX_RECORDS_PER_REQUEST && !chunk.is_empty() {
            requests.push(request_of(std::mem::take(&mut chunk)));
            chunk_len = 0;
        }
        chunk_len += item.0.records.len();
        chunk.push(item);
    }
    if !chunk.is_empty() {
        requests.push(request_of(chunk));
    }
    requests
}

fn request_of(chunk: Vec<(Converted, Record)>) -> Request {
    let common: Vec<(String, String)> = match chunk.first() {
        Some((first, _)) => first
            .dimensions
            .iter()
            .filter(|d| chunk.iter().all(|(c, _)| c.dimensions.contains(d)))
            .cloned()
            .collect(),
        None => Vec::new(),
    };
    let mut req = Request {
        dimensions: common,
        ts: Vec::new(),
        owner: Vec::new(),
        records: Vec::with_capacity(chunk.len()),
    };
    for (converted, record) in chunk {
        let own: Vec<Dimension> = converted
            .dimensions
            .iter()
            .filter(|d| !req.dimensions.contains(d))
            .filter_map(|(k, v)| dimension(k, v).ok())
            .collect();
        let idx = req.records.len();
        for mut ts in converted.records {
            if !own.is_empty() {
                ts.dimensions = Some(own.clone());
            }
            req.ts.push(ts);
            req.owner.push(idx);
        }
        req.records.push(record);
    }
    req
}

fn dimension(name: &str, value: &str) -> Result<Dimension, String> {
    Dimension::builder()
        .name(name)
        .value(value)
        .dimension_value_type(DimensionValueType::Varchar)
        .build()
        .map_err(|e| format!("timestream: {e}"))
}

#[async_trait]
impl Sink for TimestreamSink {
    async fn run(self: Box<Self>, mut input: SinkInput, cx: SinkContext) -> Result<(), BoxError> {
        let writer = Arc::new(self.writer);
        let cx = Arc::new(cx);
        let batch_config = writer.config.batch;
        let in_flight = writer.config.in_flight;
        let mut tasks: JoinSet<Result<(), BoxError>> = JoinSet::new();
        while let Some(batch) = input.next_batch(&batch_config).await {
            let mut ok = Vec::with_capacity(batch.len());
            let mut rejected: Vec<(String, Vec<Record>)> = Vec::new();
            for record in batch.records {
                match convert(&writer.config, &record) {
                    Ok(c) => ok.push((c, record)),
                    Err(reason) => match rejected.iter_mut().find(|(r, _)| *r == reason) {
                        Some((_, v)) => v.push(record),
                        None => rejected.push((reason, vec![record])),
                    },
                }
            }
            for (reason, records) in rejected {
                cx.reject(records, &reason).await;
            }
            for req in plan_requests(ok) {
                while tasks.len() >= in_flight {
                    if let Some(done) = tasks.join_next().await {
                        done.map_err(|e| format!("timestream write task failed: {e}"))??;
                    }
                }
                let writer = writer.clone();
                let cx = cx.clone();
                tasks.spawn(async move { writer.deliver(req, &cx).await });
            }
        }
        while let Some(done) = tasks.join_next().await {
            done.map_err(|e| format!("timestream write task failed: {e}"))??;
        }
        Ok(())
    }
}

struct Writer {
    client: Client,
    config: TimestreamConfig,
    name: String,
    /// Where requests go, for messages.
    endpoint: String,
}

/// What a failed attempt means.
enum Failure {
    /// Retry later (throttling, 5xx, network).
    Transient(String),
    /// The attempt ran out of time (`timeout` / `connect_timeout`): retried like `Transient`.
    TimedOut(String),
    /// Stop the sink (access denied, missing table, bad credentials).
    Fatal(String),
    /// Some records refused: (Timestream record index, reason).
    Rejected(Vec<(usize, String)>),
    /// The whole request is invalid (validation), without saying which record: split it.
    Invalid(String),
}

impl Writer {
    /// Start-up: create the database and table when asked, then check the table is there and
    /// writable by us (fail loudly otherwise).
    async fn prepare(&self) -> Result<(), BoxError> {
        let (db, table, name) = (&self.config.database, &self.config.table, &self.name);
        if self.config.create_if_missing {
            if let Err(e) = self.client.create_database().database_name(db).send().await {
                if e.code() != Some("ConflictException") {
                    return Err(format!(
                        "sink `{name}`: cannot create Timestream database `{db}`: {}",
                        describe(&e)
                    )
                    .into());
                }
            }
            let retention = RetentionProperties::builder()
                .memory_store_retention_period_in_hours(self.config.memory_retention_hours)
                .magnetic_store_retention_period_in_days(self.config.magnetic_retention_days)
                .build()
                .map_err(|e| format!("sink `{name}`: retention: {e}"))?;
            if let Err(e) = self
                .client
                .create_table()
                .database_name(db)
                .table_name(table)
                .retention_properties(retention)
                .send()
                .await
            {
                if e.code() != Some("ConflictException") {
                    return Err(format!(
                        "sink `{name}`: cannot create Timestream table `{db}.{table}`: {}",
                        describe(&e)
                    )
                    .into());
                }
            }
        }
        if let Err(e) = self
            .client
            .describe_table()
            .database_name(db)
            .table_name(table)
            .send()
            .await
        {
            let hint = if e.code() == Some("ResourceNotFoundException") {
                " (create it, or set `create_if_missing = true`)"
            } else {
                ""
            };
            return Err(format!(
                "sink `{name}`: Timestream table `{db}.{table}` is not usable: {}{hint}",
                describe(&e)
            )
            .into());
        }
        Ok(())
    }

    /// Delivers a request; one refused as a whole without per-record detail is split in
    /// halves, each delivered on its own, down to single records (which are dead-lettered).
    async fn deliver(&self, req: Request, cx: &SinkContext) -> Result<(), BoxError> {
        let mut work = vec![req];
        while let Some(req) = work.pop() {
            if let Some(refused) = self.deliver_one(req, cx).await? {
                let mut first = refused;
                let second = first.split_off_half();
                work.push(second);
                work.push(first);
            }
        }
        Ok(())
    }

    /// Delivers one request with retries. Returns it back when it holds several records and
    /// was refused as a whole (`Failure::Invalid`), for the caller to split.
    async fn deliver_one(
        &self,
        mut req: Request,
        cx: &SinkContext,
    ) -> Result<Option<Request>, BoxError> {
        let mut backoff = Backoff::new(self.config.retry);
        let timeouts = cx.metrics.counter("timeouts");
        loop {
            let started = Instant::now();
            let result = self.write(&req).await;
            cx.metrics.observe_latency(started.elapsed());
            let failure = match result {
                Ok(()) => {
                    finish(cx, &mut req.records, BatchStatus::Delivered);
                    return Ok(None);
                }
                Err(f) => f,
            };
            let failure = match failure {
                Failure::TimedOut(e) => {
                    timeouts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(sink = %self.name, endpoint = %self.endpoint, timeout = %self.config.timeout, records = req.records.len(), "Timestream WriteRecords to {} timed out: {e}", self.endpoint);
                    Failure::Transient(e)
                }
                other => other,
            };
            match failure {
                Failure::TimedOut(e) | Failure::Transient(e) => match backoff.next_delay(None) {
                    Some(delay) => {
                        tracing::warn!(sink = %self.name, error = %e, retry = backoff.retries(), delay_ms = delay.as_millis() as u64, "write failed; retrying");
                        tokio::time::sleep(delay).await;
                    }
                    None => {
                        tracing::error!(sink = %self.name, error = %e, records = req.records.len(), "giving up after {} retries; records will be redelivered", backoff.retries());
                        cx.metrics.add_errors(req.records.len());
                        finish(cx, &mut req.records, BatchStatus::Errored);
                        return Ok(None);
                    }
                },
                Failure::Fatal(e) => {
                    cx.metrics.add_errors(req.records.len());
                    finish(cx, &mut req.records, BatchStatus::Errored);
                    return Err(e.into());
                }
                Failure::Invalid(e) if req.records.len() > 1 => {
                    tracing::debug!(sink = %self.name, error = %e, records = req.records.len(), "request refused as a whole; splitting it to find the bad records");
                    return Ok(Some(req));
                }
                Failure::Invalid(e) => {
                    cx.reject(std::mem::take(&mut req.records), &e).await;
                    return Ok(None);
                }
                Failure::Rejected(rejected) => {
                    // Reasons per input record (a record's single-measure records may be
                    // refused one by one).
                    let mut reasons: Vec<Option<String>> = vec![None; req.records.len()];
                    for (ts_index, reason) in rejected {
                        let Some(&owner) = req.owner.get(ts_index) else {
                            continue;
                        };
                        let slot = &mut reasons[owner];
                        match slot {
                            Some(s) => {
                                s.push_str("; ");
                                s.push_str(&reason);
                            }
                            None => *slot = Some(format!("timestream: rejected: {reason}")),
                        }
                    }
                    let mut delivered = Vec::new();
                    for (record, reason) in
                        std::mem::take(&mut req.records).into_iter().zip(reasons)
                    {
                        match reason {
                            Some(reason) => cx.reject(vec![record], &reason).await,
                            None => delivered.push(record),
                        }
                    }
                    finish(cx, &mut delivered, BatchStatus::Delivered);
                    return Ok(None);
                }
            }
        }
    }

    async fn write(&self, req: &Request) -> Result<(), Failure> {
        let dims = req
            .dimensions
            .iter()
            .map(|(k, v)| dimension(k, v))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Failure::Invalid)?;
        let mut common = TsRecord::builder()
            .set_dimensions((!dims.is_empty()).then_some(dims))
            .time_unit(self.config.time_unit.sdk());
        if self.config.mode == Mode::Multi {
            common = common
                .measure_name(&self.config.measure_name)
                .measure_value_type(MeasureValueType::Multi);
        }
        let result = self
            .client
            .write_records()
            .database_name(&self.config.database)
            .table_name(&self.config.table)
            .common_attributes(common.build())
            .set_records(Some(req.ts.clone()))
            .send()
            .await;
        let err = match result {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        let text = describe(&err);
        let status = err.raw_response().map(|r| r.status().as_u16());
        Err(match &err {
            SdkError::ServiceError(service) => match service.err() {
                WriteRecordsError::RejectedRecordsException(r) => Failure::Rejected(
                    r.rejected_records()
                        .iter()
                        .filter_map(|rr| {
                            let idx = usize::try_from(rr.record_index()).ok()?;
                            let mut reason = rr.reason().unwrap_or("rejected").to_string();
                            if let Some(v) = rr.existing_version() {
                                reason.push_str(&format!(" (existing version {v})"));
                            }
                            Some((idx, reason))
                        })
                        .collect(),
                ),
                WriteRecordsError::ThrottlingException(_)
                | WriteRecordsError::InternalServerException(_)
                | WriteRecordsError::InvalidEndpointException(_) => Failure::Transient(text),
                WriteRecordsError::AccessDeniedException(_)
                | WriteRecordsError::ResourceNotFoundException(_) => Failure::Fatal(format!(
                    "sink `{}`: Timestream refused writes to `{}.{}`: {text}",
                    self.name, self.config.database, self.config.table
                )),
                WriteRecordsError::ValidationException(_) => {
                    Failure::Invalid(format!("timestream: {text}"))
                }
                _ => classify_unknown(status, err.code(), text, &self.name),
            },
            SdkError::TimeoutError(_) => Failure::TimedOut(text),
            SdkError::DispatchFailure(d) if d.is_timeout() => Failure::TimedOut(text),
            _ => match status {
                Some(s) if (400..500).contains(&s) && s != 408 && s != 429 => {
                    classify_unknown(status, err.code(), text, &self.name)
                }
                _ => Failure::Transient(text),
            },
        })
    }
}

fn classify_unknown(status: Option<u16>, code: Option<&str>, text: String, name: &str) -> Failure {
    let auth = matches!(status, Some(401 | 403))
        || code.is_some_and(|c| {
            c.contains("AccessDenied")
                || c.contains("Unrecognized")
                || c.contains("Signature")
                || c.contains("Token")
        });
    if auth {
        return Failure::Fatal(format!(
            "sink `{name}`: Timestream refused the credentials: {text}"
        ));
    }
    match status {
        Some(408 | 429) | Some(500..=599) | None => Failure::Transient(text),
        _ => Failure::Invalid(format!("timestream: {text}")),
    }
}

fn finish(cx: &SinkContext, records: &mut [Record], status: BatchStatus) {
    if status == BatchStatus::Delivered {
        cx.metrics.add_out(records.len());
    }
    for r in records {
        r.finalize(status);
    }
}

/// An SDK error as "Code: message", or its display chain.
fn describe<E, R>(e: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match (e.code(), e.message()) {
        (Some(code), Some(msg)) => format!("{code}: {msg}"),
        (Some(code), None) => code.to_string(),
        _ => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                s.push_str(": ");
                s.push_str(&inner.to_string());
                source = inner.source();
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(mode: Mode) -> TimestreamConfig {
        toml::from_str::<TimestreamConfig>(&format!(
            "database = \"d\"\ntable = \"t\"\nmode = \"{}\"",
            if mode == Mode::Multi {
                "multi"
            } else {
                "single"
            }
        ))
        .expect("config parses")
    }

    fn record(device: &str) -> Record {
        let mut r = Record::new(1_700_000_000_123_456_789);
        r.set_tag("device_id", device);
        r.set_tag("site", "north");
        r.set_field("temp", Value::F64(21.5));
        r.set_field("seq", Value::I64(7));
        r.set_field("ok", Value::Bool(true));
        r.set_field("status", Value::from("online"));
        r.set_field("gone", Value::Null);
        r
    }

    #[test]
    fn multi_measure_record_with_typed_measures() {
        let c = convert(&config(Mode::Multi), &record("d1")).expect("converts");
        assert_eq!(
            c.dimensions,
            vec![
                ("device_id".to_string(), "d1".to_string()),
                ("site".to_string(), "north".to_string())
            ]
        );
        assert_eq!(c.records.len(), 1);
        let r = &c.records[0];
        assert_eq!(r.time(), Some("1700000000123"));
        let got: Vec<(&str, &str, &MeasureValueType)> = r
            .measure_values()
            .iter()
            .map(|m| (m.name(), m.value(), m.r#type()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("temp", "21.5", &MeasureValueType::Double),
                ("seq", "7", &MeasureValueType::Bigint),
                ("ok", "true", &MeasureValueType::Boolean),
                ("status", "online", &MeasureValueType::Varchar),
            ]
        );
    }

    #[test]
    fn single_mode_and_dimension_selection() {
        let mut cfg = config(Mode::Single);
        cfg.dimensions = Some(vec!["device_id".into()]);
        cfg.time_unit = Unit::Seconds;
        let c = convert(&cfg, &record("d1")).expect("converts");
        assert_eq!(
            c.dimensions,
            vec![("device_id".to_string(), "d1".to_string())]
        );
        let names: Vec<_> = c.records.iter().map(|r| r.measure_name()).collect();
        assert_eq!(
            names,
            vec![Some("temp"), Some("seq"), Some("ok"), Some("status")]
        );
        assert_eq!(c.records[0].time(), Some("1700000000"));
        assert_eq!(
            c.records[1].measure_value_type(),
            Some(&MeasureValueType::Bigint)
        );
    }

    #[test]
    fn limits_are_enforced_before_sending() {
        let cfg = config(Mode::Multi);
        let mut r = record(&"x".repeat(1025));
        let err = convert(&cfg, &r).expect_err("dimension too long");
        assert!(err.contains("1025 bytes") && err.contains("1024"), "{err}");
        r.set_tag("device_id", "d");
        r.set_field("blob", Value::from("y".repeat(2100).as_str()));
        let err = convert(&cfg, &r).expect_err("record too large");
        assert!(err.contains("at most 2048"), "{err}");
        let mut r = record("d");
        r.set_field("temp", Value::F64(f64::NAN));
        assert!(convert(&cfg, &r)
            .expect_err("NaN")
            .contains("`temp` is NaN"));
        let mut r = Record::new(0);
        r.set_field("x", Value::Null);
        assert!(convert(&cfg, &r)
            .expect_err("no fields")
            .contains("no non-null field"));
    }

    #[test]
    fn splitting_a_request_keeps_each_records_timestream_records() {
        let cfg = config(Mode::Single);
        let items: Vec<(Converted, Record)> = (0..5)
            .map(|i| {
                let r = record(&format!("d{i}"));
                (convert(&cfg, &r).expect("converts"), r)
            })
            .collect();
        let mut first = plan_requests(items).pop().expect("one request");
        let second = first.split_off_half();
        for (req, n) in [(&first, 2), (&second, 3)] {
            assert_eq!(req.records.len(), n);
            assert_eq!(req.ts.len(), n * 4);
            assert_eq!(req.owner.len(), n * 4);
            for (ts, owner) in req.ts.iter().zip(&req.owner) {
                let device = req.records[*owner].tag("device_id").expect("device");
                let on_record = ts.dimensions().iter().find(|d| d.name() == "device_id");
                assert_eq!(on_record.map(|d| d.value()), Some(device));
            }
        }
    }

    #[test]
    fn requests_hold_at_most_100_records_and_share_common_dimensions() {
        let cfg = config(Mode::Single);
        // 3 devices × 70 records × 4 measures, interleaved.
        let items: Vec<(Converted, Record)> = (0..210)
            .map(|i| {
                let r = record(&format!("d{}", i % 3));
                (convert(&cfg, &r).expect("converts"), r)
            })
            .collect();
        let requests = plan_requests(items);
        let mut total = 0;
        for req in &requests {
            assert!(req.ts.len() <= MAX_RECORDS_PER_REQUEST);
            assert_eq!(req.ts.len(), req.owner.len());
            assert_eq!(
                req.ts.len(),
                req.records.len() * 4,
                "a record is never split"
            );
            // `site` is the same everywhere: always common.
            assert!(req.dimensions.contains(&("site".into(), "north".into())));
            for (ts, owner) in req.ts.iter().zip(&req.owner) {
                let device = req.records[*owner].tag("device_id").expect("device");
                let on_record = ts.dimensions().iter().find(|d| d.name() == "device_id");
                let common = req.dimensions.iter().find(|(k, _)| k == "device_id");
                match (on_record, common) {
                    (Some(d), None) => assert_eq!(d.value(), device),
                    (None, Some((_, v))) => assert_eq!(v, device),
                    other => panic!("device_id must be on the record or common: {other:?}"),
                }
            }
            total += req.records.len();
        }
        assert_eq!(total, 210);
        // 840 Timestream records: 9 requests of 25 records, sorted by device.
        assert_eq!(requests.len(), 9);
        assert!(requests[0]
            .dimensions
            .iter()
            .any(|(k, v)| k == "device_id" && v == "d0"));
    }
}
