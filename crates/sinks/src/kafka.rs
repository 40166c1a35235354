//! `kafka` sink: publishes records to Kafka (or a Kafka-compatible broker such as Redpanda or
//! tansu) with an idempotent producer.
//!
//! ```toml
//! [sinks.bus]
//! type = "kafka"
//! inputs = ["mqtt_in"]
//! bootstrap_servers = "127.0.0.1:9092"
//! topic = "iot-messages"
//! key = "{tenant_id}/{device_id}"   # one device → one partition → its order is kept
//! header_tags = ["tenant_id", "project_id"]
//! compression = "snappy"
//! format = "envelope"
//! ```
//!
//! A record is acknowledged upstream only when the producer's delivery report says the broker
//! stored it (with `acks = "all"`: every in-sync replica). Errors that no retry of *that
//! record* can fix — message too large or invalid, an invalid topic name, a topic or key
//! template the record cannot fill — send the record to the sink's `dead_letter` output.
//! Anything else (broker down, timeouts, leader changes) is retried by librdkafka until
//! `message_timeout`; a record still undelivered then is reported `Errored`, logged at WARN
//! with the brokers and counted in `timeouts`, and the source redelivers it. A missing topic or
//! a refused authorization is a fault of the setup, not of the record: librdkafka waits for
//! the topic the same way, then the records are `Errored` and the sink stops with an error
//! naming the topic.
//!
//! **Order.** Records are handed to the producer in the order the sink receives them, from one
//! task; only the waiting for delivery reports runs for `in_flight_batches` batches at once.
//! With idempotence (`enable.idempotence`, on by default, which caps librdkafka at 5 requests
//! in flight per broker), librdkafka's retries neither duplicate nor reorder a partition, so a
//! key's records are written in order. The sink never re-sends a record itself: a re-send
//! would land behind newer records of its key. A record that fails after `message_timeout` is
//! `Errored`: its redelivery by the source comes after the newer records (at-least-once);
//! raise `message_timeout` to ride out longer broker outages.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::join_all;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::ack::BatchStatus;
use sluice_core::config::{ByteSize, HumanDuration, PassthroughOptions};
use sluice_core::metrics::ComponentMetrics;
use sluice_core::record::{Batch, Record};
use sluice_core::registry::{BuildContext, SinkConfig};
use sluice_core::sink::{BatchConfig, Sink, SinkContext, SinkInput};
use sluice_core::BoxError;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

pub use crate::encoding::Format;
use crate::encoding::{payload, Template};

/// Compression of produced batches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    #[default]
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Compression {
    fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// Broker acknowledgement the producer waits for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Acks {
    /// Every in-sync replica stored the message (required for idempotence).
    #[default]
    #[serde(rename = "all")]
    All,
    /// The partition leader stored it.
    #[serde(rename = "1")]
    Leader,
    /// No acknowledgement (fire and forget: a broker failure loses data).
    #[serde(rename = "0")]
    None,
}

impl Acks {
    fn as_str(self) -> &'static str {
        match self {
            Acks::All => "all",
            Acks::Leader => "1",
            Acks::None => "0",
        }
    }
}

/// Publishes records to Kafka.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// Comma-separated `host:port` list of brokers to bootstrap from, e.g. "127.0.0.1:9092".
    /// Required.
    pub bootstrap_servers: String,
    /// Topic template: `{name}` becomes the record's tag (or field) `name`, e.g.
    /// "telemetry-{tenant_id}". Required.
    pub topic: String,
    /// Message key template, e.g. "{device_id}": records with the same key go to the same
    /// partition, so one device's order is kept. Default: no key (round-robin partitions).
    #[serde(default)]
    pub key: Option<String>,
    /// Tags written as message headers (name = tag name, value = tag value), e.g.
    /// ["tenant_id", "project_id"]. Records without such a tag get no header for it.
    /// Default [].
    #[serde(default)]
    pub header_tags: Vec<String>,
    /// Payload: "json" (flat object, default), "record" (sluice record JSON), "raw" (the
    /// payload as received) or "envelope" (tags, mqtt_topic, payload, timestamp).
    #[serde(default)]
    pub format: Format,
    /// Acknowledgement to wait for: "all" (default; every in-sync replica), "1" or "0".
    #[serde(default)]
    pub acks: Acks,
    /// Idempotent producer: librdkafka's retries never duplicate or reorder a partition.
    /// Needs `acks = "all"`. Default true.
    #[serde(default = "default_true")]
    pub idempotence: bool,
    /// Batch compression: "none" (default), "gzip", "snappy", "lz4" or "zstd".
    #[serde(default)]
    pub compression: Compression,
    /// How long the producer waits to fill a batch before sending it (`linger.ms`).
    /// Default "5ms".
    #[serde(default = "default_linger")]
    pub linger: HumanDuration,
    /// Most bytes per produced batch per partition (`batch.size`). Default "1MiB".
    #[serde(default = "default_batch_size")]
    pub batch_size: ByteSize,
    /// How long librdkafka keeps retrying one message before reporting it failed
    /// (`message.timeout.ms`); the record is then `Errored` (redelivered by the source), the
    /// timeout logged at WARN and counted in `timeouts`. Default "60s".
    #[serde(default = "default_message_timeout")]
    pub message_timeout: HumanDuration,
    /// Sink batches whose delivery reports are awaited at the same time (they are produced one
    /// after the other, in input order). Default 4.
    #[serde(default = "default_in_flight")]
    pub in_flight_batches: usize,
    /// Any other librdkafka producer property (security.protocol, sasl.*, ssl.*, …), passed
    /// as is; see librdkafka's CONFIGURATION.md. `Debug` prints `***` for values whose key
    /// names a secret (sasl.password, …). Default {}.
    #[serde(default)]
    pub librdkafka_options: PassthroughOptions,
    /// Batching of the input. Default: 1000 records / 10MiB / "10ms".
    #[serde(default = "default_batch")]
    pub batch: BatchConfig,
}

fn default_true() -> bool {
    true
}
fn default_linger() -> HumanDuration {
    HumanDuration(Duration::from_millis(5))
}
fn default_batch_size() -> ByteSize {
    ByteSize(1024 * 1024)
}
fn default_message_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_in_flight() -> usize {
    4
}
fn default_batch() -> BatchConfig {
    BatchConfig {
        max_age: HumanDuration(Duration::from_millis(10)),
        ..BatchConfig::default()
    }
}

/// Characters Kafka does not allow in topic names are refused by the broker; the template
/// only guards against the empty name and separators that cannot be meant.
const TOPIC_FORBIDDEN: &[char] = &['/', ' ', '\0'];

impl KafkaSinkConfig {
    /// A sink publishing to `topic` on `bootstrap_servers`, other options at their defaults.
    pub fn new(bootstrap_servers: &str, topic: &str) -> Self {
        KafkaSinkConfig {
            bootstrap_servers: bootstrap_servers.to_string(),
            topic: topic.to_string(),
            key: None,
            header_tags: Vec::new(),
            format: Format::default(),
            acks: Acks::default(),
            idempotence: true,
            compression: Compression::default(),
            linger: default_linger(),
            batch_size: default_batch_size(),
            message_timeout: default_message_timeout(),
            in_flight_batches: default_in_flight(),
            librdkafka_options: PassthroughOptions::default(),
            batch: default_batch(),
        }
    }

    /// The librdkafka producer properties for this configuration.
    fn client_config(&self, client_id: &str) -> Result<ClientConfig, String> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err("`bootstrap_servers` is empty: set e.g. \"127.0.0.1:9092\"".into());
        }
        if self.idempotence && self.acks != Acks::All {
            return Err(format!(
                "`idempotence = true` needs `acks = \"all\"` (found \"{}\"); set idempotence = false to use weaker acks",
                self.acks.as_str()
            ));
        }
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers)
            .set("client.id", client_id)
            .set("acks", self.acks.as_str())
            .set("enable.idempotence", self.idempotence.to_string())
            .set("compression.type", self.compression.as_str())
            .set("linger.ms", self.linger.0.as_millis().to_string())
            .set(
                "batch.size",
                self.batch_size.0.min(i32::MAX as u64).to_string(),
            )
            .set(
                "message.timeout.ms",
                self.message_timeout.0.as_millis().max(1).to_string(),
            );
        for (k, v) in &self.librdkafka_options {
            c.set(k, v);
        }
        Ok(c)
    }
}

#[async_trait]
impl SinkConfig for KafkaSinkConfig {
    async fn build(&self, cx: &BuildContext) -> Result<Box<dyn Sink>, BoxError> {
        let topic = Template::new("topic", &self.topic, TOPIC_FORBIDDEN)?;
        let key = match &self.key {
            Some(k) => Some(Template::new("key", k, &[])?),
            None => None,
        };
        if self.in_flight_batches == 0 {
            return Err("`in_flight_batches` must be at least 1".into());
        }
        let client_id = format!("sluice-{}-{}", cx.pipeline_id, cx.name);
        let producer: FutureProducer = self
            .client_config(&client_id)?
            .create()
            .map_err(|e| format!("kafka producer: {e}"))?;
        Ok(Box::new(KafkaSink {
            shared: Arc::new(Shared {
                producer,
                topic,
                key,
                header_tags: self.header_tags.clone(),
                format: self.format,
                bootstrap: self.bootstrap_servers.clone(),
                message_timeout: self.message_timeout,
            }),
            in_flight: self.in_flight_batches,
            batch: self.batch,
        }))
    }
}

struct Shared {
    producer: FutureProducer,
    topic: Template,
    key: Option<Template>,
    header_tags: Vec<String>,
    format: Format,
    /// The brokers, for messages.
    bootstrap: String,
    message_timeout: HumanDuration,
}

struct KafkaSink {
    shared: Arc<Shared>,
    in_flight: usize,
    batch: BatchConfig,
}

/// What a failed delivery says, and so what becomes of the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// This record can never be written (too large, invalid): it is dead-lettered.
    Record,
    /// The setup is wrong (topic missing, not authorized): retried, since an operator can fix
    /// it; after the last retry the records are `Errored` and the sink stops. Dead-lettering
    /// would acknowledge every record while the topic is missing.
    Setup,
    /// Anything else (broker down, timeouts): retried, then `Errored`.
    Transient,
}

/// Classifies a failed delivery.
pub fn classify(e: &KafkaError) -> Failure {
    let code = match e {
        KafkaError::MessageProduction(code) => *code,
        _ => return Failure::Transient,
    };
    match code {
        RDKafkaErrorCode::MessageSizeTooLarge
        | RDKafkaErrorCode::InvalidMessageSize
        | RDKafkaErrorCode::MessageBatchTooLarge
        // An invalid name comes from the record when `topic` is a template.
        | RDKafkaErrorCode::InvalidTopic
        | RDKafkaErrorCode::InvalidRecord
        | RDKafkaErrorCode::InvalidMessage => Failure::Record,
        RDKafkaErrorCode::UnknownTopic
        | RDKafkaErrorCode::UnknownTopicOrPartition
        | RDKafkaErrorCode::UnknownPartition
        | RDKafkaErrorCode::TopicAuthorizationFailed
        | RDKafkaErrorCode::ClusterAuthorizationFailed => Failure::Setup,
        _ => Failure::Transient,
    }
}

/// One record ready to produce.
struct Prepared {
    topic: String,
    key: Option<String>,
    payload: Bytes,
}

/// What became of one message.
enum Outcome {
    Delivered,
    /// See [`Failure`].
    Failed(Failure, KafkaError),
}

impl Shared {
    fn prepare(&self, r: &Record) -> Result<Prepared, String> {
        let topic = self.topic.render(r)?;
        let key = match &self.key {
            Some(k) => Some(k.render(r)?),
            None => None,
        };
        let payload = payload(self.format, r)?;
        Ok(Prepared {
            topic,
            key,
            payload,
        })
    }

    fn headers(&self, r: &Record) -> Option<OwnedHeaders> {
        let mut headers: Option<OwnedHeaders> = None;
        for name in &self.header_tags {
            if let Some(v) = r.tag(name) {
                let h = headers
                    .take()
                    .unwrap_or_else(|| OwnedHeaders::new_with_capacity(2));
                headers = Some(h.insert(Header {
                    key: name,
                    value: Some(v),
                }));
            }
        }
        headers
    }

    /// Hands every record of `batch` to the producer, in order (waiting while librdkafka's
    /// queue is full), and returns what to wait for. Records that cannot be prepared are
    /// returned for the dead letter.
    async fn produce(&self, batch: Batch) -> Produced {
        let mut produced = Produced {
            waiting: Vec::with_capacity(batch.len()),
            rejected: Vec::new(),
        };
        for r in batch.records {
            let p = match self.prepare(&r) {
                Ok(p) => p,
                Err(e) => {
                    produced.rejected.push((r, e));
                    continue;
                }
            };
            let mut rec = FutureRecord::to(&p.topic).payload(&p.payload[..]);
            if let Some(k) = &p.key {
                rec = rec.key(k.as_str());
            }
            if let Some(h) = self.headers(&r) {
                rec = rec.headers(h);
            }
            loop {
                match self.producer.send_result(rec) {
                    Ok(f) => {
                        produced.waiting.push((r, p, Ok(f)));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // librdkafka's local queue is full: wait for deliveries to drain it.
                        rec = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        // Refused before queueing (e.g. larger than message.max.bytes).
                        produced.waiting.push((r, p, Err(e)));
                        break;
                    }
                }
            }
        }
        produced
    }
}

/// One batch handed to the producer.
struct Produced {
    waiting: Vec<(Record, Prepared, Result<DeliveryFuture, KafkaError>)>,
    rejected: Vec<(Record, String)>,
}

/// Waits for the delivery reports of one produced batch: dead-letters what cannot be written,
/// reports the rest delivered or `Errored` (never re-sent here: see the module docs on order).
/// `Err` (the sink must stop) when a record failed for a [`Failure::Setup`] reason.
async fn settle(
    shared: Arc<Shared>,
    produced: Produced,
    started: Instant,
    cx: Arc<SinkContext>,
) -> Result<(), String> {
    let metrics: &ComponentMetrics = &cx.metrics;
    let Produced {
        waiting,
        mut rejected,
    } = produced;
    let outcomes = join_all(waiting.into_iter().map(|(r, p, f)| async move {
        let outcome = match f {
            Ok(f) => match f.await {
                Ok(Ok(_)) => Outcome::Delivered,
                Ok(Err((e, _))) => Outcome::Failed(classify(&e), e),
                Err(_) => Outcome::Failed(Failure::Transient, KafkaError::Canceled),
            },
            Err(e) => Outcome::Failed(classify(&e), e),
        };
        (r, p, outcome)
    }))
    .await;
    let mut delivered: Vec<Record> = Vec::with_capacity(outcomes.len());
    let mut errored: Vec<Record> = Vec::new();
    let mut timed_out = 0usize;
    let mut last_error: Option<String> = None;
    let mut setup_error: Option<(String, String)> = None;
    for (r, p, outcome) in outcomes {
        match outcome {
            Outcome::Delivered => {
                metrics.add_bytes(p.payload.len());
                delivered.push(r);
            }
            Outcome::Failed(Failure::Record, e) => rejected.push((r, format!("kafka: {e}"))),
            Outcome::Failed(failure, e) => {
                if is_timeout(&e) {
                    timed_out += 1;
                }
                if failure == Failure::Setup {
                    setup_error = Some((p.topic.clone(), e.to_string()));
                }
                last_error = Some(e.to_string());
                errored.push(r);
            }
        }
    }
    if timed_out > 0 {
        metrics
            .counter("timeouts")
            .fetch_add(timed_out as i64, Ordering::Relaxed);
        tracing::warn!(sink = %cx.name, brokers = %shared.bootstrap, records = timed_out, message_timeout = %shared.message_timeout, "kafka delivery to {} timed out; records will be redelivered", shared.bootstrap);
    }
    if let Some(e) = &last_error {
        tracing::error!(sink = %cx.name, brokers = %shared.bootstrap, error = %e, records = errored.len(), "kafka delivery failed after librdkafka's retries; records will be redelivered");
    }
    if !delivered.is_empty() {
        metrics.add_out(delivered.len());
        Batch::new(delivered).finalize(BatchStatus::Delivered);
    }
    if !errored.is_empty() {
        metrics.add_errors(errored.len());
        Batch::new(errored).finalize(BatchStatus::Errored);
    }
    for (r, reason) in rejected {
        tracing::warn!(sink = %cx.name, error = %reason, "record dead-lettered");
        cx.reject(vec![r], &reason).await;
    }
    metrics.observe_latency(started.elapsed());
    match setup_error {
        Some((topic, e)) => Err(format!(
            "sink `{}`: kafka refused topic {topic:?} (after waiting up to message_timeout {}): {e}; create the topic (or enable auto-creation) and check the client's ACLs (Write, Describe) on it",
            cx.name, shared.message_timeout
        )),
        None => Ok(()),
    }
}

/// Whether a delivery failed because its time ran out (`message_timeout`, request timeouts).
fn is_timeout(e: &KafkaError) -> bool {
    matches!(
        e,
        KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageTimedOut
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::OperationTimedOut
        )
    )
}

#[async_trait]
impl Sink for KafkaSink {
    async fn run(self: Box<Self>, mut input: SinkInput, cx: SinkContext) -> Result<(), BoxError> {
        let cx = Arc::new(cx);
        let slots = Arc::new(Semaphore::new(self.in_flight));
        let mut tasks = JoinSet::new();
        while let Some(batch) = input.next_batch(&self.batch).await {
            let permit = slots
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| format!("kafka sink: {e}"))?;
            // Produced here, batch after batch, so the producer sees the input order.
            let started = Instant::now();
            let produced = self.shared.produce(batch).await;
            let shared = self.shared.clone();
            let cx = cx.clone();
            tasks.spawn(async move {
                let settled = settle(shared, produced, started, cx).await;
                drop(permit);
                settled
            });
            while let Some(done) = tasks.try_join_next() {
                done.map_err(|e| format!("kafka sink write task failed: {e}"))??;
            }
        }
        while let Some(done) = tasks.join_next().await {
            done.map_err(|e| format!("kafka sink write task failed: {e}"))??;
        }
        let producer = self.shared.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10)))
            .await
            .map_err(|e| format!("kafka sink: {e}"))?
            .map_err(|e| format!("kafka sink: flush: {e}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_does_not_print_secrets() {
        let mut c = KafkaSinkConfig::new("127.0.0.1:9092", "t");
        c.librdkafka_options
            .insert("sasl.password".into(), "pw1".into());
        c.librdkafka_options
            .insert("sasl.oauthbearer.config".into(), "pw2".into());
        let shown = format!("{c:?}");
        assert!(!shown.contains("pw1") && !shown.contains("pw2"), "{shown}");
        // The InfluxDB sink's token, checked here to leave influxdb.rs to its config type.
        let influx: crate::influxdb::InfluxDbConfig = toml::from_str(
            "url = \"http://127.0.0.1:8086\"\norg = \"o\"\nbucket = \"b\"\ntoken = \"tok3n\"\n",
        )
        .expect("valid config");
        assert_eq!(influx.token.as_ref().map(|t| t.expose()), Some("tok3n"));
        let shown = format!("{influx:?}");
        assert!(!shown.contains("tok3n"), "{shown}");
    }

    #[test]
    fn options_parse_and_are_checked() {
        let c: KafkaSinkConfig = toml::from_str(
            r#"
bootstrap_servers = "127.0.0.1:9092"
topic = "iot-messages"
key = "{device_id}"
compression = "zstd"
acks = "all"
linger = "20ms"
"#,
        )
        .expect("parses");
        assert_eq!(c.compression, Compression::Zstd);
        let props = c.client_config("id").expect("valid");
        assert_eq!(props.get("compression.type"), Some("zstd"));
        assert_eq!(props.get("linger.ms"), Some("20"));
        assert_eq!(props.get("enable.idempotence"), Some("true"));

        let mut weak = c.clone();
        weak.acks = Acks::Leader;
        let err = weak
            .client_config("id")
            .expect_err("idempotence needs acks=all");
        assert!(err.contains("acks"), "{err}");

        let err = toml::from_str::<KafkaSinkConfig>(
            "bootstrap_servers = \"x\"\ntopic = \"t\"\ncompresion = \"lz4\"",
        )
        .expect_err("typo");
        assert!(err.to_string().contains("compresion"), "{err}");
    }

    fn class(code: RDKafkaErrorCode) -> Failure {
        classify(&KafkaError::MessageProduction(code))
    }

    #[test]
    fn missing_topic_and_authorization_are_not_dead_lettered() {
        for code in [
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::UnknownTopic,
            RDKafkaErrorCode::TopicAuthorizationFailed,
        ] {
            assert_eq!(
                class(code),
                Failure::Setup,
                "{code:?} is fixed by an operator, not by dropping the record"
            );
        }
    }

    #[test]
    fn only_record_faults_are_dead_lettered() {
        assert_eq!(
            class(RDKafkaErrorCode::MessageSizeTooLarge),
            Failure::Record
        );
        assert_eq!(class(RDKafkaErrorCode::InvalidTopic), Failure::Record);
        assert_eq!(class(RDKafkaErrorCode::MessageTimedOut), Failure::Transient);
        assert_eq!(
            class(RDKafkaErrorCode::BrokerTransportFailure),
            Failure::Transient
        );
        assert_eq!(
            classify(&KafkaError::Canceled),
            Failure::Transient,
            "not a produce error"
        );
    }
}
