//! `sqs` source: long-polls an Amazon SQS queue (or an SQS-compatible server such as moto) with
//! `receivers` concurrent loops and decodes each message body with the shared decoders.
//!
//! ```toml
//! [sources.iot]
//! type = "sqs"
//! queue_url = "https://sqs.eu-west-1.amazonaws.com/123456789012/telemetry"
//! receivers = 4
//! decode = { codec = "json" }
//! ```
//!
//! **AWS IoT rule envelopes.** An IoT Core topic rule that forwards to SQS often wraps the
//! device's JSON with the MQTT topic: `{"topic":"dt/acme/p1/dev-7/telemetry","payload":{…}}`, or
//! (`SELECT *, topic() AS topic`) puts the device keys beside a `topic` key. `body_path` picks
//! the part to decode (dotted: `"payload"`), `topic_path` the topic string, which is matched
//! against `decode.topic_pattern` exactly as an MQTT topic would be, so `device_id` / `tenant`
//! come from the topic:
//!
//! ```toml
//! [sources.iot]
//! type = "sqs"
//! queue_url = "https://sqs.eu-west-1.amazonaws.com/123456789012/telemetry"
//! body_path = "payload"
//! topic_path = "topic"
//! attributes_as_tags = ["site"]
//! decode = { codec = "json", topic_pattern = "dt/{tenant}/{project}/{device_id}/telemetry" }
//! ```
//!
//! Message attributes (String and Number types) become tags with `attributes_as_tags`
//! (`true` for all, or a list of names); they are requested in `ReceiveMessage` only then.
//!
//! **Delete only after delivery.** Each `ReceiveMessage` answer becomes one batch, with one
//! finalizer per message: every message is judged by its own records, so one undecodable body
//! does not drag its neighbours down with it. A message is deleted (`DeleteMessageBatch`, ≤ 10
//! entries per call, failed entries retried) only once it resolves `Delivered`, or `Rejected`
//! with `on_rejected = "delete"` (the answer's messages are settled together once all of them
//! resolved). An `Errored` message gets its visibility set to 0 so the queue redelivers it at
//! once; if it fails again, to (n-1)² seconds after n receives (capped at
//! `visibility_timeout`), a backoff driven by the queue's `ApproximateReceiveCount`. With `on_rejected = "leave"` (the default) a rejected message stays on
//! the queue and the queue's redrive policy moves it to its dead-letter queue after
//! `maxReceiveCount` receives; without a redrive policy it comes back forever, so use
//! `"delete"` there. A crash before the delete means the message comes back after
//! `visibility_timeout`: delivery is at-least-once.
//!
//! **Poison messages.** A message whose `ApproximateReceiveCount` exceeds
//! `max_redeliveries + 1` (default 10, 0 = unlimited) is not decoded but sent to `dead_letter`
//! with the reason and the count, and deleted once that resolves (whatever `on_rejected`
//! says); metric `poisoned`.
//!
//! **Visibility extension.** Messages still in flight after a third of `visibility_timeout`
//! get their visibility set to another `visibility_timeout` (repeatedly), so a slow sink does
//! not make the queue hand them out a second time. The calls run beside the acknowledgement
//! loop, so a slow queue delays neither deletes nor the next extensions. Keep the timeout well
//! above the queue's answer time under load: an extension that arrives after the expiry
//! fails, and the message is received again (a duplicate).
//!
//! **Credentials** come from the standard AWS chain (environment, profile, SSO, IMDS).
//!
//! **Metrics**: `received` (messages), `in_flight` (received, not yet deleted or released),
//! `deleted`, `delete_failures`, `visibility_extensions`, `queue_depth` (the queue's
//! `ApproximateNumberOfMessages`, polled every 10 s), and the standard `in` / `bytes`.
//!
//! **Structure.** Receiver tasks receive, decode and send; one acknowledgement task waits on
//! the batches' statuses (in any order: SQS has no ordering constraint on deletes), deletes
//! them (up to 16 `DeleteMessageBatch` calls at once) or releases them and extends the
//! visibility of slow ones. On shutdown the receivers stop, the
//! outputs are dropped so downstream drains, and the acknowledgement task finishes every
//! pending batch before `run` returns.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_sqs::config::Region;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
};
use aws_sdk_sqs::Client;
use aws_smithy_http_client::tls;
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use sluice_core::ack::{self, BatchStatus, StatusReceiver};
use sluice_core::channel::Outputs;
use sluice_core::config::HumanDuration;
use sluice_core::decode::{DecodeConfig, DecodeError, Decoded, Decoder};
use sluice_core::metrics::ComponentMetrics;
use sluice_core::record::{intern, Meta, Name, Origin, Record};
use sluice_core::registry::{BuildContext, SourceConfig};
use sluice_core::source::{Source, SourceContext};
use sluice_core::topology::now_ns;
use sluice_core::BoxError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::redelivery;

/// SQS's cap on a message's visibility timeout, extensions included.
const MAX_VISIBILITY_SECS: u64 = 12 * 3600;
/// Most entries SQS accepts in one `DeleteMessageBatch` / `ChangeMessageVisibilityBatch`.
const MAX_BATCH_ENTRIES: usize = 10;
/// A batch in flight for `visibility_timeout / EXTEND_AFTER_DIVISOR` gets its visibility
/// extended: two thirds of the timeout are left for the call to reach the queue.
const EXTEND_AFTER_DIVISOR: u32 = 3;
/// Concurrent `ChangeMessageVisibilityBatch` calls when many batches are due at once.
const VISIBILITY_CONCURRENCY: usize = 8;
/// Concurrent `DeleteMessageBatch` calls: one call at a time would cap a source at ~10 messages
/// per round trip, whatever `receivers` is.
const DELETE_CONCURRENCY: usize = 16;
/// Attempts at deleting one message before giving up (it then comes back after its
/// visibility timeout: a duplicate, never a loss).
const DELETE_ATTEMPTS: u32 = 5;

/// What to do with a message whose records ended `Rejected` (dead-lettered downstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnRejected {
    /// Leave it on the queue: its redrive policy moves it to the queue's DLQ.
    #[default]
    Leave,
    /// Delete it: the pipeline's own dead-letter output already has it.
    Delete,
}

/// Receives from an SQS queue; deletes messages only after delivery.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SqsConfig {
    /// URL of the queue, e.g. `https://sqs.eu-west-1.amazonaws.com/123456789012/telemetry`.
    /// Required (no default).
    pub queue_url: String,
    /// AWS region. Default: from the standard chain (`AWS_REGION`, profile…), else an error.
    #[serde(default)]
    pub region: Option<String>,
    /// Endpoint of an SQS-compatible server (moto, LocalStack, ElasticMQ); an empty string
    /// means "not set". Default: the AWS endpoint of the region.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Concurrent long-poll loops. Default 1.
    #[serde(default = "default_receivers")]
    pub receivers: usize,
    /// Most messages per `ReceiveMessage` call, 1–10. Default 10.
    #[serde(default = "default_max_messages")]
    pub max_messages: i32,
    /// Long-poll wait per `ReceiveMessage` call, at most "20s". Default "20s".
    #[serde(default = "default_wait_time")]
    pub wait_time: HumanDuration,
    /// Visibility timeout asked for received messages (whole seconds, at most "12h"); messages
    /// in flight longer than a third of it get it extended. Default "30s".
    #[serde(default = "default_visibility_timeout")]
    pub visibility_timeout: HumanDuration,
    /// What to do with a message whose records ended rejected (dead-lettered downstream):
    /// "leave" it for the queue's redrive policy or "delete" it. Default "leave".
    #[serde(default)]
    pub on_rejected: OnRejected,
    /// Body decoding. Default: JSON; `max_payload` (default "1MiB") dead-letters bigger bodies.
    /// With `body_path` it applies to the selected part; `topic_pattern` applies to the topic
    /// read at `topic_path`.
    #[serde(default)]
    pub decode: DecodeConfig,
    /// Dotted path of the part of a JSON body to decode as the record, for AWS IoT rule
    /// envelopes such as `{"topic":"…","payload":{…}}`: "payload". An object (or array) there is
    /// decoded by `decode`; a string is decoded as its text. A body that is not JSON or lacks
    /// the path goes to `dead_letter`. Default: none (the whole body is decoded).
    #[serde(default)]
    pub body_path: Option<String>,
    /// Dotted path of a string in a JSON body holding the message's MQTT topic (an IoT rule's
    /// `topic() AS topic`): "topic". It is matched against `decode.topic_pattern`, whose
    /// captures (`{device_id}`, `{tenant}`…) become tags. Without `body_path` the key is removed
    /// from the decoded object. A body without it goes to `dead_letter`. Default: none.
    #[serde(default)]
    pub topic_path: Option<String>,
    /// Message attributes that become tags: `true` for every attribute, a list of names for
    /// those, `false` for none. Only String and Number attributes (Binary ones are skipped); a
    /// tag already set by the decoder (payload `tags`, topic captures) is kept. The attributes
    /// are requested in `ReceiveMessage` only when this is set. Default false.
    #[serde(default)]
    pub attributes_as_tags: AttributeTags,
    /// A message received more than `max_redeliveries + 1` times (the queue's
    /// `ApproximateReceiveCount`: every receive counts, also one after a crash or an expired
    /// visibility) is sent to `dead_letter` with the reason and the count, then deleted once
    /// that resolves, whatever `on_rejected` says. A queue redrive policy with a lower
    /// `maxReceiveCount` moves it to the queue's DLQ first. 0 = unlimited. Default 10.
    #[serde(default = "default_max_redeliveries")]
    pub max_redeliveries: u32,
}

fn default_max_redeliveries() -> u32 {
    crate::redelivery::DEFAULT_MAX_REDELIVERIES
}

/// Which message attributes become tags (`attributes_as_tags`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum AttributeTags {
    /// `true`: every String / Number attribute; `false`: none.
    All(bool),
    /// These attributes only.
    Names(Vec<String>),
}

impl Default for AttributeTags {
    fn default() -> Self {
        AttributeTags::All(false)
    }
}

impl AttributeTags {
    /// Names for `ReceiveMessage`'s `MessageAttributeNames`; empty: request none.
    fn request(&self) -> Vec<String> {
        match self {
            AttributeTags::All(true) => vec!["All".to_string()],
            AttributeTags::All(false) => Vec::new(),
            AttributeTags::Names(names) => names.clone(),
        }
    }
}

fn default_receivers() -> usize {
    1
}
fn default_max_messages() -> i32 {
    10
}
fn default_wait_time() -> HumanDuration {
    HumanDuration(Duration::from_secs(20))
}
fn default_visibility_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

impl SqsConfig {
    /// A source of `queue_url`, other options at their defaults.
    pub fn new(queue_url: &str) -> Self {
        SqsConfig {
            queue_url: queue_url.to_string(),
            region: None,
            endpoint_url: None,
            receivers: default_receivers(),
            max_messages: default_max_messages(),
            wait_time: default_wait_time(),
            visibility_timeout: default_visibility_timeout(),
            on_rejected: OnRejected::default(),
            decode: DecodeConfig::default(),
            body_path: None,
            topic_path: None,
            attributes_as_tags: AttributeTags::default(),
            max_redeliveries: default_max_redeliveries(),
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.queue_url.is_empty() {
            return Err("`queue_url` is empty: set the URL of the SQS queue".into());
        }
        if self.receivers == 0 {
            return Err("`receivers` must be at least 1".into());
        }
        if !(1..=10).contains(&self.max_messages) {
            return Err(format!(
                "`max_messages` = {}: SQS allows 1 to 10",
                self.max_messages
            ));
        }
        if self.wait_time.0 > Duration::from_secs(20) {
            return Err(format!(
                "`wait_time` = \"{}\": SQS allows at most \"20s\"",
                self.wait_time
            ));
        }
        let vt = self.visibility_timeout.0.as_secs();
        if vt == 0 || vt > 12 * 3600 {
            return Err(format!(
                "`visibility_timeout` = \"{}\": must be 1s to 12h",
                self.visibility_timeout
            ));
        }
        Envelope::new(self)?;
        if let AttributeTags::Names(names) = &self.attributes_as_tags {
            if let Some(bad) = names.iter().find(|n| n.is_empty() || n.as_str() == "All") {
                return Err(format!(
                    "`attributes_as_tags` holds {bad:?}: list attribute names, or use `true` for all"
                ));
            }
        }
        Ok(())
    }
}

/// Where the record and the topic are inside a JSON body (`body_path`, `topic_path`); shared
/// with the `kinesis` source, whose IoT rule envelopes are the same.
#[derive(Debug, Clone)]
pub(crate) struct Envelope {
    body: Option<Path>,
    topic: Option<Path>,
}

/// A dotted path into a JSON body, kept as written for error messages.
#[derive(Debug, Clone)]
struct Path {
    text: String,
    keys: Vec<String>,
}

impl Path {
    fn parse(option: &str, text: &str) -> Result<Self, String> {
        let keys: Vec<String> = text.split('.').map(str::to_string).collect();
        if keys.iter().any(String::is_empty) {
            return Err(format!(
                "`{option}` = {text:?}: expected dotted keys such as \"payload\" or \"msg.payload\""
            ));
        }
        Ok(Path {
            text: text.to_string(),
            keys,
        })
    }

    fn get<'a>(&self, v: &'a Json) -> Option<&'a Json> {
        self.keys.iter().try_fold(v, |v, k| v.as_object()?.get(k))
    }

    fn take(&self, v: &mut Json) -> Option<Json> {
        let (last, parents) = self.keys.split_last()?;
        let mut v = v;
        for k in parents {
            v = v.as_object_mut()?.get_mut(k)?;
        }
        v.as_object_mut()?.shift_remove(last)
    }
}

impl Envelope {
    /// `None` when neither option is set: the body is decoded as it is.
    fn new(c: &SqsConfig) -> Result<Option<Self>, String> {
        Self::from_paths(c.body_path.as_deref(), c.topic_path.as_deref())
    }

    /// From the `body_path` / `topic_path` options; `None` when neither is set.
    pub(crate) fn from_paths(
        body_path: Option<&str>,
        topic_path: Option<&str>,
    ) -> Result<Option<Self>, String> {
        let body = body_path.map(|p| Path::parse("body_path", p)).transpose()?;
        let topic = topic_path
            .map(|p| Path::parse("topic_path", p))
            .transpose()?;
        Ok((body.is_some() || topic.is_some()).then_some(Envelope { body, topic }))
    }

    /// Splits a body into the payload to decode and the topic.
    pub(crate) fn open(&self, body: &[u8]) -> Result<(Bytes, Option<String>), DecodeError> {
        let mut v: Json = serde_json::from_slice(body)
            .map_err(|e| DecodeError(format!("body is not a JSON envelope: {e}")))?;
        let topic = match &self.topic {
            None => None,
            Some(p) => match p.get(&v) {
                Some(Json::String(s)) => Some(s.clone()),
                Some(other) => {
                    return Err(DecodeError(format!(
                        "`topic_path` {:?} is {}, expected a string",
                        p.text,
                        json_kind(other)
                    )))
                }
                None => {
                    return Err(DecodeError(format!(
                        "`topic_path` {:?} is not in the body",
                        p.text
                    )))
                }
            },
        };
        let part = match (&self.body, &self.topic) {
            (Some(p), _) => p.take(&mut v).ok_or_else(|| {
                DecodeError(format!("`body_path` {:?} is not in the body", p.text))
            })?,
            // `SELECT *, topic() AS topic`: the topic is envelope, not a measurement.
            (None, Some(t)) => {
                t.take(&mut v);
                v
            }
            (None, None) => v,
        };
        let payload = match part {
            Json::String(s) => Bytes::from(s.into_bytes()),
            Json::Null => {
                return Err(DecodeError(format!(
                    "`body_path` {:?} is null",
                    self.body.as_ref().map_or("", |p| p.text.as_str())
                )))
            }
            other => {
                Bytes::from(serde_json::to_vec(&other).map_err(|e| DecodeError(e.to_string()))?)
            }
        };
        Ok((payload, topic))
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

/// Turns message attributes into tags (`attributes_as_tags`), caching the tag names.
struct AttributeTagger {
    wanted: AttributeTags,
    names: HashMap<String, Name>,
}

impl AttributeTagger {
    fn new(wanted: AttributeTags) -> Option<Self> {
        (wanted != AttributeTags::All(false)).then(|| AttributeTagger {
            wanted,
            names: HashMap::new(),
        })
    }

    /// The String / Number attributes wanted, as tags (sorted by name: a stable order).
    fn tags(
        &mut self,
        attributes: &HashMap<String, MessageAttributeValue>,
    ) -> Vec<(Name, Arc<str>)> {
        let mut tags = Vec::new();
        for (name, value) in attributes {
            if let AttributeTags::Names(wanted) = &self.wanted {
                if !wanted.iter().any(|w| w == name) {
                    continue;
                }
            }
            // Custom types extend the base type: "Number.float", "String.uuid".
            let dt = value.data_type.as_str();
            if !(dt.starts_with("String") || dt.starts_with("Number")) {
                continue;
            }
            let Some(v) = value.string_value.as_deref() else {
                continue;
            };
            let n = match self.names.get(name) {
                Some(n) => n.clone(),
                None => {
                    let n = intern(name);
                    if self.names.len() < 1024 {
                        self.names.insert(name.clone(), n.clone());
                    }
                    n
                }
            };
            tags.push((n, Arc::from(v)));
        }
        tags.sort_by(|a, b| a.0.cmp(&b.0));
        tags
    }
}

/// Adds `tags` to `record` where it has no tag of that name yet.
fn add_tags(record: &mut Record, tags: &[(Name, Arc<str>)]) {
    for (n, v) in tags {
        if !record.tags.iter().any(|(k, _)| k == n) {
            record.tags.push((n.clone(), v.clone()));
        }
    }
}

/// Deadline for opening a connection to SQS.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of one SQS request attempt: above the longest long poll (`wait_time` ≤ 20s), so
/// only a hung endpoint trips it; the failed call is then logged and retried like any error.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);

/// Builds an SQS client from the standard credential chain, `region` and `endpoint_url`, with
/// [`CONNECT_TIMEOUT`] and [`ATTEMPT_TIMEOUT`] (without them a frozen endpoint stalls a call
/// forever).
pub async fn client(region: Option<&str>, endpoint_url: Option<&str>) -> Result<Client, String> {
    let sdk = sdk_config(region).await?;
    let mut config = aws_sdk_sqs::config::Builder::from(&sdk);
    // An empty value (`endpoint_url = "${VAR:-}"` with VAR unset) means "not set".
    if let Some(url) = endpoint_url.filter(|u| !u.is_empty()) {
        config = config.endpoint_url(url);
    }
    Ok(Client::from_conf(config.build()))
}

/// The AWS SDK settings of the AWS sources: the standard credential chain, `region`, an HTTP
/// client with rustls + ring (the same crypto as the rest of the workspace, no aws-lc C build),
/// [`CONNECT_TIMEOUT`] and [`ATTEMPT_TIMEOUT`]. Errors when no region is known.
pub(crate) async fn sdk_config(region: Option<&str>) -> Result<aws_config::SdkConfig, String> {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .build(),
        );
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_string()));
    }
    let sdk = loader.load().await;
    if sdk.region().is_none() {
        return Err(
            "no AWS region: set `region` or AWS_REGION (or a region in the AWS profile)".into(),
        );
    }
    Ok(sdk)
}

#[async_trait]
impl SourceConfig for SqsConfig {
    fn acknowledges(&self) -> bool {
        true
    }

    /// SQS's 12 h cap on a message's visibility: the source extends the visibility of slow
    /// messages, so `visibility_timeout` itself is no limit, but SQS refuses to extend past
    /// 12 h and then hands the message out again. (A long hold at a high rate can also reach
    /// the queue's in-flight quota, 120,000 messages on a standard queue; that depends on the
    /// rate, not checked here.)
    fn ack_tolerance(&self) -> Option<(Duration, &'static str)> {
        Some((
            Duration::from_secs(MAX_VISIBILITY_SECS),
            "SQS's 12h visibility limit",
        ))
    }

    async fn build(&self, _cx: &BuildContext) -> Result<Box<dyn Source>, BoxError> {
        self.validate()?;
        // Validate the decoding options now (each receiver builds its own decoder).
        Decoder::new(self.decode.clone())?;
        let client = client(self.region.as_deref(), self.endpoint_url.as_deref()).await?;
        Ok(Box::new(SqsSource {
            client,
            config: self.clone(),
        }))
    }
}

struct SqsSource {
    client: Client,
    config: SqsConfig,
}

/// A received batch waiting for its messages' statuses.
struct Pending {
    /// Receipt handles, in the order of the batch's status receivers (one per message).
    handles: Vec<String>,
    received: Instant,
    /// When the visibility was last set (receive or extension).
    visible_from: Instant,
    /// Highest `ApproximateReceiveCount` of the batch's messages (1 on first delivery).
    receive_count: u32,
    /// Per message (as `handles`): dead-lettered by `max_redeliveries`, so deleted once its
    /// dead letter resolves, even with `on_rejected = "leave"`.
    poisoned: Vec<bool>,
}

#[derive(Clone)]
struct Metrics {
    in_flight: Arc<AtomicI64>,
    deleted: Arc<AtomicI64>,
    delete_failures: Arc<AtomicI64>,
    extensions: Arc<AtomicI64>,
}

impl Metrics {
    fn new(m: &ComponentMetrics) -> Self {
        Metrics {
            in_flight: m.gauge("in_flight"),
            deleted: m.counter("deleted"),
            delete_failures: m.counter("delete_failures"),
            extensions: m.counter("visibility_extensions"),
        }
    }
}

#[async_trait]
impl Source for SqsSource {
    fn can_acknowledge(&self) -> bool {
        true
    }

    async fn run(self: Box<Self>, cx: SourceContext) -> Result<(), BoxError> {
        let SourceContext {
            name,
            out,
            shutdown,
            metrics,
        } = cx;
        let config = Arc::new(self.config);
        let (pending_tx, pending_rx) = mpsc::channel::<(Pending, Vec<StatusReceiver>)>(1024);
        let acker = tokio::spawn(acknowledge(
            self.client.clone(),
            config.clone(),
            name.clone(),
            Metrics::new(&metrics),
            pending_rx,
        ));
        let depth = tokio::spawn(poll_depth(
            self.client.clone(),
            config.clone(),
            metrics.gauge("queue_depth"),
            shutdown.clone(),
        ));
        let source = intern(&name);
        let mut receivers = Vec::with_capacity(config.receivers);
        for _ in 0..config.receivers {
            receivers.push(tokio::spawn(receive(
                self.client.clone(),
                config.clone(),
                source.clone(),
                out.clone(),
                metrics.clone(),
                pending_tx.clone(),
                shutdown.clone(),
            )));
        }
        // Only the receivers hold outputs and the pending channel from here on: when they
        // stop, downstream drains and the acknowledgement task sees the end of the channel.
        drop(out);
        drop(pending_tx);
        let mut first_error: Option<BoxError> = None;
        for r in receivers {
            match r.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    first_error.get_or_insert(format!("sqs receiver task failed: {e}").into());
                }
            }
        }
        depth.abort();
        if let Err(e) = acker.await {
            tracing::error!(source = %name, error = %e, "sqs acknowledgement task failed");
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// How often the approximate queue depth is read.
const DEPTH_INTERVAL: Duration = Duration::from_secs(10);

/// Polls `ApproximateNumberOfMessages` (visible messages waiting) into the `queue_depth` gauge.
async fn poll_depth(
    client: Client,
    config: Arc<SqsConfig>,
    gauge: Arc<AtomicI64>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(DEPTH_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let answer = client
            .get_queue_attributes()
            .queue_url(&config.queue_url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .send()
            .await;
        let depth = answer.ok().and_then(|a| {
            a.attributes?
                .get(&QueueAttributeName::ApproximateNumberOfMessages)?
                .parse::<i64>()
                .ok()
        });
        match depth {
            Some(d) => gauge.store(d, Ordering::Relaxed),
            None => tracing::debug!(queue = %config.queue_url, "could not read the queue depth"),
        }
    }
}

/// One long-poll loop: receive, decode, send, hand the batch's status to the acknowledger.
async fn receive(
    client: Client,
    config: Arc<SqsConfig>,
    source: Name,
    out: Outputs,
    metrics: Arc<ComponentMetrics>,
    pending: mpsc::Sender<(Pending, Vec<StatusReceiver>)>,
    shutdown: CancellationToken,
) -> Result<(), BoxError> {
    let mut decoder = Decoder::new(config.decode.clone())?;
    let envelope = Envelope::new(&config)?;
    let mut tagger = AttributeTagger::new(config.attributes_as_tags.clone());
    let attribute_names = config.attributes_as_tags.request();
    let received = metrics.counter("received");
    let poisoned_total = metrics.counter("poisoned");
    let in_flight = metrics.gauge("in_flight");
    let wait = config.wait_time.0.as_secs() as i32;
    let visibility = config.visibility_timeout.0.as_secs() as i32;
    let mut backoff = Duration::from_millis(100);
    loop {
        // The queue's visibility clock starts when it answers; start ours before asking, so
        // that extensions are early rather than late.
        let asked = Instant::now();
        let call = client
            .receive_message()
            .queue_url(&config.queue_url)
            .max_number_of_messages(config.max_messages)
            .wait_time_seconds(wait)
            .visibility_timeout(visibility)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .set_message_attribute_names(
                (!attribute_names.is_empty()).then(|| attribute_names.clone()),
            )
            .send();
        let answer = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            a = call => a,
        };
        let messages = match answer {
            Ok(a) => {
                backoff = Duration::from_millis(100);
                a.messages.unwrap_or_default()
            }
            Err(e) => {
                tracing::warn!(
                    source = %source,
                    queue = %config.queue_url,
                    error = %aws_sdk_sqs::error::DisplayErrorContext(&e),
                    "sqs ReceiveMessage failed; retrying"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        tracing::trace!(source = %source, messages = messages.len(), "sqs ReceiveMessage");
        if messages.is_empty() {
            continue;
        }
        let received_ns = now_ns();
        let mut decoded = Decoded::with_capacity(messages.len());
        let mut handles = Vec::with_capacity(messages.len());
        let mut statuses = Vec::with_capacity(messages.len());
        let mut bytes = 0;
        let mut receive_count = 1;
        let mut poisoned = Vec::with_capacity(messages.len());
        for m in messages {
            let received_times = m
                .attributes
                .as_ref()
                .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or(1);
            receive_count = receive_count.max(received_times);
            let Some(handle) = m.receipt_handle else {
                continue; // cannot be deleted, so do not deliver it either
            };
            handles.push(handle);
            let failures = received_times.saturating_sub(1);
            let poison = redelivery::exhausted(failures, config.max_redeliveries);
            poisoned.push(poison);
            let body = Bytes::from(m.body.unwrap_or_default().into_bytes());
            bytes += body.len();
            let meta = Meta {
                source: Some(source.clone()),
                origin: Origin::Sqs {
                    message_id: m.message_id.unwrap_or_default().into(),
                },
                ..Meta::default()
            };
            let first = decoded.records.len();
            let first_dead = decoded.dead.len();
            if poison {
                let why = redelivery::reason(failures, config.max_redeliveries);
                tracing::warn!(source = %source, queue = %config.queue_url, "message dead-lettered: {why}");
                poisoned_total.fetch_add(1, Ordering::Relaxed);
                decoded.dead.push(Decoder::dead_letter(
                    body,
                    received_ns,
                    meta,
                    &DecodeError(why),
                ));
            } else {
                match &envelope {
                    // Too big a body is left to the decoder, which dead-letters it unparsed.
                    Some(envelope) if body.len() as u64 <= config.decode.max_payload.0 => {
                        match envelope.open(&body) {
                            Ok((payload, topic)) => decoded.push(
                                &mut decoder,
                                payload,
                                topic.as_deref(),
                                received_ns,
                                meta,
                            ),
                            Err(e) => {
                                decoded
                                    .dead
                                    .push(Decoder::dead_letter(body, received_ns, meta, &e))
                            }
                        }
                    }
                    _ => decoded.push(&mut decoder, body, None, received_ns, meta),
                }
            }
            if let (Some(tagger), Some(attributes)) = (&mut tagger, &m.message_attributes) {
                let tags = tagger.tags(attributes);
                for r in &mut decoded.records[first..] {
                    add_tags(r, &tags);
                }
            }
            // One finalizer per message: its receipt handle is deleted or left by the fate of
            // its own records only.
            let (finalizer, status) = ack::batch();
            for r in decoded.records[first..]
                .iter_mut()
                .chain(&mut decoded.dead[first_dead..])
            {
                r.finalizers.push(finalizer.clone());
            }
            finalizer.finish(BatchStatus::Delivered);
            statuses.push(status);
        }
        received.fetch_add(handles.len() as i64, Ordering::Relaxed);
        in_flight.fetch_add(handles.len() as i64, Ordering::Relaxed);
        metrics.add_bytes(bytes);
        let entry = Pending {
            handles,
            received: asked,
            visible_from: asked,
            receive_count,
            poisoned,
        };
        // Register before sending, so that visibility extension covers a send that waits on
        // backpressure; the acknowledger never blocks on downstream, so this cannot deadlock.
        if pending.send((entry, statuses)).await.is_err() {
            return Err("sqs acknowledgement task stopped".into());
        }
        if decoded.send(&out).await.is_err() {
            // Downstream is gone (shutdown): the dropped records resolve their batch as
            // Errored and the acknowledger makes the messages visible again.
            return Ok(());
        }
    }
}

/// Waits on every pending batch's status; deletes, releases or extends their messages.
async fn acknowledge(
    client: Client,
    config: Arc<SqsConfig>,
    name: String,
    metrics: Metrics,
    mut pending_rx: mpsc::Receiver<(Pending, Vec<StatusReceiver>)>,
) {
    let visibility = config.visibility_timeout.0;
    let mut next_id: u64 = 0;
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut statuses = FuturesUnordered::new();
    let mut deletes = FuturesUnordered::new();
    // Visibility changes (extensions, releases of errored batches) run beside the loop: a
    // slow queue must not hold up the statuses, deletes and the next round of extensions.
    let mut visibility_calls = FuturesUnordered::new();
    let mut open = true;
    // Check often enough that an extension goes out well before the timeout expires.
    let mut tick = tokio::time::interval((visibility / 10).max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while open || !statuses.is_empty() || !deletes.is_empty() || !visibility_calls.is_empty() {
        tokio::select! {
            p = pending_rx.recv(), if open => match p {
                Some((p, status)) => {
                    let id = next_id;
                    next_id += 1;
                    pending.insert(id, p);
                    // Settled together (one round of calls per answer, extensions per
                    // answer), each message by its own status.
                    statuses.push(async move { (id, futures::future::join_all(status).await) });
                }
                None => open = false,
            },
            // Deletes run concurrently (up to DELETE_CONCURRENCY); taking no new status while
            // that many are running holds the receivers back through the pending channel.
            Some((id, status)) = statuses.next(), if deletes.len() < DELETE_CONCURRENCY => {
                let Some(p) = pending.remove(&id) else { continue };
                let (mut remove, mut errored, mut left) = (Vec::new(), Vec::new(), 0);
                for ((handle, status), poison) in p.handles.into_iter().zip(status).zip(p.poisoned) {
                    match status {
                        BatchStatus::Delivered => remove.push(handle),
                        BatchStatus::Rejected
                            if poison || config.on_rejected == OnRejected::Delete =>
                        {
                            remove.push(handle)
                        }
                        BatchStatus::Rejected => left += 1,
                        BatchStatus::Errored => errored.push(handle),
                    }
                }
                if left > 0 {
                    tracing::debug!(source = %name, messages = left, "rejected: left for the queue's redrive policy");
                }
                let released = (left + errored.len()) as i64;
                if !errored.is_empty() {
                    let delay = retry_delay(p.receive_count, visibility);
                    visibility_calls.push(set_visibility(
                        client.clone(),
                        config.clone(),
                        name.clone(),
                        errored,
                        delay,
                    ));
                }
                metrics.in_flight.fetch_sub(released, Ordering::Relaxed);
                if !remove.is_empty() {
                    deletes.push(delete_batch(
                        client.clone(),
                        config.clone(),
                        name.clone(),
                        metrics.clone(),
                        remove,
                    ));
                }
            }
            Some(()) = deletes.next(), if !deletes.is_empty() => {}
            Some(()) = visibility_calls.next(), if !visibility_calls.is_empty() => {}
            _ = tick.tick() => {
                let now = Instant::now();
                // Every due batch in one round of concurrent calls: a backlog of slow batches
                // must not make the last ones' extensions late.
                let mut due = Vec::new();
                for p in pending.values_mut() {
                    if now.duration_since(p.visible_from) >= visibility / EXTEND_AFTER_DIVISOR {
                        due.extend(p.handles.iter().cloned());
                        metrics.extensions.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(
                            source = %name,
                            in_flight_for = ?now.duration_since(p.received),
                            "extending the visibility of a slow batch"
                        );
                        p.visible_from = now;
                    }
                }
                if !due.is_empty() {
                    let secs = visibility.as_secs() as i32;
                    visibility_calls.push(set_visibility(
                        client.clone(),
                        config.clone(),
                        name.clone(),
                        due,
                        secs,
                    ));
                }
            }
        }
    }
}

/// Visibility (seconds) given to an errored batch: 0 on its first failure (retry at once),
/// then (n-1)² seconds after n receives, capped at the visibility timeout.
fn retry_delay(receive_count: u32, visibility: Duration) -> i32 {
    let n = u64::from(receive_count.saturating_sub(1));
    n.saturating_mul(n).min(visibility.as_secs()) as i32
}

/// Deletes a resolved batch's messages, then counts them out of `in_flight`.
async fn delete_batch(
    client: Client,
    config: Arc<SqsConfig>,
    name: String,
    metrics: Metrics,
    handles: Vec<String>,
) {
    let n = handles.len() as i64;
    delete(&client, &config, &name, &metrics, handles).await;
    metrics.in_flight.fetch_sub(n, Ordering::Relaxed);
}

/// Deletes `handles` in calls of at most 10, retrying failed entries with backoff. Entries
/// failed by the sender's fault (`ReceiptHandleIsInvalid`: the message was already deleted
/// through another receipt, or its handle expired) are not retried: they cannot succeed.
async fn delete(
    client: &Client,
    config: &SqsConfig,
    name: &str,
    metrics: &Metrics,
    handles: Vec<String>,
) {
    for chunk in handles.chunks(MAX_BATCH_ENTRIES) {
        let mut left: Vec<(usize, &String)> = chunk.iter().enumerate().collect();
        let mut backoff = Duration::from_millis(100);
        for attempt in 1..=DELETE_ATTEMPTS {
            let entries = left
                .iter()
                .map(|(i, h)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(h.as_str())
                        .build()
                })
                .collect::<Result<Vec<_>, _>>();
            let entries = match entries {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(source = %name, error = %e, "sqs delete entry");
                    return;
                }
            };
            match client
                .delete_message_batch()
                .queue_url(&config.queue_url)
                .set_entries(Some(entries))
                .send()
                .await
            {
                Ok(out) => {
                    let ok = left.len().saturating_sub(out.failed.len());
                    metrics.deleted.fetch_add(ok as i64, Ordering::Relaxed);
                    let mut retry = Vec::new();
                    for f in out.failed {
                        if f.sender_fault {
                            metrics.delete_failures.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(
                                source = %name,
                                code = %f.code,
                                message = f.message.as_deref().unwrap_or(""),
                                "sqs DeleteMessageBatch entry refused; the message may be received again (a duplicate)"
                            );
                        } else {
                            retry.push(f.id);
                        }
                    }
                    left.retain(|(i, _)| retry.contains(&i.to_string()));
                }
                Err(e) => tracing::warn!(
                    source = %name,
                    attempt,
                    error = %aws_sdk_sqs::error::DisplayErrorContext(&e),
                    "sqs DeleteMessageBatch failed"
                ),
            }
            if left.is_empty() {
                break;
            }
            metrics
                .delete_failures
                .fetch_add(left.len() as i64, Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
        if !left.is_empty() {
            tracing::error!(
                source = %name,
                messages = left.len(),
                "could not delete delivered sqs messages: they will be received again (duplicates)"
            );
        }
    }
}

/// Sets the visibility timeout of `handles` (0: visible again now), in calls of at most 10.
/// Best effort: a failure only delays a retry or risks a duplicate, never a loss. Up to
/// `VISIBILITY_CONCURRENCY` of its calls run at once (several of these may run side by side
/// in the acknowledgement task).
async fn set_visibility(
    client: Client,
    config: Arc<SqsConfig>,
    name: String,
    handles: Vec<String>,
    secs: i32,
) {
    let (client, config, name) = (&client, &config, name.as_str());
    // Collected first: a lazy `map` adapter held across the await trips the compiler's
    // higher-ranked lifetime check inside the spawned task.
    let calls: Vec<_> = handles
        .chunks(MAX_BATCH_ENTRIES)
        .map(|chunk| async move {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(h.as_str())
                        .visibility_timeout(secs)
                        .build()
                })
                .collect::<Result<Vec<_>, _>>();
            let entries = match entries {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(source = %name, error = %e, "sqs visibility entry");
                    return;
                }
            };
            match client
                .change_message_visibility_batch()
                .queue_url(&config.queue_url)
                .set_entries(Some(entries))
                .send()
                .await
            {
                Ok(out) if !out.failed.is_empty() => tracing::warn!(
                    source = %name,
                    failed = out.failed.len(),
                    code = %out.failed[0].code,
                    message = out.failed[0].message.as_deref().unwrap_or(""),
                    "sqs ChangeMessageVisibilityBatch: some entries failed (a message whose \
                     visibility already expired may be received again: a duplicate)"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    source = %name,
                    error = %aws_sdk_sqs::error::DisplayErrorContext(&e),
                    "sqs ChangeMessageVisibilityBatch failed"
                ),
            }
        })
        .collect();
    futures::stream::iter(calls)
        .buffer_unordered(VISIBILITY_CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_limits() {
        let mut c = SqsConfig::new("http://localhost/q");
        assert!(c.validate().is_ok());
        c.max_messages = 11;
        assert!(c.validate().is_err());
        c.max_messages = 10;
        c.wait_time = HumanDuration(Duration::from_secs(21));
        assert!(c.validate().is_err());
        c.wait_time = default_wait_time();
        c.receivers = 0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn errored_retries_back_off() {
        let vt = Duration::from_secs(30);
        let delays: Vec<i32> = (1..=8).map(|n| retry_delay(n, vt)).collect();
        assert_eq!(delays, vec![0, 1, 4, 9, 16, 25, 30, 30]);
    }

    #[test]
    fn parses_options() {
        let c: SqsConfig = toml::from_str(
            "queue_url = \"http://q\"\nreceivers = 4\nwait_time = \"1s\"\non_rejected = \"delete\"",
        )
        .expect("valid config");
        assert_eq!(c.receivers, 4);
        assert_eq!(c.wait_time.0, Duration::from_secs(1));
        assert_eq!(c.on_rejected, OnRejected::Delete);
        assert!(toml::from_str::<SqsConfig>("queue_url = \"q\"\nbogus = 1").is_err());
        assert_eq!(c.attributes_as_tags, AttributeTags::All(false));
        assert!(c.body_path.is_none() && c.topic_path.is_none());
    }

    fn config(toml_text: &str) -> SqsConfig {
        toml::from_str(&format!("queue_url = \"http://q\"\n{toml_text}")).expect("valid config")
    }

    /// Runs one body through the envelope (if configured) and the decoder, as `receive` does.
    fn decode(c: &SqsConfig, body: &str) -> Decoded {
        let mut decoder = Decoder::new(c.decode.clone()).expect("decoder");
        let mut out = Decoded::default();
        let body = Bytes::from(body.to_string());
        match Envelope::new(c).expect("valid paths") {
            Some(e) => match e.open(&body) {
                Ok((payload, topic)) => {
                    out.push(&mut decoder, payload, topic.as_deref(), 7, Meta::default())
                }
                Err(err) => out
                    .dead
                    .push(Decoder::dead_letter(body, 7, Meta::default(), &err)),
            },
            None => out.push(&mut decoder, body, None, 7, Meta::default()),
        }
        out
    }

    fn error(d: &Decoded) -> String {
        assert!(
            d.records.is_empty(),
            "expected a dead letter: {:?}",
            d.records
        );
        d.dead[0]
            .meta
            .error
            .as_deref()
            .unwrap_or_default()
            .to_string()
    }

    const IOT: &str = r#"body_path = "payload"
topic_path = "topic"
decode = { topic_pattern = "dt/{tenant}/{project}/{device_id}/telemetry", tags = ["device_status"], keep_payload = true }"#;

    #[test]
    fn iot_envelope_payload_and_topic() {
        let c = config(IOT);
        let d = decode(
            &c,
            r#"{"topic":"dt/acme/p1/dev-7/telemetry","payload":{"ts":1764000000000,"temp":21.5,"humidity":40,"voltage":3.3,"device_status":"online"}}"#,
        );
        assert!(d.dead.is_empty(), "{:?}", d.dead);
        let r = &d.records[0];
        assert_eq!(r.time, 1_764_000_000_000_000_000);
        assert_eq!(r.tag("device_id"), Some("dev-7"));
        assert_eq!(r.tag("tenant"), Some("acme"));
        assert_eq!(r.tag("project"), Some("p1"));
        assert_eq!(r.tag("device_status"), Some("online"));
        assert_eq!(r.field("temp").and_then(|v| v.as_f64()), Some(21.5));
        assert!(r.field("topic").is_none(), "the envelope is not decoded");
        assert_eq!(r.fields.len(), 3, "temp, humidity, voltage: {:?}", r.fields);
        // keep_payload keeps the device JSON (re-serialized, key order kept), not the envelope.
        assert_eq!(
            r.payload.as_deref(),
            Some(&br#"{"ts":1764000000000,"temp":21.5,"humidity":40,"voltage":3.3,"device_status":"online"}"#[..])
        );
    }

    #[test]
    fn select_star_with_topic_drops_the_topic_key() {
        // `SELECT *, topic() AS topic`: device keys and the topic side by side.
        let c = config(
            r#"topic_path = "meta.topic"
decode = { topic_pattern = "devices/{device_id}/data" }"#,
        );
        let d = decode(
            &c,
            r#"{"temp":1.5,"meta":{"topic":"devices/d9/data","qos":1}}"#,
        );
        let r = &d.records[0];
        assert_eq!(r.tag("device_id"), Some("d9"));
        assert_eq!(r.field("temp").and_then(|v| v.as_f64()), Some(1.5));
        assert!(r.field("meta.topic").is_none());
        assert_eq!(r.field("meta.qos").and_then(|v| v.as_f64()), Some(1.0));
    }

    #[test]
    fn dotted_body_path_and_string_payloads() {
        let c = config("body_path = \"msg.data\"\ndecode = { codec = \"line_protocol\" }");
        let d = decode(
            &c,
            r#"{"msg":{"data":"weather,site=a temp=2 1700000000000"}}"#,
        );
        assert_eq!(d.records.len(), 1, "{:?}", d.dead);
        assert_eq!(d.records[0].tag("site"), Some("a"));
        let raw = config("body_path = \"p\"\ndecode = { codec = \"raw\" }");
        let d = decode(&raw, r#"{"p":{"a":[1,2]}}"#);
        assert_eq!(
            d.records[0].payload.as_deref(),
            Some(&br#"{"a":[1,2]}"#[..])
        );
    }

    #[test]
    fn bad_envelopes_are_dead_lettered_with_the_whole_body() {
        let c = config(IOT);
        let cases = [
            ("not json", "not a JSON envelope"),
            (r#"[1,2]"#, "`topic_path` \"topic\" is not in the body"),
            (
                r#"{"payload":{"temp":1}}"#,
                "`topic_path` \"topic\" is not in the body",
            ),
            (
                r#"{"topic":7,"payload":{}}"#,
                "is a number, expected a string",
            ),
            (
                r#"{"topic":"dt/a/b/c/telemetry"}"#,
                "`body_path` \"payload\" is not in the body",
            ),
            (
                r#"{"topic":"dt/a/b/c/telemetry","payload":null}"#,
                "is null",
            ),
            (
                r#"{"topic":"other/x","payload":{"temp":1}}"#,
                "does not match topic_pattern",
            ),
            (
                r#"{"topic":"dt/a/b/c/telemetry","payload":[1]}"#,
                "expected a JSON object",
            ),
        ];
        for (body, expected) in cases {
            let d = decode(&c, body);
            let e = error(&d);
            assert!(e.contains(expected), "{body}: {e}");
        }
        // The dead letter of an envelope error keeps the original body.
        let d = decode(&c, r#"{"payload":{"temp":1}}"#);
        assert_eq!(
            d.dead[0].payload.as_deref(),
            Some(&br#"{"payload":{"temp":1}}"#[..])
        );
    }

    #[test]
    fn bad_paths_and_attribute_lists_fail_validation() {
        for bad in [
            "body_path = \"\"",
            "body_path = \"a..b\"",
            "topic_path = \".t\"",
        ] {
            let e = config(bad).validate().expect_err(bad);
            assert!(e.contains("dotted keys"), "{e}");
        }
        assert!(config("attributes_as_tags = [\"\"]").validate().is_err());
        assert!(config("attributes_as_tags = [\"All\"]").validate().is_err());
        assert!(config("attributes_as_tags = [\"site\"]").validate().is_ok());
        assert!(toml::from_str::<SqsConfig>("queue_url = \"q\"\nattributes_as_tags = 3").is_err());
    }

    fn attribute(data_type: &str, value: &str) -> MessageAttributeValue {
        MessageAttributeValue::builder()
            .data_type(data_type)
            .string_value(value)
            .build()
            .expect("attribute")
    }

    #[test]
    fn attributes_become_tags() {
        let attributes = HashMap::from([
            ("site".to_string(), attribute("String", "berlin")),
            ("rssi".to_string(), attribute("Number.int", "-70")),
            (
                "blob".to_string(),
                MessageAttributeValue::builder()
                    .data_type("Binary")
                    .binary_value(aws_sdk_sqs::primitives::Blob::new(vec![1u8, 2]))
                    .build()
                    .expect("attribute"),
            ),
            (
                "device_id".to_string(),
                attribute("String", "from-attribute"),
            ),
        ]);
        let mut all = AttributeTagger::new(AttributeTags::All(true)).expect("tagger");
        let tags = all.tags(&attributes);
        let names: Vec<&str> = tags.iter().map(|(n, _)| &**n).collect();
        assert_eq!(
            names,
            vec!["device_id", "rssi", "site"],
            "binary skipped, sorted"
        );
        let mut some =
            AttributeTagger::new(AttributeTags::Names(vec!["site".into(), "absent".into()]))
                .expect("tagger");
        let tags = some.tags(&attributes);
        assert_eq!(tags.len(), 1);
        assert_eq!(&*tags[0].1, "berlin");
        assert!(AttributeTagger::new(AttributeTags::All(false)).is_none());

        // A tag set by the decoder wins over an attribute of the same name.
        let mut r = Record::new(0);
        r.tags.push((intern("device_id"), Arc::from("from-topic")));
        add_tags(&mut r, &all.tags(&attributes));
        assert_eq!(r.tag("device_id"), Some("from-topic"));
        assert_eq!(r.tag("rssi"), Some("-70"));
        assert_eq!(r.tag("site"), Some("berlin"));
    }

    #[test]
    fn attribute_requests() {
        assert!(AttributeTags::All(false).request().is_empty());
        assert_eq!(AttributeTags::All(true).request(), vec!["All"]);
        let c = config("attributes_as_tags = [\"site\", \"rssi\"]");
        assert_eq!(c.attributes_as_tags.request(), vec!["site", "rssi"]);
        assert_eq!(
            config("attributes_as_tags = true").attributes_as_tags,
            AttributeTags::All(true)
        );
    }
}
