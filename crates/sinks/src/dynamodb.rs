//! `dynamodb` sink: keeps the latest state of each device in one Amazon DynamoDB item (the
//! device-shadow "reported" document), written only when the record is newer than the item.
//!
//! ```toml
//! [sinks.state]
//! type = "dynamodb"
//! inputs = ["devices"]
//! table = "device_state"
//! region = "eu-west-1"
//! key = "{device_id}"          # value of the partition key (a template of tags)
//! key_attribute = "deviceId"   # the table's partition key (a string)
//! ttl = "7d"                   # items expire 7 days after the device's last reading
//! ```
//!
//! Each record becomes one `UpdateItem` that SETs the record's tags and non-null fields (all by
//! default, or the ones listed in `tags` / `fields`), its event time (`event_time_attribute`,
//! epoch milliseconds) and, with `ttl`, the expiry (`ttl_attribute`, epoch seconds), under the
//! condition `attribute_not_exists(event_time) OR event_time < :new`: an older or redelivered
//! record never overwrites a newer state, whatever order records arrive in. A refused condition
//! (`ConditionalCheckFailedException`) means "superseded": the record is Delivered and counted
//! in the `superseded` metric. Within a batch only the newest record per key is written; the
//! older ones share its fate (counted in `coalesced`). Attributes a record does not carry keep
//! their value on the item (partial updates merge, like a shadow's reported document).
//!
//! Up to `in_flight` `UpdateItem`s run at once. Throttling (`ProvisionedThroughputExceeded`,
//! `RequestLimitExceeded`, `ThrottlingException`), 5xx, timeouts and connection errors are
//! retried with capped exponential backoff (`retry`); after the last retry the record is
//! `Errored` (the source redelivers). Records that cannot be written (no key tag, an empty or
//! over-long key, a NaN / infinite / out-of-range number, an item over 400 KB) or refused by
//! DynamoDB (`ValidationException`, another 4xx) go to `dead_letter` with the reason. A missing
//! table or refused credentials stop the sink.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_dynamodb::config::retry::RetryConfig as SdkRetryConfig;
use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::config::Region;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, TableStatus, TimeToLiveSpecification,
};
use aws_sdk_dynamodb::Client;
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

use crate::encoding::Template;
use crate::retry::{Backoff, RetryConfig};

/// DynamoDB's limit on a partition key value (bytes).
pub const MAX_KEY_BYTES: usize = 2048;
/// DynamoDB's limit on an item (bytes: attribute names and values).
pub const MAX_ITEM_BYTES: usize = 400 * 1024;
/// DynamoDB numbers are below this magnitude (at most 9.99…e125, 38 digits).
const NUMBER_LIMIT: f64 = 1e126;
/// Smallest non-zero magnitude of a DynamoDB number.
const MIN_NUMBER: f64 = 1e-130;

/// Writes the latest state per key (device) to an Amazon DynamoDB table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DynamoDbConfig {
    /// DynamoDB table. Required.
    pub table: String,
    /// AWS region. Default: from the environment (AWS_REGION, profile).
    #[serde(default)]
    pub region: Option<String>,
    /// Endpoint URL (e.g. a local emulator such as moto or DynamoDB Local); an empty value means
    /// not set. Default: none (the AWS endpoint of the region).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Value of the item's partition key: a template where `{name}` is the record's tag `name`
    /// (or its string / integer field). A record without it, or rendering to "", goes to
    /// `dead_letter`. Default "{device_id}".
    #[serde(default = "default_key")]
    pub key: String,
    /// Name of the table's partition key attribute (type String; tables with a sort key are not
    /// supported). A tag or field of that name is not written again. Default "device_id".
    #[serde(default = "default_key_attribute")]
    pub key_attribute: String,
    /// Tags written as string attributes. Tags and fields named like `key_attribute`,
    /// `event_time_attribute` or `ttl_attribute` are never written (those attributes are the
    /// sink's); of a tag and a field with one name, the tag is written. Default: all tags.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    /// Fields written as attributes (numbers → N, strings → S, booleans → BOOL; null fields
    /// are skipped and leave the attribute as it was). Default: all fields.
    #[serde(default)]
    pub fields: Option<Vec<String>>,
    /// Attribute holding the record's event time (epoch milliseconds, a number); updates are
    /// conditional on it being older than the record's. Default "event_time".
    #[serde(default = "default_event_time_attribute")]
    pub event_time_attribute: String,
    /// Time to live of an item, e.g. "7d": the item gets `ttl_attribute` = expiry in epoch
    /// seconds, counted from `ttl_from`. Enable TTL on that attribute in the table (done by
    /// `create_table`). Default: none (no TTL attribute written).
    #[serde(default)]
    pub ttl: Option<HumanDuration>,
    /// Attribute holding the expiry (epoch seconds). Default "ttl".
    #[serde(default = "default_ttl_attribute")]
    pub ttl_attribute: String,
    /// What `ttl` counts from: "event_time" (the reading's time: the item expires `ttl` after
    /// the device was last heard from, also for replays of old data) or "now" (the write).
    /// Default "event_time".
    #[serde(default)]
    pub ttl_from: TtlFrom,
    /// Create the table (on-demand capacity, partition key `key_attribute`) and enable TTL on
    /// `ttl_attribute` at start-up when the table does not exist; for tests and development.
    /// Default false (a missing table stops the pipeline at start-up).
    #[serde(default)]
    pub create_table: bool,
    /// Batching: within a batch only the newest record per key is written. Default: 500
    /// records / 10MiB / 1s.
    #[serde(default = "default_batch")]
    pub batch: BatchConfig,
    /// `UpdateItem` requests in flight at once. Default 16.
    #[serde(default = "default_in_flight")]
    pub in_flight: usize,
    /// Deadline of one request attempt; a timed-out attempt is retried like a 5xx (`retry`),
    /// logged at WARN and counted in `timeouts`. Default "10s".
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Deadline for opening a connection. Default "5s".
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Retries of throttling, 5xx, timeouts and network errors. Default: 8 retries, 100ms
    /// doubling up to 30s.
    #[serde(default)]
    pub retry: RetryConfig,
}

/// What the TTL counts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TtlFrom {
    /// The record's event time.
    #[default]
    EventTime,
    /// The time of the write.
    Now,
}

fn default_key() -> String {
    "{device_id}".into()
}
fn default_key_attribute() -> String {
    "device_id".into()
}
fn default_event_time_attribute() -> String {
    "event_time".into()
}
fn default_ttl_attribute() -> String {
    "ttl".into()
}
fn default_batch() -> BatchConfig {
    BatchConfig {
        max_records: 500,
        max_bytes: ByteSize(10 * 1024 * 1024),
        max_age: HumanDuration(Duration::from_secs(1)),
    }
}
fn default_in_flight() -> usize {
    16
}
fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}

/// One conditional update, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// Partition key value.
    pub key: String,
    /// Event time, ns (orders updates of one key within a batch).
    pub time_ns: i64,
    /// Attributes to SET, the event time and TTL included, in order.
    pub attributes: Vec<(String, AttributeValue)>,
}

/// Converts the record into an update, or says why it cannot be written (the dead-letter
/// reason). `now_s` is the current time (epoch seconds) for `ttl_from = "now"`.
pub fn convert(
    config: &DynamoDbConfig,
    key: &Template,
    record: &Record,
    now_s: i64,
) -> Result<Update, String> {
    let key_value = key.render(record).map_err(|e| format!("dynamodb: {e}"))?;
    if key_value.len() > MAX_KEY_BYTES {
        return Err(format!(
            "dynamodb: key {:?} is {} bytes; DynamoDB allows at most {MAX_KEY_BYTES}",
            key_value.chars().take(40).collect::<String>(),
            key_value.len()
        ));
    }
    let reserved = |name: &str| {
        name == config.key_attribute
            || name == config.event_time_attribute
            || (config.ttl.is_some() && name == config.ttl_attribute)
    };
    let mut attributes: Vec<(String, AttributeValue)> = Vec::new();
    let mut size = config.key_attribute.len() + key_value.len();
    let empty_name = |kind: &str| {
        format!("dynamodb: the record has a {kind} with an empty name; DynamoDB attribute names must not be empty")
    };
    for (k, v) in &record.tags {
        if reserved(k) || !wanted(&config.tags, k) {
            continue;
        }
        if k.is_empty() {
            return Err(empty_name("tag"));
        }
        size += k.len() + v.len();
        attributes.push((k.to_string(), AttributeValue::S(v.to_string())));
    }
    for (k, v) in &record.fields {
        if reserved(k)
            || !wanted(&config.fields, k)
            || (record.tag(k).is_some() && wanted(&config.tags, k))
        {
            // A tag and a field of one name: the tag wins (one SET per attribute).
            continue;
        }
        if k.is_empty() && !matches!(v, Value::Null) {
            return Err(empty_name("field"));
        }
        let value = match v {
            Value::Null => continue,
            Value::F64(f) => AttributeValue::N(number(k, *f)?),
            Value::I64(i) => AttributeValue::N(i.to_string()),
            Value::Bool(b) => AttributeValue::Bool(*b),
            Value::Str(s) => AttributeValue::S(s.to_string()),
        };
        size += k.len()
            + match &value {
                AttributeValue::N(n) | AttributeValue::S(n) => n.len(),
                _ => 1,
            };
        attributes.push((k.to_string(), value));
    }
    let event_ms = record.time.div_euclid(1_000_000);
    attributes.push((
        config.event_time_attribute.clone(),
        AttributeValue::N(event_ms.to_string()),
    ));
    size += config.event_time_attribute.len() + 21;
    if let Some(ttl) = config.ttl {
        let base = match config.ttl_from {
            TtlFrom::EventTime => record.time.div_euclid(1_000_000_000),
            TtlFrom::Now => now_s,
        };
        let secs = i64::try_from(ttl.0.as_secs()).unwrap_or(i64::MAX);
        attributes.push((
            config.ttl_attribute.clone(),
            AttributeValue::N(base.saturating_add(secs).to_string()),
        ));
        size += config.ttl_attribute.len() + 21;
    }
    if size > MAX_ITEM_BYTES {
        return Err(format!(
            "dynamodb: item for key {key_value:?} is about {size} bytes; DynamoDB allows at most {MAX_ITEM_BYTES}"
        ));
    }
    Ok(Update {
        key: key_value,
        time_ns: record.time,
        attributes,
    })
}

fn wanted(list: &Option<Vec<String>>, name: &str) -> bool {
    list.as_ref()
        .is_none_or(|l| l.iter().any(|w| w.as_str() == name))
}

/// A float as a DynamoDB number (shortest round-trip text), or why it is not one.
fn number(name: &str, v: f64) -> Result<String, String> {
    if !v.is_finite() {
        return Err(format!(
            "dynamodb: field `{name}` is {v}; DynamoDB numbers must be finite"
        ));
    }
    if v != 0.0 && !(MIN_NUMBER..NUMBER_LIMIT).contains(&v.abs()) {
        return Err(format!(
            "dynamodb: field `{name}` = {v:e} is outside DynamoDB's number range (1e-130 to 9.99e125)"
        ));
    }
    Ok(ryu::Buffer::new().format_finite(v).to_string())
}

/// Groups a batch's updates by key, newest first (the first of each group is written; ties
/// keep the later arrival first).
pub fn coalesce(items: Vec<(Update, Record)>) -> Vec<Vec<(Update, Record)>> {
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut groups: Vec<Vec<(Update, Record)>> = Vec::new();
    for item in items {
        match index.get(&item.0.key) {
            Some(&g) => groups[g].push(item),
            None => {
                index.insert(item.0.key.clone(), groups.len());
                groups.push(vec![item]);
            }
        }
    }
    for g in &mut groups {
        // Stable sort on the reversed list: equal times keep the later arrival first.
        g.reverse();
        g.sort_by_key(|u| std::cmp::Reverse(u.0.time_ns));
    }
    groups
}

#[async_trait]
impl SinkConfig for DynamoDbConfig {
    async fn build(&self, cx: &BuildContext) -> Result<Box<dyn Sink>, BoxError> {
        let name = &cx.name;
        if self.in_flight == 0 {
            return Err(format!("sink `{name}`: `in_flight` must be at least 1").into());
        }
        if self.table.is_empty() {
            return Err(format!("sink `{name}`: `table` must not be empty").into());
        }
        let key =
            Template::new("key", &self.key, &[]).map_err(|e| format!("sink `{name}`: {e}"))?;
        for (option, value) in [
            ("key_attribute", &self.key_attribute),
            ("event_time_attribute", &self.event_time_attribute),
            ("ttl_attribute", &self.ttl_attribute),
        ] {
            if value.is_empty() {
                return Err(format!("sink `{name}`: `{option}` must not be empty").into());
            }
        }
        if self.event_time_attribute == self.key_attribute
            || (self.ttl.is_some()
                && (self.ttl_attribute == self.key_attribute
                    || self.ttl_attribute == self.event_time_attribute))
        {
            return Err(format!(
                "sink `{name}`: `key_attribute`, `event_time_attribute` and `ttl_attribute` must differ"
            )
            .into());
        }
        if self.ttl.is_some_and(|t| t.0.is_zero()) {
            return Err(format!("sink `{name}`: `ttl` must be above zero").into());
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
        // Retries are ours (backoff with jitter, per-record dead letters).
        let mut conf = aws_sdk_dynamodb::config::Builder::from(&sdk)
            .retry_config(SdkRetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(self.connect_timeout.0)
                    .operation_attempt_timeout(self.timeout.0)
                    .build(),
            );
        let endpoint_url = self.endpoint_url.as_deref().filter(|u| !u.is_empty());
        if let Some(url) = endpoint_url {
            conf = conf.endpoint_url(url);
        }
        let endpoint = match endpoint_url {
            Some(url) => url.to_string(),
            None => format!(
                "DynamoDB in {}",
                sdk.region().map(|r| r.as_ref()).unwrap_or("?")
            ),
        };
        let writer = Writer {
            client: Client::from_conf(conf.build()),
            config: self.clone(),
            key,
            name: name.clone(),
            endpoint,
        };
        writer.prepare().await?;
        Ok(Box::new(DynamoDbSink { writer }))
    }
}

struct DynamoDbSink {
    writer: Writer,
}

struct Writer {
    client: Client,
    config: DynamoDbConfig,
    key: Template,
    name: String,
    /// Where requests go, for messages.
    endpoint: String,
}

/// What one `UpdateItem` attempt came to.
enum Outcome {
    /// Written.
    Written,
    /// The item holds a newer (or the same) event time.
    Superseded,
    /// Retry later (throttling, 5xx, network; `timed_out`: the attempt ran out of time).
    Transient { error: String, timed_out: bool },
    /// This record cannot be written (validation): dead-letter it.
    Invalid(String),
    /// Stop the sink (missing table, refused credentials).
    Fatal(String),
}

/// Metrics of the running sink beyond the standard ones.
struct Counters {
    superseded: Arc<AtomicI64>,
    coalesced: Arc<AtomicI64>,
    timeouts: Arc<AtomicI64>,
    retries: Arc<AtomicI64>,
}

#[async_trait]
impl Sink for DynamoDbSink {
    async fn run(self: Box<Self>, mut input: SinkInput, cx: SinkContext) -> Result<(), BoxError> {
        let writer = Arc::new(self.writer);
        let cx = Arc::new(cx);
        let counters = Arc::new(Counters {
            superseded: cx.metrics.counter("superseded"),
            coalesced: cx.metrics.counter("coalesced"),
            timeouts: cx.metrics.counter("timeouts"),
            retries: cx.metrics.counter("retries"),
        });
        let batch_config = writer.config.batch;
        let in_flight = writer.config.in_flight;
        let mut tasks: JoinSet<Result<(), BoxError>> = JoinSet::new();
        while let Some(batch) = input.next_batch(&batch_config).await {
            let now_s = chrono::Utc::now().timestamp();
            let mut ok = Vec::with_capacity(batch.len());
            let mut rejected: Vec<(String, Vec<Record>)> = Vec::new();
            for record in batch.records {
                match convert(&writer.config, &writer.key, &record, now_s) {
                    Ok(u) => ok.push((u, record)),
                    Err(reason) => match rejected.iter_mut().find(|(r, _)| *r == reason) {
                        Some((_, v)) => v.push(record),
                        None => rejected.push((reason, vec![record])),
                    },
                }
            }
            for (reason, records) in rejected {
                cx.reject(records, &reason).await;
            }
            for group in coalesce(ok) {
                while tasks.len() >= in_flight {
                    if let Some(done) = tasks.join_next().await {
                        done.map_err(|e| format!("dynamodb write task failed: {e}"))??;
                    }
                }
                let writer = writer.clone();
                let cx = cx.clone();
                let counters = counters.clone();
                tasks.spawn(async move { writer.deliver(group, &cx, &counters).await });
            }
        }
        while let Some(done) = tasks.join_next().await {
            done.map_err(|e| format!("dynamodb write task failed: {e}"))??;
        }
        Ok(())
    }
}

impl Writer {
    /// Start-up: create the table when asked, then check it is there.
    async fn prepare(&self) -> Result<(), BoxError> {
        let (table, name) = (&self.config.table, &self.name);
        if self.config.create_table {
            self.create_table().await?;
        }
        match self.client.describe_table().table_name(table).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let hint = if e.code() == Some("ResourceNotFoundException") {
                    " (create it, or set `create_table = true`)"
                } else {
                    ""
                };
                Err(format!(
                    "sink `{name}`: DynamoDB table `{table}` at {} is not usable: {}{hint}",
                    self.endpoint,
                    describe(&e)
                )
                .into())
            }
        }
    }

    async fn create_table(&self) -> Result<(), BoxError> {
        let (table, name) = (&self.config.table, &self.name);
        let attr = &self.config.key_attribute;
        let created = self
            .client
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(attr)
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .map_err(|e| format!("sink `{name}`: {e}"))?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(attr)
                    .key_type(KeyType::Hash)
                    .build()
                    .map_err(|e| format!("sink `{name}`: {e}"))?,
            )
            .send()
            .await;
        match created {
            Ok(_) => {}
            Err(e) if e.code() == Some("ResourceInUseException") => return Ok(()),
            Err(e) => {
                return Err(format!(
                    "sink `{name}`: cannot create DynamoDB table `{table}` at {}: {}",
                    self.endpoint,
                    describe(&e)
                )
                .into())
            }
        }
        // A new table is CREATING for a few seconds on AWS; writes need it ACTIVE.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let status = self
                .client
                .describe_table()
                .table_name(table)
                .send()
                .await
                .ok()
                .and_then(|d| d.table().and_then(|t| t.table_status().cloned()));
            if status == Some(TableStatus::Active) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "sink `{name}`: DynamoDB table `{table}` did not become ACTIVE within 120 s (status {status:?})"
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if self.config.ttl.is_some() {
            self.client
                .update_time_to_live()
                .table_name(table)
                .time_to_live_specification(
                    TimeToLiveSpecification::builder()
                        .enabled(true)
                        .attribute_name(&self.config.ttl_attribute)
                        .build()
                        .map_err(|e| format!("sink `{name}`: {e}"))?,
                )
                .send()
                .await
                .map_err(|e| {
                    format!(
                        "sink `{name}`: cannot enable TTL on `{table}`.{}: {}",
                        self.config.ttl_attribute,
                        describe(&e)
                    )
                })?;
        }
        tracing::info!(sink = %name, table = %table, "created DynamoDB table");
        Ok(())
    }

    /// Writes the newest update of a key's group; the older records share its fate. When
    /// DynamoDB refuses the newest as invalid, it is dead-lettered and the next newest is tried.
    async fn deliver(
        &self,
        group: Vec<(Update, Record)>,
        cx: &SinkContext,
        counters: &Counters,
    ) -> Result<(), BoxError> {
        let mut rest = group.into_iter();
        while let Some((update, mut record)) = rest.next() {
            let mut backoff = Backoff::new(self.config.retry);
            loop {
                let started = Instant::now();
                let outcome = self.update(&update).await;
                cx.metrics.observe_latency(started.elapsed());
                let status = match outcome {
                    Outcome::Written => Some(BatchStatus::Delivered),
                    Outcome::Superseded => {
                        counters.superseded.fetch_add(1, Ordering::Relaxed);
                        Some(BatchStatus::Delivered)
                    }
                    Outcome::Transient {
                        error: e,
                        timed_out,
                    } => {
                        if timed_out {
                            counters.timeouts.fetch_add(1, Ordering::Relaxed);
                        }
                        match backoff.next_delay(None) {
                            Some(delay) => {
                                counters.retries.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(sink = %self.name, endpoint = %self.endpoint, key = %update.key, error = %e, retry = backoff.retries(), delay_ms = delay.as_millis() as u64, "UpdateItem failed; retrying");
                                tokio::time::sleep(delay).await;
                                None
                            }
                            None => {
                                tracing::error!(sink = %self.name, endpoint = %self.endpoint, key = %update.key, error = %e, "giving up after {} retries; records will be redelivered", backoff.retries());
                                Some(BatchStatus::Errored)
                            }
                        }
                    }
                    Outcome::Invalid(reason) => {
                        cx.reject(vec![record], &reason).await;
                        // Try the next newest record of this key.
                        break;
                    }
                    Outcome::Fatal(e) => {
                        let n = 1 + rest.len();
                        cx.metrics.add_errors(n);
                        record.finalize(BatchStatus::Errored);
                        for (_, mut r) in rest {
                            r.finalize(BatchStatus::Errored);
                        }
                        return Err(e.into());
                    }
                };
                let Some(status) = status else { continue };
                let older: Vec<Record> = rest.map(|(_, r)| r).collect();
                let n = 1 + older.len();
                if status == BatchStatus::Delivered {
                    counters
                        .coalesced
                        .fetch_add(older.len() as i64, Ordering::Relaxed);
                    cx.metrics.add_out(n);
                } else {
                    cx.metrics.add_errors(n);
                }
                record.finalize(status);
                for mut r in older {
                    r.finalize(status);
                }
                return Ok(());
            }
        }
        Ok(())
    }

    /// One conditional `UpdateItem` attempt.
    async fn update(&self, update: &Update) -> Outcome {
        let mut set = String::with_capacity(update.attributes.len() * 12);
        let mut req = self
            .client
            .update_item()
            .table_name(&self.config.table)
            .key(
                &self.config.key_attribute,
                AttributeValue::S(update.key.clone()),
            )
            .condition_expression("attribute_not_exists(#t) OR #t < :t")
            .expression_attribute_names("#t", &self.config.event_time_attribute);
        for (i, (name, value)) in update.attributes.iter().enumerate() {
            if name == &self.config.event_time_attribute {
                set.push_str(if set.is_empty() { "SET " } else { ", " });
                set.push_str("#t = :t");
                req = req.expression_attribute_values(":t", value.clone());
                continue;
            }
            set.push_str(if set.is_empty() { "SET " } else { ", " });
            set.push_str(&format!("#a{i} = :a{i}"));
            req = req
                .expression_attribute_names(format!("#a{i}"), name)
                .expression_attribute_values(format!(":a{i}"), value.clone());
        }
        let err = match req.update_expression(set).send().await {
            Ok(_) => return Outcome::Written,
            Err(e) => e,
        };
        let text = describe(&err);
        let status = err.raw_response().map(|r| r.status().as_u16());
        match &err {
            SdkError::ServiceError(service) => match service.err() {
                UpdateItemError::ConditionalCheckFailedException(_) => Outcome::Superseded,
                UpdateItemError::ProvisionedThroughputExceededException(_)
                | UpdateItemError::RequestLimitExceeded(_)
                | UpdateItemError::ThrottlingException(_)
                | UpdateItemError::InternalServerError(_)
                | UpdateItemError::InvalidEndpointException(_)
                | UpdateItemError::TransactionConflictException(_)
                | UpdateItemError::ReplicatedWriteConflictException(_) => Outcome::transient(text),
                UpdateItemError::ResourceNotFoundException(_) => Outcome::Fatal(format!(
                    "sink `{}`: DynamoDB table `{}` at {} is gone: {text}",
                    self.name, self.config.table, self.endpoint
                )),
                UpdateItemError::ItemCollectionSizeLimitExceededException(_) => {
                    Outcome::Invalid(format!("dynamodb: {text}"))
                }
                _ => classify_unknown(status, err.code(), text, &self.name),
            },
            SdkError::TimeoutError(_) => Outcome::timed_out(text),
            SdkError::DispatchFailure(d) if d.is_timeout() => Outcome::timed_out(text),
            _ => match status {
                Some(s) if (400..500).contains(&s) && s != 408 && s != 429 => {
                    classify_unknown(status, err.code(), text, &self.name)
                }
                _ => Outcome::transient(text),
            },
        }
    }
}

impl Outcome {
    fn transient(error: String) -> Self {
        Outcome::Transient {
            error,
            timed_out: false,
        }
    }

    fn timed_out(error: String) -> Self {
        Outcome::Transient {
            error: format!("timed out: {error}"),
            timed_out: true,
        }
    }
}

fn classify_unknown(status: Option<u16>, code: Option<&str>, text: String, name: &str) -> Outcome {
    let auth = matches!(status, Some(401 | 403))
        || code.is_some_and(|c| {
            c.contains("AccessDenied")
                || c.contains("UnrecognizedClient")
                || c.contains("Signature")
                || c.contains("Token")
                || c.contains("MissingAuthentication")
        });
    if auth {
        return Outcome::Fatal(format!(
            "sink `{name}`: DynamoDB refused the credentials: {text}"
        ));
    }
    if code.is_some_and(|c| c.contains("Throttl") || c.contains("LimitExceeded")) {
        return Outcome::transient(text);
    }
    match status {
        Some(408 | 429) | Some(500..=599) | None => Outcome::transient(text),
        _ => Outcome::Invalid(format!("dynamodb: refused: {text}")),
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

    fn config(extra: &str) -> DynamoDbConfig {
        toml::from_str::<DynamoDbConfig>(&format!("table = \"t\"\n{extra}")).expect("parses")
    }

    fn key(c: &DynamoDbConfig) -> Template {
        Template::new("key", &c.key, &[]).expect("template")
    }

    fn record(device: &str, time_ns: i64) -> Record {
        let mut r = Record::new(time_ns);
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
    fn typed_attributes_event_time_and_ttl_from_event_time() {
        let c = config("ttl = \"7d\"");
        let u = convert(&c, &key(&c), &record("d1", 1_700_000_000_123_456_789), 5).expect("ok");
        assert_eq!(u.key, "d1");
        assert_eq!(
            u.attributes,
            vec![
                ("site".to_string(), AttributeValue::S("north".into())),
                ("temp".to_string(), AttributeValue::N("21.5".into())),
                ("seq".to_string(), AttributeValue::N("7".into())),
                ("ok".to_string(), AttributeValue::Bool(true)),
                ("status".to_string(), AttributeValue::S("online".into())),
                (
                    "event_time".to_string(),
                    AttributeValue::N("1700000000123".into())
                ),
                (
                    "ttl".to_string(),
                    AttributeValue::N((1_700_000_000 + 7 * 86_400).to_string())
                ),
            ],
            "device_id is the key attribute, not SET again; null fields are skipped"
        );
        let c = config("ttl = \"1h\"\nttl_from = \"now\"\nttl_attribute = \"expires\"\nfields = [\"temp\"]\ntags = []");
        let u = convert(&c, &key(&c), &record("d1", 0), 1_000).expect("ok");
        assert_eq!(
            u.attributes,
            vec![
                ("temp".to_string(), AttributeValue::N("21.5".into())),
                ("event_time".to_string(), AttributeValue::N("0".into())),
                ("expires".to_string(), AttributeValue::N("4600".into())),
            ]
        );
    }

    #[test]
    fn unwritable_records_say_why() {
        let c = config("key = \"{tenant}/{device_id}\"");
        let err = convert(&c, &key(&c), &record("d1", 0), 0).expect_err("no tenant");
        assert!(err.contains("`tenant`"), "{err}");
        let mut r = record("", 0);
        r.set_tag("tenant", "acme");
        let err = convert(&c, &key(&c), &r, 0).expect_err("empty device");
        assert!(err.contains("empty"), "{err}");
        let c = config("");
        let mut r = record("d", 0);
        r.set_field("", Value::I64(1));
        let err = convert(&c, &key(&c), &r, 0).expect_err("empty field name");
        assert!(err.contains("field with an empty name"), "{err}");
        for (v, want) in [
            (f64::NAN, "finite"),
            (f64::INFINITY, "finite"),
            (1e200, "range"),
            (-1e-200, "range"),
        ] {
            let mut r = record("d", 0);
            r.set_field("temp", Value::F64(v));
            let err = convert(&c, &key(&c), &r, 0).expect_err("bad number");
            assert!(err.contains("`temp`") && err.contains(want), "{err}");
        }
        let r = record(&"k".repeat(MAX_KEY_BYTES + 1), 0);
        assert!(convert(&c, &key(&c), &r, 0)
            .expect_err("long key")
            .contains("at most 2048"));
        let mut r = record("d", 0);
        r.set_field("blob", Value::from("x".repeat(MAX_ITEM_BYTES).as_str()));
        assert!(convert(&c, &key(&c), &r, 0)
            .expect_err("big item")
            .contains("at most 409600"));
    }

    #[test]
    fn the_sinks_own_attributes_are_not_overwritten_and_tags_win_over_fields() {
        let c = config("ttl = \"1d\"\ntags = [\"site\"]");
        let mut r = Record::new(2_000_000_000);
        r.set_tag("device_id", "d");
        r.set_tag("site", "north");
        r.set_tag("zone", "z1");
        r.set_field("site", Value::from("field-site"));
        r.set_field("zone", Value::I64(3));
        r.set_field("event_time", Value::I64(1));
        r.set_field("ttl", Value::I64(1));
        r.set_field("device_id", Value::from("other"));
        let u = convert(&c, &key(&c), &r, 0).expect("ok");
        assert_eq!(
            u.attributes,
            vec![
                ("site".to_string(), AttributeValue::S("north".into())),
                ("zone".to_string(), AttributeValue::N("3".into())),
                ("event_time".to_string(), AttributeValue::N("2000".into())),
                ("ttl".to_string(), AttributeValue::N("86402".into())),
            ],
            "tag `zone` is not selected, so field `zone` is written"
        );
    }

    #[test]
    fn coalesce_keeps_newest_first_per_key() {
        let c = config("");
        let k = key(&c);
        let items: Vec<(Update, Record)> = [("a", 3), ("b", 1), ("a", 9), ("a", 5), ("b", 1)]
            .iter()
            .enumerate()
            .map(|(i, (d, t))| {
                let mut r = record(d, *t);
                r.set_field("arrival", Value::I64(i as i64));
                (convert(&c, &k, &r, 0).expect("ok"), r)
            })
            .collect();
        let groups = coalesce(items);
        let summary: Vec<Vec<(String, i64, i64)>> = groups
            .iter()
            .map(|g| {
                g.iter()
                    .map(|(u, r)| {
                        let arrival = match r.field("arrival") {
                            Some(Value::I64(i)) => *i,
                            _ => -1,
                        };
                        (u.key.clone(), u.time_ns, arrival)
                    })
                    .collect()
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                vec![("a".into(), 9, 2), ("a".into(), 5, 3), ("a".into(), 3, 0)],
                vec![("b".into(), 1, 4), ("b".into(), 1, 1)],
            ],
            "newest first; equal times: the later arrival first"
        );
    }
}
