//! `kafka` source: a consumer-group member that commits only what was delivered.
//!
//! ```toml
//! [sources.bus]
//! type = "kafka"
//! bootstrap_servers = "127.0.0.1:9092"
//! topics = ["iot-messages"]            # or "^telemetry-.*" (a regex)
//! group_id = "rollups"
//! key_tag = "device_key"
//! headers_as_tags = true
//! decode = { codec = "json", tags = ["device_id"] }
//! ```
//!
//! **Commits.** Offsets are never auto-committed. Every batch read from the broker registers,
//! per partition, the range of offsets it holds in an [`ack::Watermark`]; when the batch's
//! records have been written by every sink (or dead-lettered), the range completes, and the
//! partition's watermark — the offset below which *every* record is done — is committed every
//! `commit_interval`. A range that completes early never moves the commit past an older range
//! still in flight. A range that ends `Errored` (a sink failed after its retries) blocks the
//! partition's commit; after a backoff the consumer seeks the partition back to the watermark
//! and reads the range again (later records of that partition are read again too:
//! at-least-once).
//!
//! **Poison records.** Failed deliveries are counted per (topic, partition, offset) in a
//! bounded in-memory map (after a failure each record re-read is followed on its own, so only
//! the records that fail again are counted). A record that failed more than
//! `max_redeliveries` times (default 10, 0 = unlimited) goes to `dead_letter` with the reason
//! and the count instead, and the partition's commit moves past it once that resolves.
//!
//! **Rebalance.** When partitions are revoked the consumer waits (at most `drain_timeout`)
//! for their records in flight, commits their watermarks, and only then lets the group move
//! them; records still unfinished at the deadline are simply not committed and the next owner
//! reads them again. Newly assigned partitions start from the group's committed offset (or
//! `auto_offset_reset` when the group has none).
//!
//! **Threads.** librdkafka's consumer is polled by a dedicated OS thread (rebalance callbacks
//! run there and may block while they drain); it hands batches to the async source task
//! through a bounded channel, so a slow pipeline stops the polling (backpressure). If the
//! pipeline stays blocked longer than `max.poll.interval.ms` (librdkafka default 5 minutes)
//! the group moves the partitions elsewhere; nothing uncommitted is lost. During the shutdown
//! drain the thread keeps polling with every partition paused, so a slow drain does not get
//! the member evicted (its final commit would fail).
//!
//! **Tags.** A record's tags come from the payload (`decode.tags`), the message headers
//! (`headers_as_tags`), the key (`key_tag`) and the topic (`decode.topic_pattern`); when two
//! give the same name, the later in that list wins. Topic tags come last, so a producer
//! cannot override them with a header (a `tenant_id` header does not change the tenant a
//! topic like `{tenant_id}` assigns).
//!
//! **Metrics.** records in, bytes, decode errors (to `dead_letter`), `commits`,
//! `commit_failures`, `rebalances`, `seeks` (errored ranges re-read), `poisoned` (records
//! dead-lettered by `max_redeliveries`), `assigned_partitions`,
//! and `consumer_lag{topic, partition}` from librdkafka's statistics (every 5 s).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientConfig, ClientContext};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::ack::{self, BatchStatus, StatusReceiver, Watermark};
use sluice_core::config::{HumanDuration, PassthroughOptions};
use sluice_core::decode::{DecodeConfig, DecodeError, Decoded, Decoder};
use sluice_core::metrics::ComponentMetrics;
use sluice_core::record::{intern, Meta, Name, Origin};
use sluice_core::registry::{BuildContext, SourceConfig};
use sluice_core::source::{Source, SourceContext};
use sluice_core::BoxError;
use tokio::sync::mpsc;

use crate::redelivery::{self, Attempts};

/// A record's identity for counting its failed deliveries.
type RecordKey = (Arc<str>, i32, i64);

/// A resolved batch: its status, its ranges, its records' keys with their own statuses.
type Settled = (
    BatchStatus,
    Vec<RangeId>,
    Vec<(RecordKey, Option<BatchStatus>)>,
);

/// Where a new consumer group starts reading a partition that has no committed offset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AutoOffsetReset {
    /// The oldest message still on the broker: a new pipeline processes the backlog.
    #[default]
    Earliest,
    /// Only messages produced after the group joined.
    Latest,
}

/// Reads records from Kafka topics as a member of a consumer group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Comma-separated `host:port` list of brokers to bootstrap from, e.g. "127.0.0.1:9092".
    /// Required.
    pub bootstrap_servers: String,
    /// Topics to subscribe to; a name starting with `^` is a regular expression matched
    /// against every topic, e.g. "^telemetry-.*". Required.
    pub topics: Vec<String>,
    /// Consumer group: processes with the same group id share the partitions. Required.
    pub group_id: String,
    /// Where a group without a committed offset starts: "earliest" (default) or "latest".
    #[serde(default)]
    pub auto_offset_reset: AutoOffsetReset,
    /// How long the group waits for a silent member before moving its partitions
    /// (`session.timeout.ms`). Default "10s".
    #[serde(default = "default_session_timeout")]
    pub session_timeout: HumanDuration,
    /// How often delivered offsets are committed. Default "1s".
    #[serde(default = "default_commit_interval")]
    pub commit_interval: HumanDuration,
    /// How long a revoked partition may wait for its records in flight before it is released
    /// (unfinished ones are read again by the next owner). Default "10s".
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: HumanDuration,
    /// First wait before a partition whose records failed downstream is read again from its
    /// watermark; doubles on each further failure up to 30 s. Default "1s".
    #[serde(default = "default_retry_backoff")]
    pub retry_backoff: HumanDuration,
    /// Most messages per batch handed to the pipeline. Default 1000.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Tag that receives the message key (UTF-8 keys only); it replaces a header or payload
    /// tag of the same name, not a `decode.topic_pattern` tag. Default: the key is not kept.
    #[serde(default)]
    pub key_tag: Option<String>,
    /// Message headers with UTF-8 values become tags (header name = tag name). A header
    /// replaces a payload tag of the same name but never a tag taken from the topic
    /// (`decode.topic_pattern`) or the `key_tag`. Default false.
    #[serde(default)]
    pub headers_as_tags: bool,
    /// Payload decoding (json, record, line_protocol, raw; `topic_pattern` applies to the
    /// Kafka topic name). Default: JSON.
    #[serde(default)]
    pub decode: DecodeConfig,
    /// Any other librdkafka consumer property (security.protocol, sasl.*, ssl.*,
    /// fetch.max.bytes, …), passed as is; see librdkafka's CONFIGURATION.md. `Debug` prints
    /// `***` for values whose key names a secret (sasl.password, …). Default {}.
    #[serde(default)]
    pub librdkafka_options: PassthroughOptions,
    /// A record whose delivery failed (a sink gave up with a transient error) more than this
    /// many times is sent to `dead_letter`, with the reason and the count, and committed past,
    /// instead of making its partition re-read it forever. Failures are counted in memory per
    /// (topic, partition, offset) (at most 100,000 records; a restart or a rebalance to
    /// another member starts the count again). 0 = unlimited. Default 10.
    #[serde(default = "default_max_redeliveries")]
    pub max_redeliveries: u32,
}

fn default_max_redeliveries() -> u32 {
    redelivery::DEFAULT_MAX_REDELIVERIES
}

fn default_session_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_commit_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_drain_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_retry_backoff() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_max_batch() -> usize {
    1000
}

impl KafkaSourceConfig {
    /// A source of `topics` in group `group_id`, other options at their defaults.
    pub fn new(bootstrap_servers: &str, topics: &[&str], group_id: &str) -> Self {
        KafkaSourceConfig {
            bootstrap_servers: bootstrap_servers.to_string(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            group_id: group_id.to_string(),
            auto_offset_reset: AutoOffsetReset::default(),
            session_timeout: default_session_timeout(),
            commit_interval: default_commit_interval(),
            drain_timeout: default_drain_timeout(),
            retry_backoff: default_retry_backoff(),
            max_batch: default_max_batch(),
            key_tag: None,
            headers_as_tags: false,
            decode: DecodeConfig::default(),
            librdkafka_options: PassthroughOptions::default(),
            max_redeliveries: default_max_redeliveries(),
        }
    }

    /// The librdkafka consumer properties.
    fn client_config(&self, client_id: &str) -> Result<ClientConfig, String> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err("`bootstrap_servers` is empty: set e.g. \"127.0.0.1:9092\"".into());
        }
        if self.topics.is_empty() || self.topics.iter().any(|t| t.is_empty()) {
            return Err("`topics` must list at least one non-empty topic name".into());
        }
        if self.group_id.is_empty() {
            return Err("`group_id` is empty".into());
        }
        if self.max_batch == 0 {
            return Err("`max_batch` must be at least 1".into());
        }
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers)
            .set("group.id", &self.group_id)
            .set("client.id", client_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.offset.reset",
                match self.auto_offset_reset {
                    AutoOffsetReset::Earliest => "earliest",
                    AutoOffsetReset::Latest => "latest",
                },
            )
            .set(
                "session.timeout.ms",
                self.session_timeout.0.as_millis().max(1).to_string(),
            )
            // librdkafka's default (1 s) pauses fetching whenever its queue was drained once;
            // measured: 335k msg/s with it, ~890k/s with 10 ms.
            .set("fetch.queue.backoff.ms", "10")
            // A broker may hold a fetch for up to this long before answering (tansu does so
            // even with data waiting: 85k msg/s at librdkafka's 500 ms, 370k/s at 10 ms,
            // measured with librdkafka's Python client). 100 ms bounds that wait while an
            // idle consumer still makes only a few fetches per second.
            .set("fetch.wait.max.ms", "100")
            // librdkafka prefetches up to 64 MiB by default; 16 MiB keeps memory flat and
            // still holds well over a second of traffic at 100k msg/s of 200 B.
            .set("queued.max.messages.kbytes", "16384")
            .set("statistics.interval.ms", "5000")
            .set_log_level(RDKafkaLogLevel::Warning);
        for (k, v) in &self.librdkafka_options {
            c.set(k, v);
        }
        Ok(c)
    }
}

#[async_trait]
impl SourceConfig for KafkaSourceConfig {
    fn acknowledges(&self) -> bool {
        true
    }

    /// `max.poll.interval.ms` (librdkafka default 300000): the time the group gives a member
    /// before moving its partitions. Held records are not committed, so a rebalance (after
    /// `drain_timeout`) or a restart reads everything held again; keep holds below it.
    fn ack_tolerance(&self) -> Option<(Duration, &'static str)> {
        let ms = self
            .librdkafka_options
            .get("max.poll.interval.ms")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(300_000);
        Some((Duration::from_millis(ms), "max.poll.interval.ms"))
    }

    async fn build(&self, cx: &BuildContext) -> Result<Box<dyn Source>, BoxError> {
        let client_id = format!("sluice-{}-{}", cx.pipeline_id, cx.name);
        let props = self.client_config(&client_id)?;
        Decoder::new(self.decode.clone())?;
        Ok(Box::new(KafkaSource {
            config: self.clone(),
            props,
        }))
    }
}

struct KafkaSource {
    config: KafkaSourceConfig,
    props: ClientConfig,
}

/// One message copied out of librdkafka.
struct RawMessage {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    /// The epoch counter when the message was polled: a partition (re)assigned or sought
    /// back after that has a newer epoch, and the message is dropped (it is read again).
    generation: u64,
    timestamp_ms: Option<i64>,
    key: Option<Bytes>,
    headers: Vec<(String, String)>,
    payload: Bytes,
}

/// A batch of messages and the watermark ranges it registered.
struct RawBatch {
    messages: Vec<RawMessage>,
    ranges: Vec<RangeId>,
}

/// One registered range of one partition's watermark.
#[derive(Debug, Clone)]
struct RangeId {
    topic: Arc<str>,
    partition: i32,
    epoch: u64,
    seq: u64,
}

/// What the consumer tracks for one assigned partition.
#[derive(Debug)]
struct PartitionState {
    /// Changes whenever the partition is (re)assigned or sought back: completions of ranges
    /// registered under an older epoch are ignored.
    epoch: u64,
    /// Created at the first message read (or re-read), starting at its offset.
    watermark: Option<Watermark>,
    /// Last offset committed (next offset to read).
    committed: i64,
    /// When the watermark was found blocked by an errored range.
    blocked_since: Option<Instant>,
    backoff: Duration,
}

#[derive(Default)]
struct State {
    partitions: HashMap<(Arc<str>, i32), PartitionState>,
    next_epoch: u64,
}

impl State {
    fn fresh(&mut self, initial_backoff: Duration) -> PartitionState {
        self.next_epoch += 1;
        PartitionState {
            epoch: self.next_epoch,
            watermark: None,
            committed: -1,
            blocked_since: None,
            backoff: initial_backoff,
        }
    }
}

/// State shared by the consumer thread (and its rebalance callbacks) and the async task.
struct Shared {
    name: String,
    state: Mutex<State>,
    /// Set when the pipeline shuts down: revocations no longer wait for in-flight records.
    closing: AtomicBool,
    /// Mirror of `State::next_epoch`, read per polled message without the lock.
    generation: AtomicU64,
    /// Whether the consumer thread paused the assignment (pipeline full), and the
    /// `rebalances` count when it did.
    paused: AtomicBool,
    paused_at: AtomicI64,
    drain_timeout: Duration,
    initial_backoff: Duration,
    metrics: Arc<ComponentMetrics>,
    commits: Arc<AtomicI64>,
    commit_failures: Arc<AtomicI64>,
    rebalances: Arc<AtomicI64>,
    seeks: Arc<AtomicI64>,
    assigned: Arc<AtomicI64>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reports the final status of a batch's ranges.
    fn complete(&self, ranges: &[RangeId], status: BatchStatus) {
        let mut state = self.state();
        for r in ranges {
            let Some(p) = state.partitions.get_mut(&(r.topic.clone(), r.partition)) else {
                continue; // revoked meanwhile: the next owner reads it again
            };
            if p.epoch != r.epoch {
                continue; // sought back since: the range is being read again
            }
            if let Some(w) = p.watermark.as_mut() {
                w.complete(r.seq, status);
                if w.is_blocked() && p.blocked_since.is_none() {
                    p.blocked_since = Some(Instant::now());
                    tracing::warn!(source = %self.name, topic = %r.topic, partition = r.partition, offset = w.committable(), "records failed downstream; the partition's commits stop here until they are read again");
                }
            }
        }
    }

    /// Offsets that moved since the last commit, for `only` partitions (all when `None`).
    fn to_commit(&self, only: Option<&TopicPartitionList>) -> Vec<(Arc<str>, i32, i64)> {
        let state = self.state();
        let mut out = Vec::new();
        for ((topic, partition), p) in &state.partitions {
            if let Some(list) = only {
                if list.find_partition(topic, *partition).is_none() {
                    continue;
                }
            }
            if let Some(w) = &p.watermark {
                if w.committable() > p.committed {
                    out.push((topic.clone(), *partition, w.committable()));
                }
            }
        }
        out
    }

    /// Commits `offsets` synchronously; remembers them when the commit succeeded.
    fn commit(&self, consumer: &BaseConsumer<Context>, offsets: Vec<(Arc<str>, i32, i64)>) {
        if offsets.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::with_capacity(offsets.len());
        for (t, p, o) in &offsets {
            if let Err(e) = tpl.add_partition_offset(t, *p, Offset::Offset(*o)) {
                tracing::warn!(source = %self.name, error = %e, "kafka: bad offset");
            }
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                self.commits.fetch_add(1, Ordering::Relaxed);
                let mut state = self.state();
                for (t, p, o) in offsets {
                    if let Some(ps) = state.partitions.get_mut(&(t, p)) {
                        ps.committed = ps.committed.max(o);
                    }
                }
            }
            Err(e) => {
                self.commit_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(source = %self.name, error = %e, "kafka offset commit failed; retrying at the next interval");
            }
        }
    }

    /// Waits (bounded) until `list`'s partitions have nothing in flight.
    fn drain(&self, list: &TopicPartitionList) {
        let deadline = Instant::now() + self.drain_timeout;
        loop {
            let pending: usize = {
                let state = self.state();
                list.elements()
                    .iter()
                    .filter_map(|e| state.partitions.get(&(Arc::from(e.topic()), e.partition())))
                    .filter_map(|p| p.watermark.as_ref())
                    .filter(|w| !w.is_blocked())
                    .map(|w| w.pending())
                    .sum()
            };
            if pending == 0 || self.closing.load(Ordering::Relaxed) {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(source = %self.name, pending, "kafka: revoked partitions still had batches in flight after drain_timeout; the next owner reads them again");
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// librdkafka callbacks: rebalances and statistics.
struct Context {
    shared: Arc<Shared>,
    lag: Mutex<HashMap<(String, i32), Arc<AtomicI64>>>,
}

impl Context {
    /// Stores librdkafka's `(topic, partition, lag)` reports in the `consumer_lag` gauges, for
    /// the partitions this member owns: a revoked partition may still be reported (with a
    /// stale lag), and its lag is now its new owner's to show.
    fn record_lag<'a>(&self, reports: impl IntoIterator<Item = (&'a str, i32, i64)>) {
        let owned: std::collections::HashSet<(Arc<str>, i32)> =
            self.shared.state().partitions.keys().cloned().collect();
        let mut lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        for (topic, partition, value) in reports {
            if partition < 0 || value < 0 {
                continue; // the internal "unassigned" partition, or no lag known
            }
            if !owned.contains(&(Arc::from(topic), partition)) {
                continue;
            }
            let gauge = lag
                .entry((topic.to_string(), partition))
                .or_insert_with(|| {
                    self.shared.metrics.labeled_gauge(
                        "consumer_lag",
                        &[("topic", topic), ("partition", &partition.to_string())],
                    )
                });
            gauge.store(value, Ordering::Relaxed);
        }
    }

    /// Unregisters the `consumer_lag` gauges of revoked partitions, which would otherwise
    /// show their last lag forever (and twice across the group, with the new owner's).
    fn forget_lag<'a>(&self, revoked: impl IntoIterator<Item = (&'a str, i32)>) {
        let mut lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        for (topic, partition) in revoked {
            if lag.remove(&(topic.to_string(), partition)).is_some() {
                self.shared.metrics.remove_labeled_gauge(
                    "consumer_lag",
                    &[("topic", topic), ("partition", &partition.to_string())],
                );
            }
        }
    }
}

impl ClientContext for Context {
    fn stats(&self, statistics: Statistics) {
        self.record_lag(statistics.topics.iter().flat_map(|(topic, t)| {
            t.partitions
                .iter()
                .map(move |(partition, p)| (topic.as_str(), *partition, p.consumer_lag))
        }));
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let shared = &self.shared;
            shared.rebalances.fetch_add(1, Ordering::Relaxed);
            shared.drain(list);
            let offsets = shared.to_commit(Some(list));
            shared.commit(consumer, offsets);
            let revoked: Vec<(String, i32)> = list
                .elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition()))
                .collect();
            let mut state = shared.state();
            for (topic, partition) in &revoked {
                state
                    .partitions
                    .remove(&(Arc::from(topic.as_str()), *partition));
            }
            shared
                .assigned
                .store(state.partitions.len() as i64, Ordering::Relaxed);
            drop(state);
            self.forget_lag(revoked.iter().map(|(t, p)| (t.as_str(), *p)));
            tracing::info!(source = %shared.name, partitions = list.count(), "kafka partitions revoked");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let shared = &self.shared;
        match rebalance {
            Rebalance::Assign(list) => {
                // librdkafka keeps a partition's pause flag across revocation: a partition
                // revoked while we had the assignment paused (pipeline full) and assigned back
                // later would stay paused for good, and only the partitions of the current
                // assignment get resumed. Start every assigned partition unpaused; the poll
                // loop pauses them again if the pipeline is still full (`paused_at`).
                if let Err(e) = consumer.resume(list) {
                    tracing::warn!(source = %shared.name, error = %e, "kafka: resuming newly assigned partitions failed");
                }
                shared.rebalances.fetch_add(1, Ordering::Relaxed);
                let mut state = shared.state();
                for e in list.elements() {
                    let fresh = state.fresh(shared.initial_backoff);
                    state
                        .partitions
                        .insert((Arc::from(e.topic()), e.partition()), fresh);
                }
                shared.generation.store(state.next_epoch, Ordering::Release);
                shared
                    .assigned
                    .store(state.partitions.len() as i64, Ordering::Relaxed);
                tracing::info!(source = %shared.name, partitions = list.count(), "kafka partitions assigned");
            }
            Rebalance::Error(e) => {
                tracing::warn!(source = %shared.name, error = %e, "kafka rebalance error");
            }
            Rebalance::Revoke(_) => {}
        }
    }
}

#[async_trait]
impl Source for KafkaSource {
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
        let shared = Arc::new(Shared {
            name: name.clone(),
            state: Mutex::new(State::default()),
            closing: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            paused_at: AtomicI64::new(0),
            drain_timeout: self.config.drain_timeout.0,
            initial_backoff: self.config.retry_backoff.0,
            commits: metrics.counter("commits"),
            commit_failures: metrics.counter("commit_failures"),
            rebalances: metrics.counter("rebalances"),
            seeks: metrics.counter("seeks"),
            assigned: metrics.gauge("assigned_partitions"),
            metrics: metrics.clone(),
        });
        let context = Context {
            shared: shared.clone(),
            lag: Mutex::new(HashMap::new()),
        };
        let consumer: BaseConsumer<Context> = self
            .props
            .create_with_context(context)
            .map_err(|e| format!("kafka consumer: {e}"))?;
        let topics: Vec<&str> = self.config.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| format!("kafka subscribe {topics:?}: {e}"))?;

        let (batch_tx, mut batches) = mpsc::channel::<RawBatch>(2);
        let stop = Arc::new(AtomicBool::new(false));
        let finished = Arc::new(AtomicBool::new(false));
        // Also when this task is aborted (shutdown deadline): the thread then commits what is
        // done and leaves the group instead of waiting forever.
        let _release = SetOnDrop(vec![stop.clone(), finished.clone()]);
        let poller = {
            let shared = shared.clone();
            let stop = stop.clone();
            let finished = finished.clone();
            let options = PollOptions {
                max_batch: self.config.max_batch,
                commit_interval: self.config.commit_interval.0,
                headers: self.config.headers_as_tags,
            };
            std::thread::Builder::new()
                .name(format!("kafka-{name}"))
                .spawn(move || poll_loop(consumer, shared, options, batch_tx, stop, finished))
                .map_err(|e| format!("kafka: cannot start the consumer thread: {e}"))?
        };

        let mut decoder = Decoder::new(self.config.decode.clone())?;
        let source: Name = intern(&name);
        let key_tag: Option<Name> = self.config.key_tag.as_deref().map(intern);
        let mut acks: FuturesUnordered<_> = FuturesUnordered::new();
        let mut attempts: Attempts<RecordKey> =
            Attempts::new(self.config.max_redeliveries, redelivery::DEFAULT_CAPACITY);
        let poisoned = metrics.counter("poisoned");
        let out = Some(out);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if out.is_some() => break,
                Some(done) = acks.next(), if !acks.is_empty() => {
                    let (status, ranges, keys): Settled = done;
                    // Counted before the range completes (and the partition is re-read).
                    attempts.settle_batch(keys, status);
                    shared.complete(&ranges, status);
                }
                batch = batches.recv(), if out.is_some() => {
                    let Some(batch) = batch else { break };
                    let Some(o) = out.as_ref() else { break };
                    let n = batch.messages.len();
                    let mut decoded = Decoded::with_capacity(n);
                    let mut bytes = 0;
                    let mut keys = Vec::new();
                    let (counting, watching) = (attempts.enabled(), attempts.is_watching());
                    for m in batch.messages {
                        bytes += m.payload.len();
                        let received = m.timestamp_ms.map_or_else(now_ns, |t| t.saturating_mul(1_000_000));
                        let meta = Meta {
                            source: Some(source.clone()),
                            origin: Origin::Kafka { topic: m.topic.clone(), partition: m.partition, offset: m.offset },
                            error: None,
                        };
                        let key: RecordKey = (m.topic.clone(), m.partition, m.offset);
                        let failures = if watching { attempts.failures(&key) } else { 0 };
                        if counting && redelivery::exhausted(failures, attempts.max()) {
                            // A poison record: dead-letter it; the offset is committed past it
                            // once that resolves.
                            let why = redelivery::reason(failures, attempts.max());
                            tracing::warn!(source = %name, topic = %m.topic, partition = m.partition, offset = m.offset, "record dead-lettered: {why}");
                            poisoned.fetch_add(1, Ordering::Relaxed);
                            decoded.dead.push(Decoder::dead_letter(m.payload, received, meta, &DecodeError(why)));
                            keys.push((key, None));
                            continue;
                        }
                        let before = decoded.records.len();
                        let before_dead = decoded.dead.len();
                        decoded.push(&mut decoder, m.payload, Some(&m.topic), received, meta);
                        if watching {
                            // Something failed recently: follow each record on its own, so
                            // that only those that fail again are counted.
                            let (own, status) = ack::batch();
                            for r in decoded.records[before..].iter_mut().chain(&mut decoded.dead[before_dead..]) {
                                r.finalizers.push(own.clone());
                            }
                            own.finish(BatchStatus::Delivered);
                            keys.push((key, Some(status)));
                        } else if counting {
                            keys.push((key, None));
                        }
                        let key = key_tag
                            .as_ref()
                            .zip(m.key.as_deref().and_then(|k| std::str::from_utf8(k).ok()));
                        let mut protected = Vec::new();
                        if let Some(pattern) = decoder.topic_pattern() {
                            if key.is_some() || !m.headers.is_empty() {
                                pattern.captures(&m.topic, |n, _| protected.push(n.clone()));
                            }
                        }
                        for r in &mut decoded.records[before..] {
                            merge_message_tags(r, &protected, key, &m.headers);
                        }
                    }
                    metrics.add_bytes(bytes);
                    let (finalizer, status) = ack::batch();
                    decoded.attach(&finalizer);
                    finalizer.finish(BatchStatus::Delivered);
                    acks.push(wait(status, batch.ranges, keys));
                    if decoded.send(o).await.is_err() {
                        break;
                    }
                }
            }
        }
        // Stop reading, let downstream drain, and keep completing ranges until every batch
        // sent has resolved; then the consumer thread commits one last time and leaves.
        stop.store(true, Ordering::Relaxed);
        drop(out);
        drop(batches);
        while let Some(done) = acks.next().await {
            let (status, ranges, _): Settled = done;
            shared.complete(&ranges, status);
        }
        shared.closing.store(true, Ordering::Relaxed);
        finished.store(true, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || poller.join())
            .await
            .map_err(|e| format!("kafka consumer thread: {e}"))?
            .map_err(|_| "kafka consumer thread panicked".to_string())?;
        Ok(())
    }
}

/// Adds a message's key (`key_tag`) and headers (`headers_as_tags`) to the tags of a record
/// decoded from it. Precedence, highest first: tags captured from the topic by
/// `decode.topic_pattern` (`protected`), the key tag, headers, tags from the payload. Topic
/// tags win because who may write to a topic is the broker's ACLs' decision, while headers
/// are whatever the producer sent: a `tenant_id` header must not move a record to another
/// tenant.
fn merge_message_tags(
    record: &mut sluice_core::record::Record,
    protected: &[Name],
    key: Option<(&Name, &str)>,
    headers: &[(String, String)],
) {
    let is_protected = |name: &str| protected.iter().any(|p| &**p == name);
    for (name, value) in headers {
        let is_key = key.is_some_and(|(k, _)| &**k == name.as_str());
        if !is_protected(name) && !is_key {
            record.set_tag(name, value.as_str());
        }
    }
    if let Some((name, value)) = key {
        if !is_protected(name) {
            record.set_tag(name, value);
        }
    }
}

/// Sets its flags when dropped.
struct SetOnDrop(Vec<Arc<AtomicBool>>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        for f in &self.0 {
            f.store(true, Ordering::Relaxed);
        }
    }
}

/// A batch's status, its ranges, and its records' keys with their own statuses (when they
/// were followed one by one).
async fn wait(
    status: StatusReceiver,
    ranges: Vec<RangeId>,
    keys: Vec<(RecordKey, Option<StatusReceiver>)>,
) -> Settled {
    let status = status.await;
    let mut settled = Vec::with_capacity(keys.len());
    for (key, own) in keys {
        let own = match own {
            Some(rx) => Some(rx.await),
            None => None,
        };
        settled.push((key, own));
    }
    (status, ranges, settled)
}

fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

struct PollOptions {
    max_batch: usize,
    commit_interval: Duration,
    headers: bool,
}

/// The consumer thread: polls, registers ranges, hands batches over, commits, and seeks
/// partitions whose records failed back to their watermark.
///
/// A batch is registered in the watermarks only once the channel has room for it (a reserved
/// slot), so a rebalance never waits for records this thread itself still holds. While the
/// pipeline is full the assigned partitions are paused and polling goes on, so rebalances and
/// the group protocol are served; librdkafka fetches again from the last message handed out
/// when they are resumed.
fn poll_loop(
    consumer: BaseConsumer<Context>,
    shared: Arc<Shared>,
    options: PollOptions,
    tx: mpsc::Sender<RawBatch>,
    stop: Arc<AtomicBool>,
    finished: Arc<AtomicBool>,
) {
    let mut last_commit = Instant::now();
    let mut topics: HashMap<String, Arc<str>> = HashMap::new();
    let mut messages: Vec<RawMessage> = Vec::new();
    let commit_due = |last: &mut Instant| {
        if last.elapsed() >= options.commit_interval {
            shared.commit(&consumer, shared.to_commit(None));
            *last = Instant::now();
        }
    };
    'outer: while !stop.load(Ordering::Relaxed) {
        commit_due(&mut last_commit);
        seek_blocked(&consumer, &shared);
        let mut timeout = Duration::from_millis(100);
        while messages.len() < options.max_batch {
            match poll_one(&consumer, &shared, &mut topics, options.headers, timeout) {
                Polled::Message(m) => {
                    messages.push(m);
                    timeout = Duration::ZERO;
                }
                Polled::Nothing => break,
            }
        }
        if messages.is_empty() {
            continue;
        }
        // Wait for room downstream. Short waits (the usual case: the pipeline is momentarily
        // full) just wait; after PAUSE_AFTER the assignment is paused and polling goes on so
        // the group is served. (Pausing discards librdkafka's prefetched messages, which are
        // fetched again on resume: too costly for every brief stall.)
        let waiting = Instant::now();
        let permit = loop {
            match tx.try_reserve() {
                Ok(permit) => break permit,
                Err(mpsc::error::TrySendError::Closed(())) => break 'outer,
                Err(mpsc::error::TrySendError::Full(())) => {}
            }
            if stop.load(Ordering::Relaxed) {
                break 'outer;
            }
            if waiting.elapsed() < PAUSE_AFTER {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            set_paused(&consumer, &shared, true);
            commit_due(&mut last_commit);
            // Messages librdkafka had already queued (or of partitions assigned meanwhile)
            // join the held batch; they are registered with it.
            if let Polled::Message(m) = poll_one(
                &consumer,
                &shared,
                &mut topics,
                options.headers,
                Duration::from_millis(10),
            ) {
                messages.push(m);
            }
        };
        set_paused(&consumer, &shared, false);
        if let Some(batch) = register(&shared, std::mem::take(&mut messages)) {
            permit.send(batch);
        }
    }
    // Shutdown: the source task finishes the acknowledgements of everything it sent; keep
    // committing meanwhile. Keep polling too, with every partition paused: librdkafka leaves
    // the group when the application does not poll for `max.poll.interval.ms`, and an evicted
    // member's final commit fails (its records would be read again). What such a poll still
    // returns is not handed out (never registered, so never committed: read again later).
    while !finished.load(Ordering::Relaxed) {
        set_paused(&consumer, &shared, true);
        commit_due(&mut last_commit);
        let _ = poll_one(
            &consumer,
            &shared,
            &mut topics,
            false,
            Duration::from_millis(10),
        );
    }
    shared.commit(&consumer, shared.to_commit(None));
    shared.closing.store(true, Ordering::Relaxed);
    // Dropping the consumer leaves the group (its revocation callback commits nothing new).
    drop(consumer);
}

/// How long the consumer thread waits for room downstream before it pauses the assignment.
const PAUSE_AFTER: Duration = Duration::from_secs(1);

enum Polled {
    Message(RawMessage),
    Nothing,
}

/// Polls once; copies a message out of librdkafka, tagged with the epoch counter at that
/// moment (see [`register`]).
fn poll_one(
    consumer: &BaseConsumer<Context>,
    shared: &Shared,
    topics: &mut HashMap<String, Arc<str>>,
    with_headers: bool,
    timeout: Duration,
) -> Polled {
    match consumer.poll(timeout) {
        None => Polled::Nothing,
        Some(Err(e)) => {
            shared.metrics.add_errors(1);
            tracing::warn!(source = %shared.name, error = %e, "kafka consumer error");
            Polled::Nothing
        }
        Some(Ok(m)) => {
            tracing::trace!(
                partition = m.partition(),
                offset = m.offset(),
                "kafka: polled"
            );
            let topic = match topics.get(m.topic()) {
                Some(t) => t.clone(),
                None => {
                    let t: Arc<str> = Arc::from(m.topic());
                    topics.insert(m.topic().to_string(), t.clone());
                    t
                }
            };
            let headers = match (with_headers, m.headers()) {
                (true, Some(hs)) => hs
                    .iter()
                    .filter_map(|h| {
                        let v = std::str::from_utf8(h.value?).ok()?;
                        Some((h.key.to_string(), v.to_string()))
                    })
                    .collect(),
                _ => Vec::new(),
            };
            Polled::Message(RawMessage {
                topic,
                partition: m.partition(),
                offset: m.offset(),
                generation: shared.generation.load(Ordering::Acquire),
                timestamp_ms: m.timestamp().to_millis(),
                key: m.key().map(Bytes::copy_from_slice),
                headers,
                payload: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
            })
        }
    }
}

/// Pauses (or resumes) fetching of every assigned partition; no-op when already so.
fn set_paused(consumer: &BaseConsumer<Context>, shared: &Shared, paused: bool) {
    let was = shared.paused.swap(paused, Ordering::Relaxed);
    // Re-pause after a rebalance: newly assigned partitions start unpaused.
    let rebalanced = shared.rebalances.load(Ordering::Relaxed);
    let stale = paused && shared.paused_at.swap(rebalanced, Ordering::Relaxed) != rebalanced;
    if was == paused && !stale {
        return;
    }
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    let result = if paused {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    if let Err(e) = result {
        tracing::warn!(source = %shared.name, error = %e, paused, "kafka pause/resume failed");
    }
}

/// Registers a batch's offsets in the partitions' watermarks. Messages of partitions that
/// are no longer assigned, or whose watermark is blocked (they will be read again), are
/// dropped here. `None` when nothing is left.
fn register(shared: &Shared, messages: Vec<RawMessage>) -> Option<RawBatch> {
    let mut state = shared.state();
    let mut kept = Vec::with_capacity(messages.len());
    // Last offset per partition in this batch, in order of first appearance.
    let mut ends: Vec<(Arc<str>, i32, i64)> = Vec::new();
    for m in messages {
        let Some(p) = state.partitions.get_mut(&(m.topic.clone(), m.partition)) else {
            continue;
        };
        if p.blocked_since.is_some() || p.epoch > m.generation {
            tracing::debug!(
                partition = m.partition,
                offset = m.offset,
                "kafka: message of a blocked or re-read partition dropped (it is read again)"
            );
            continue;
        }
        if p.watermark.is_none() {
            // Reading starts here: the group's committed offset (or the reset position), so
            // there is nothing to commit until a range completes.
            p.watermark = Some(Watermark::new(m.offset));
            p.committed = p.committed.max(m.offset);
        }
        match ends
            .iter_mut()
            .find(|(t, part, _)| *part == m.partition && *t == m.topic)
        {
            Some(e) => e.2 = e.2.max(m.offset + 1),
            None => ends.push((m.topic.clone(), m.partition, m.offset + 1)),
        }
        kept.push(m);
    }
    if kept.is_empty() {
        return None;
    }
    let mut ranges = Vec::with_capacity(ends.len());
    for (topic, partition, end) in ends {
        if let Some(p) = state.partitions.get_mut(&(topic.clone(), partition)) {
            if let Some(w) = p.watermark.as_mut() {
                let seq = w.push(end);
                ranges.push(RangeId {
                    topic,
                    partition,
                    epoch: p.epoch,
                    seq,
                });
            }
        }
    }
    Some(RawBatch {
        messages: kept,
        ranges,
    })
}

/// Seeks partitions blocked by an errored range back to their watermark once their backoff
/// has passed, and starts a new epoch for them.
fn seek_blocked(consumer: &BaseConsumer<Context>, shared: &Shared) {
    let due: Vec<(Arc<str>, i32, i64)> = {
        let state = shared.state();
        state
            .partitions
            .iter()
            .filter_map(|((t, p), s)| {
                let since = s.blocked_since?;
                let w = s.watermark.as_ref()?;
                (since.elapsed() >= s.backoff).then(|| (t.clone(), *p, w.committable()))
            })
            .collect()
    };
    for (topic, partition, offset) in due {
        // Commit what is done below the failed range first, then read it again.
        shared.commit(consumer, vec![(topic.clone(), partition, offset)]);
        match consumer.seek(
            &topic,
            partition,
            Offset::Offset(offset),
            Duration::from_secs(5),
        ) {
            Ok(()) => {
                shared.seeks.fetch_add(1, Ordering::Relaxed);
                tracing::info!(source = %shared.name, %topic, partition, offset, "kafka: reading failed records again");
                let mut state = shared.state();
                state.next_epoch += 1;
                let epoch = state.next_epoch;
                shared.generation.store(epoch, Ordering::Release);
                if let Some(s) = state.partitions.get_mut(&(topic.clone(), partition)) {
                    s.epoch = epoch;
                    s.watermark = None;
                    s.blocked_since = None;
                    s.backoff = (s.backoff * 2).min(Duration::from_secs(30));
                }
            }
            Err(e) => {
                tracing::warn!(source = %shared.name, %topic, partition, error = %e, "kafka seek failed; retrying");
                let mut state = shared.state();
                if let Some(s) = state.partitions.get_mut(&(topic.clone(), partition)) {
                    s.blocked_since = Some(Instant::now());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_does_not_print_secret_options() {
        let mut c = KafkaSourceConfig::new("127.0.0.1:9092", &["t"], "g");
        for (k, v) in [
            ("sasl.password", "pw1"),
            ("ssl.key.password", "pw2"),
            ("sasl.oauthbearer.client.secret", "pw3"),
            ("security.protocol", "SASL_SSL"),
        ] {
            c.librdkafka_options.insert(k.into(), v.into());
        }
        let shown = format!("{c:?}");
        for pw in ["pw1", "pw2", "pw3"] {
            assert!(!shown.contains(pw), "{shown}");
        }
        assert!(shown.contains("SASL_SSL"), "{shown}");
    }

    #[test]
    fn options_parse_and_map_to_librdkafka() {
        let c: KafkaSourceConfig = toml::from_str(
            r#"
bootstrap_servers = "127.0.0.1:9092"
topics = ["iot-messages", "^telemetry-.*"]
group_id = "g"
auto_offset_reset = "latest"
session_timeout = "6s"
librdkafka_options = { "fetch.max.bytes" = "1048576" }
"#,
        )
        .expect("parses");
        let props = c.client_config("id").expect("valid");
        assert_eq!(props.get("auto.offset.reset"), Some("latest"));
        assert_eq!(props.get("session.timeout.ms"), Some("6000"));
        assert_eq!(props.get("enable.auto.commit"), Some("false"));
        assert_eq!(props.get("fetch.max.bytes"), Some("1048576"));

        let mut empty = c.clone();
        empty.topics.clear();
        assert!(empty.client_config("id").is_err());
        let err = toml::from_str::<KafkaSourceConfig>(
            "bootstrap_servers = \"x\"\ntopics = [\"t\"]\ngroup_id = \"g\"\ngroupid = \"h\"",
        )
        .expect_err("typo");
        assert!(err.to_string().contains("groupid"), "{err}");
    }

    fn shared() -> Shared {
        let m = Arc::new(ComponentMetrics::new(
            "k",
            sluice_core::metrics::Kind::Source,
        ));
        Shared {
            name: "k".into(),
            state: Mutex::new(State::default()),
            closing: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            paused_at: AtomicI64::new(0),
            drain_timeout: Duration::from_millis(10),
            initial_backoff: Duration::from_millis(1),
            commits: m.counter("commits"),
            commit_failures: m.counter("commit_failures"),
            rebalances: m.counter("rebalances"),
            seeks: m.counter("seeks"),
            assigned: m.gauge("assigned_partitions"),
            metrics: m,
        }
    }

    #[test]
    fn lag_gauges_exist_only_for_owned_partitions() {
        let metrics = sluice_core::metrics::Metrics::new();
        let mut s = shared();
        s.metrics = metrics.component("k", sluice_core::metrics::Kind::Source);
        let cx = Context {
            shared: Arc::new(s),
            lag: Mutex::new(HashMap::new()),
        };
        assign(&cx.shared, &[0, 1]);
        let lag_of = |p: &str| {
            let text = metrics.render_prometheus();
            text.lines()
                .find(|l| l.contains("consumer_lag") && l.contains(&format!("partition=\"{p}\"")))
                .map(|l| l.rsplit(' ').next().unwrap_or("").to_string())
        };
        cx.record_lag([("t", 0, 5), ("t", 1, 7), ("t", 2, 9), ("t", -1, 3)]);
        assert_eq!(lag_of("0").as_deref(), Some("5"));
        assert_eq!(lag_of("1").as_deref(), Some("7"));
        assert_eq!(lag_of("2"), None, "not assigned here");
        // Partition 1 is revoked (as pre_rebalance does), then still reported by librdkafka.
        cx.shared.state().partitions.remove(&(Arc::from("t"), 1));
        cx.forget_lag([("t", 1)]);
        assert_eq!(lag_of("1"), None, "removed on revoke");
        cx.record_lag([("t", 0, 4), ("t", 1, 7)]);
        assert_eq!(lag_of("0").as_deref(), Some("4"));
        assert_eq!(lag_of("1"), None, "a stale report does not bring it back");
    }

    #[test]
    fn topic_tags_win_over_key_and_headers() {
        let mut r = sluice_core::record::Record::new(0);
        r.set_tag("tenant_id", "from-topic");
        r.set_tag("site", "from-payload");
        let headers = vec![
            ("tenant_id".to_string(), "from-header".to_string()),
            ("site".to_string(), "from-header".to_string()),
            ("device".to_string(), "from-header".to_string()),
            ("extra".to_string(), "from-header".to_string()),
        ];
        let key_tag = intern("device");
        merge_message_tags(
            &mut r,
            &[intern("tenant_id")],
            Some((&key_tag, "from-key")),
            &headers,
        );
        assert_eq!(r.tag("tenant_id"), Some("from-topic"));
        assert_eq!(r.tag("device"), Some("from-key"));
        assert_eq!(r.tag("site"), Some("from-header"));
        assert_eq!(r.tag("extra"), Some("from-header"));
        assert_eq!(r.tags.len(), 4, "no duplicate tags: {:?}", r.tags);
    }

    fn msg(partition: i32, offset: i64) -> RawMessage {
        RawMessage {
            topic: Arc::from("t"),
            partition,
            offset,
            generation: u64::MAX,
            timestamp_ms: None,
            key: None,
            headers: Vec::new(),
            payload: Bytes::new(),
        }
    }

    fn assign(s: &Shared, partitions: &[i32]) {
        let mut state = s.state();
        for p in partitions {
            let fresh = state.fresh(Duration::from_millis(1));
            state.partitions.insert((Arc::from("t"), *p), fresh);
        }
    }

    fn committable(s: &Shared) -> Vec<(i32, i64)> {
        let mut v: Vec<(i32, i64)> = s
            .to_commit(None)
            .into_iter()
            .map(|(_, p, o)| (p, o))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn out_of_order_deliveries_commit_only_the_contiguous_prefix() {
        let s = shared();
        assign(&s, &[0, 1]);
        let a = register(&s, (10..20).map(|o| msg(0, o)).collect()).expect("batch a");
        let b = register(&s, (20..30).map(|o| msg(0, o)).chain([msg(1, 5)]).collect())
            .expect("batch b");
        s.complete(&b.ranges, BatchStatus::Delivered);
        // Partition 1 is done; partition 0 must not move past batch a, still in flight.
        assert_eq!(committable(&s), vec![(1, 6)]);
        s.complete(&a.ranges, BatchStatus::Delivered);
        assert_eq!(committable(&s), vec![(0, 30), (1, 6)]);
    }

    #[test]
    fn an_errored_range_blocks_until_it_is_read_again() {
        let s = shared();
        assign(&s, &[0]);
        let a = register(&s, (0..10).map(|o| msg(0, o)).collect()).expect("a");
        let b = register(&s, (10..20).map(|o| msg(0, o)).collect()).expect("b");
        let c = register(&s, (20..30).map(|o| msg(0, o)).collect()).expect("c");
        s.complete(&a.ranges, BatchStatus::Delivered);
        s.complete(&b.ranges, BatchStatus::Errored);
        s.complete(&c.ranges, BatchStatus::Delivered);
        assert_eq!(committable(&s), vec![(0, 10)], "stops at the failed range");
        // While blocked, newly read messages of the partition are not passed on.
        assert!(register(&s, (30..35).map(|o| msg(0, o)).collect()).is_none());
        // The consumer seeks back to 10 (simulated: new epoch, fresh watermark)…
        {
            let mut state = s.state();
            state.next_epoch += 1;
            let epoch = state.next_epoch;
            let p = state.partitions.get_mut(&(Arc::from("t"), 0)).expect("p0");
            p.committed = 10;
            p.epoch = epoch;
            p.watermark = None;
            p.blocked_since = None;
        }
        // …a late completion from the old epoch changes nothing…
        s.complete(&c.ranges, BatchStatus::Delivered);
        assert!(committable(&s).is_empty());
        // …and the re-read range commits once delivered.
        let again = register(&s, (10..30).map(|o| msg(0, o)).collect()).expect("again");
        s.complete(&again.ranges, BatchStatus::Delivered);
        assert_eq!(committable(&s), vec![(0, 30)]);
    }

    #[test]
    fn rejected_records_are_committed_and_revoked_partitions_ignored() {
        let s = shared();
        assign(&s, &[0]);
        let a = register(&s, (0..5).map(|o| msg(0, o)).collect()).expect("a");
        s.complete(&a.ranges, BatchStatus::Rejected);
        assert_eq!(committable(&s), vec![(0, 5)]);
        assert!(
            register(&s, vec![msg(7, 0)]).is_none(),
            "partition 7 is not assigned here"
        );
    }
}
