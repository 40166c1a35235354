//! `kinesis` source: reads every shard of an Amazon Kinesis data stream, checkpoints per shard
//! only what was delivered, and shares the shards between instances through a DynamoDB lease
//! table (the Kinesis Client Library's scheme, no coordinator of ours).
//!
//! ```toml
//! [sources.stream]
//! type = "kinesis"
//! stream_name = "iot-telemetry"
//! lease_table = "sluice-iot-telemetry"   # created if missing
//! body_path = "payload"                  # AWS IoT rule envelopes, as in the sqs source
//! topic_path = "topic"
//! decode = { codec = "json", topic_pattern = "dt/{tenant}/{project}/{device_id}/telemetry" }
//! ```
//!
//! **Shards.** Every `lease_timeout / 3` an instance lists the stream's shards (`ListShards`),
//! adds a lease for each new one, renews its own leases and takes free or expired ones. Each
//! held shard has its own `GetRecords` loop (`max_records` per call, at most 5 calls per second,
//! `poll_interval` between calls once caught up). After resharding, a child shard is read only
//! once its parents (`ParentShardId`, `AdjacentParentShardId`) have been read to their end and
//! checkpointed `SHARD_END`, so per-key order survives splits and merges. A
//! `ProvisionedThroughputExceeded` answer backs off (0.5 s doubling to 10 s, metric
//! `throttled`); an expired iterator is replaced from the last record read.
//!
//! **Checkpoints only after delivery.** Each `GetRecords` answer is one batch with one
//! finalizer. Per shard, the batches' statuses are taken in read order: the checkpoint is the
//! last sequence number of the contiguous prefix of batches that were delivered (or rejected and
//! dead-lettered), written to the lease every `checkpoint_interval` — the same watermark rule
//! as the `kafka` source; a batch delivered early never moves it past an older one in flight.
//! A batch that ends `Errored` stops the shard's checkpoint; after a backoff (1 s doubling to
//! 30 s) the shard is read again from its last delivered record (later records are read again
//! too: at-least-once). On start a shard resumes after its checkpoint (`AFTER_SEQUENCE_NUMBER`),
//! or from `starting_position` when it has none.
//!
//! **Poison records.** Failed deliveries are counted per shard and sequence number (after a
//! failure, each record read again carries its own status too, so only the records that fail
//! again are counted). A record that failed more than `max_redeliveries` times (default 10,
//! 0 = unlimited) goes to `dead_letter` with the reason and the count instead, and the
//! checkpoint moves past it once that resolves (metric `poisoned`).
//!
//! **Leases.** Items are KCL-style: `leaseKey` (shard id), `checkpoint`, `leaseOwner`,
//! `leaseCounter`, `parentShardId`. An instance increments the counters of its leases with
//! conditional writes; a lease whose counter has not moved for `lease_timeout` belongs to a dead
//! instance and is taken over from its checkpoint. Instances split the ready shards evenly (an
//! instance below its share takes one lease per round from the busiest). An instance whose
//! renewal or checkpoint finds another owner stops reading that shard at once; its records in
//! flight may then be read again by the new owner (duplicates, never a loss). A graceful stop
//! waits for the records in flight, checkpoints and frees its leases. Instances that share
//! `lease_table` share the stream; give each pipeline its own table (one table per stream).
//!
//! **Metrics:** `in`, `bytes`, `millis_behind_latest{shard}` (iterator age of each held
//! shard), `leases_held`, `leases_taken`, `leases_lost`, `checkpoints`, `checkpoint_failures`,
//! `throttled`, `rereads` (errored batches read again), `poisoned`.
//!
//! **moto** (the test server) keeps returning an iterator at the end of a closed shard instead
//! of none; a closed shard (one with an `EndingSequenceNumber`) is therefore also finished when
//! an answer is empty and it is read up to that number or `MillisBehindLatest` is 0.

mod lease;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_kinesis::error::DisplayErrorContext;
use aws_sdk_kinesis::types::ShardIteratorType;
use bytes::Bytes;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::ack::{self, BatchStatus, StatusReceiver};
use sluice_core::channel::Outputs;
use sluice_core::config::HumanDuration;
use sluice_core::decode::{DecodeConfig, DecodeError, Decoded, Decoder};
use sluice_core::metrics::ComponentMetrics;
use sluice_core::record::{intern, Meta, Name, Origin};
use sluice_core::registry::{BuildContext, SourceConfig};
use sluice_core::source::{Source, SourceContext};
use sluice_core::topology::now_ns;
use sluice_core::BoxError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::lease::{Lease, LeaseTable, Observed, Written, LATEST, SHARD_END, TRIM_HORIZON};
use crate::redelivery::{self, Attempts};
use crate::sqs::Envelope;

/// Kinesis allows 5 `GetRecords` calls per second per shard.
const MIN_CALL_GAP: Duration = Duration::from_millis(200);
/// Batches of one shard waiting for their delivery status; more stops reading the shard.
const MAX_PENDING_BATCHES: usize = 32;
/// Records of one shard whose failed deliveries are counted at once (`max_redeliveries`).
const MAX_WATCHED_RECORDS: usize = 10_000;
/// Backoff after `ProvisionedThroughputExceeded`, doubling up to [`MAX_THROTTLE_BACKOFF`].
const THROTTLE_BACKOFF: Duration = Duration::from_millis(500);
const MAX_THROTTLE_BACKOFF: Duration = Duration::from_secs(10);
/// Backoff before an errored batch is read again, doubling up to [`MAX_REREAD_BACKOFF`].
const REREAD_BACKOFF: Duration = Duration::from_secs(1);
const MAX_REREAD_BACKOFF: Duration = Duration::from_secs(30);

/// Where a shard without a checkpoint starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StartingPosition {
    /// The oldest record still in the shard: a new pipeline processes the retained backlog.
    #[default]
    TrimHorizon,
    /// Only records added after the shard's lease was first taken.
    Latest,
}

/// Reads a Kinesis data stream; checkpoints delivered records per shard in a DynamoDB lease
/// table that also splits the shards between instances.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KinesisConfig {
    /// Name of the stream. Required (no default).
    pub stream_name: String,
    /// DynamoDB table holding one lease (checkpoint, owner, counter) per shard; created
    /// (on-demand billing) if missing. Instances with the same table share the stream's
    /// shards; use one table per stream and pipeline. Required (no default).
    pub lease_table: String,
    /// AWS region. Default: from the standard chain (`AWS_REGION`, profile…), else an error.
    #[serde(default)]
    pub region: Option<String>,
    /// Endpoint of a Kinesis-compatible server (moto, LocalStack), also used for the lease
    /// table unless `lease_endpoint_url` is set; an empty string means "not set". Default: the
    /// AWS endpoints of the region.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Endpoint of the DynamoDB holding `lease_table`; an empty string means "not set".
    /// Default: `endpoint_url`, else the AWS endpoint of the region.
    #[serde(default)]
    pub lease_endpoint_url: Option<String>,
    /// Where a shard without a checkpoint starts: "trim_horizon" (oldest retained record) or
    /// "latest". Shards created by resharding later always start at their beginning.
    /// Default "trim_horizon".
    #[serde(default)]
    pub starting_position: StartingPosition,
    /// Most records per `GetRecords` call (one batch), 1–10000. Default 1000.
    #[serde(default = "default_max_records")]
    pub max_records: i32,
    /// Wait before the next `GetRecords` of a shard once it is caught up (an answer with fewer
    /// than `max_records` records and `MillisBehindLatest` 0), at least "200ms". Default "1s".
    #[serde(default = "default_poll_interval")]
    pub poll_interval: HumanDuration,
    /// A lease whose counter has not moved for this long is taken over by another instance;
    /// leases are renewed (and shards listed) every third of it. Default "10s".
    #[serde(default = "default_lease_timeout")]
    pub lease_timeout: HumanDuration,
    /// How often each shard's delivered watermark is written to its lease. Default "1s".
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval: HumanDuration,
    /// This instance's name in the lease table (`leaseOwner`); must differ between running
    /// instances. Default: "<HOSTNAME>-<pid>-<random>".
    #[serde(default)]
    pub worker_id: Option<String>,
    /// Record decoding. Default: JSON; `max_payload` (default "1MiB") dead-letters bigger
    /// records. With `body_path` it applies to the selected part; `topic_pattern` applies to
    /// the topic read at `topic_path`.
    #[serde(default)]
    pub decode: DecodeConfig,
    /// Dotted path of the part of a JSON record to decode, for AWS IoT rule envelopes such as
    /// `{"topic":"…","payload":{…}}`: "payload" (as in the sqs source). A record that is not
    /// JSON or lacks the path goes to `dead_letter`. Default: none (the whole record).
    #[serde(default)]
    pub body_path: Option<String>,
    /// Dotted path of a string in a JSON record holding its MQTT topic (an IoT rule's
    /// `topic() AS topic`): "topic". It is matched against `decode.topic_pattern`, whose
    /// captures become tags. Without `body_path` the key is removed from the decoded object. A
    /// record without it goes to `dead_letter`. Default: none.
    #[serde(default)]
    pub topic_path: Option<String>,
    /// A record whose delivery failed (a sink gave up with a transient error) more than this
    /// many times is sent to `dead_letter`, with the reason and the count, and checkpointed
    /// past, instead of making its shard read it again forever. Failures are counted in memory
    /// per shard and sequence number (after a failure each record re-read is followed on its
    /// own, so only records that fail again count; a restart or a lease move starts the count
    /// again). 0 = unlimited. Default 10.
    #[serde(default = "default_max_redeliveries")]
    pub max_redeliveries: u32,
}

fn default_max_redeliveries() -> u32 {
    redelivery::DEFAULT_MAX_REDELIVERIES
}

fn default_max_records() -> i32 {
    1000
}
fn default_poll_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_lease_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_checkpoint_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}

impl KinesisConfig {
    /// A source of `stream_name` with leases in `lease_table`, other options at their defaults.
    pub fn new(stream_name: &str, lease_table: &str) -> Self {
        KinesisConfig {
            stream_name: stream_name.to_string(),
            lease_table: lease_table.to_string(),
            region: None,
            endpoint_url: None,
            lease_endpoint_url: None,
            starting_position: StartingPosition::default(),
            max_records: default_max_records(),
            poll_interval: default_poll_interval(),
            lease_timeout: default_lease_timeout(),
            checkpoint_interval: default_checkpoint_interval(),
            worker_id: None,
            decode: DecodeConfig::default(),
            body_path: None,
            topic_path: None,
            max_redeliveries: default_max_redeliveries(),
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.stream_name.is_empty() {
            return Err("`stream_name` is empty: set the name of the Kinesis stream".into());
        }
        if self.lease_table.is_empty() {
            return Err("`lease_table` is empty: name the DynamoDB table for leases".into());
        }
        if !(1..=10_000).contains(&self.max_records) {
            return Err(format!(
                "`max_records` = {}: Kinesis allows 1 to 10000",
                self.max_records
            ));
        }
        if self.poll_interval.0 < MIN_CALL_GAP {
            return Err(format!(
                "`poll_interval` = \"{}\": at least \"200ms\" (Kinesis allows 5 GetRecords calls per second per shard)",
                self.poll_interval
            ));
        }
        if self.lease_timeout.0 < Duration::from_secs(1) {
            return Err(format!(
                "`lease_timeout` = \"{}\": at least \"1s\"",
                self.lease_timeout
            ));
        }
        if self.checkpoint_interval.0.is_zero() {
            return Err("`checkpoint_interval` must be above 0".into());
        }
        if self.worker_id.as_deref() == Some("") {
            return Err("`worker_id` is empty: leave it out for a generated one".into());
        }
        Envelope::from_paths(self.body_path.as_deref(), self.topic_path.as_deref())?;
        Ok(())
    }

    fn worker(&self) -> String {
        self.worker_id.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "sluice".into());
            format!(
                "{host}-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            )
        })
    }
}

#[async_trait]
impl SourceConfig for KinesisConfig {
    fn acknowledges(&self) -> bool {
        true
    }

    /// Kinesis's default retention (24 h): held records are not checkpointed, and a restart
    /// after they left the stream cannot read them again.
    fn ack_tolerance(&self) -> Option<(Duration, &'static str)> {
        Some((
            Duration::from_secs(24 * 3600),
            "Kinesis's default 24h retention",
        ))
    }

    async fn build(&self, _cx: &BuildContext) -> Result<Box<dyn Source>, BoxError> {
        self.validate()?;
        Decoder::new(self.decode.clone())?;
        let (kinesis, dynamodb) = clients(self).await?;
        Ok(Box::new(KinesisSource {
            kinesis,
            leases: LeaseTable::new(dynamodb, &self.lease_table),
            worker: self.worker(),
            config: self.clone(),
        }))
    }
}

/// The Kinesis client and the lease table's DynamoDB client of `config` (standard credential
/// chain, `region`, `endpoint_url`, `lease_endpoint_url`, the sqs source's timeouts).
pub async fn clients(
    config: &KinesisConfig,
) -> Result<(aws_sdk_kinesis::Client, aws_sdk_dynamodb::Client), String> {
    let sdk = crate::sqs::sdk_config(config.region.as_deref()).await?;
    let set = |u: &Option<String>| u.clone().filter(|u| !u.is_empty());
    let mut kinesis = aws_sdk_kinesis::config::Builder::from(&sdk);
    if let Some(url) = set(&config.endpoint_url) {
        kinesis = kinesis.endpoint_url(url);
    }
    let mut dynamo = aws_sdk_dynamodb::config::Builder::from(&sdk);
    if let Some(url) = set(&config.lease_endpoint_url).or(set(&config.endpoint_url)) {
        dynamo = dynamo.endpoint_url(url);
    }
    Ok((
        aws_sdk_kinesis::Client::from_conf(kinesis.build()),
        aws_sdk_dynamodb::Client::from_conf(dynamo.build()),
    ))
}

struct KinesisSource {
    kinesis: aws_sdk_kinesis::Client,
    leases: LeaseTable,
    worker: String,
    config: KinesisConfig,
}

/// What the shard readers share.
struct Shared {
    kinesis: aws_sdk_kinesis::Client,
    leases: LeaseTable,
    worker: String,
    config: KinesisConfig,
    source: Name,
    metrics: Arc<ComponentMetrics>,
    checkpoints: Arc<AtomicI64>,
    checkpoint_failures: Arc<AtomicI64>,
    throttled: Arc<AtomicI64>,
    leases_lost: Arc<AtomicI64>,
    rereads: Arc<AtomicI64>,
}

/// A shard as `ListShards` describes it.
#[derive(Debug, Clone)]
struct ShardInfo {
    id: String,
    parents: Vec<String>,
    /// Set once the shard is closed (split or merged).
    ending: Option<String>,
}

/// The ending sequence number of a held shard, updated from each `ListShards` (a shard
/// closes while it is read).
type Ending = tokio::sync::watch::Receiver<Option<String>>;

/// A lease this instance holds and reads.
struct Held {
    counter: i64,
    renewed: Instant,
    stop: CancellationToken,
    reader: Reader,
    ending: tokio::sync::watch::Sender<Option<String>>,
    /// Another instance owns it now: not renewed while its reader stops.
    lost: bool,
}

/// A shard reader task, aborted when dropped: if the source's task is dropped (the
/// topology's shutdown deadline), its readers go with it instead of reading on unleased.
struct Reader(JoinHandle<ShardEnd>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why a shard reader returned.
#[derive(Debug, PartialEq, Eq)]
enum ShardEnd {
    /// Read to its end and checkpointed `SHARD_END`.
    Finished,
    /// Stopped (shutdown or lost lease).
    Stopped,
}

#[async_trait]
impl Source for KinesisSource {
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
            kinesis: self.kinesis,
            leases: self.leases,
            worker: self.worker,
            config: self.config,
            source: intern(&name),
            checkpoints: metrics.counter("checkpoints"),
            checkpoint_failures: metrics.counter("checkpoint_failures"),
            throttled: metrics.counter("throttled"),
            leases_lost: metrics.counter("leases_lost"),
            rereads: metrics.counter("rereads"),
            metrics,
        });
        tracing::info!(
            source = %name,
            stream = %shared.config.stream_name,
            worker = %shared.worker,
            "kinesis source starting"
        );
        let mut backoff = Duration::from_millis(500);
        loop {
            match shared.leases.ensure().await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(source = %name, error = %e, "kinesis lease table; retrying")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        coordinate(shared, out, shutdown).await;
        Ok(())
    }
}

/// Lists the stream's shards (all pages).
async fn list_shards(shared: &Shared) -> Result<Vec<ShardInfo>, String> {
    let mut shards = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let call = shared.kinesis.list_shards();
        let call = match &token {
            Some(t) => call.next_token(t),
            None => call.stream_name(&shared.config.stream_name),
        };
        let page = call.send().await.map_err(|e| {
            format!(
                "ListShards of {:?}: {}",
                shared.config.stream_name,
                DisplayErrorContext(&e)
            )
        })?;
        for s in page.shards() {
            shards.push(ShardInfo {
                id: s.shard_id.clone(),
                parents: s
                    .parent_shard_id
                    .iter()
                    .chain(s.adjacent_parent_shard_id.iter())
                    .cloned()
                    .collect(),
                ending: s
                    .sequence_number_range
                    .as_ref()
                    .and_then(|r| r.ending_sequence_number.clone()),
            });
        }
        match page.next_token {
            Some(t) if !t.is_empty() => token = Some(t),
            _ => return Ok(shards),
        }
    }
}

/// The lease loop: lists shards, creates, renews and takes leases, starts and stops shard
/// readers. On shutdown it stops the readers and keeps renewing their leases until they have
/// drained, checkpointed and released them.
async fn coordinate(shared: Arc<Shared>, out: Outputs, shutdown: CancellationToken) {
    let name = shared.source.clone();
    let timeout = shared.config.lease_timeout.0;
    let mut out = Some(out);
    let mut held: HashMap<String, Held> = HashMap::new();
    let mut shards: HashMap<String, ShardInfo> = HashMap::new();
    let mut observed = Observed::default();
    let leases_held = shared.metrics.gauge("leases_held");
    let leases_taken = shared.metrics.counter("leases_taken");
    let leases_lost = shared.leases_lost.clone();
    let mut tick = tokio::time::interval(timeout / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = shutdown.is_cancelled();
        if stopping {
            if out.take().is_some() {
                for h in held.values() {
                    h.stop.cancel();
                }
            }
            if held.is_empty() {
                break;
            }
        }
        // While stopping, readers are reaped as soon as they end (renewals stay on the tick).
        let renew_now = tokio::select! {
            _ = tick.tick() => true,
            _ = shutdown.cancelled(), if !stopping => continue,
            _ = tokio::time::sleep(Duration::from_millis(100)), if stopping => false,
        };
        // Readers that ended: a finished shard lets its children start.
        let ended: Vec<String> = held
            .iter()
            .filter(|(_, h)| h.reader.0.is_finished())
            .map(|(k, _)| k.clone())
            .collect();
        for k in ended {
            if let Some(mut h) = held.remove(&k) {
                let end = (&mut h.reader.0).await;
                tracing::debug!(source = %name, shard = %k, ?end, "kinesis shard reader ended");
                shared
                    .metrics
                    .remove_labeled_gauge("millis_behind_latest", &[("shard", &k)]);
            }
        }
        if !renew_now {
            continue;
        }
        // Renew what is held (not the leases already lost, whose readers are stopping).
        for (k, h) in held.iter_mut().filter(|(_, h)| !h.lost) {
            match shared.leases.renew(k, &shared.worker, h.counter).await {
                Ok(Written::Done(c)) => {
                    h.counter = c;
                    h.renewed = Instant::now();
                }
                Ok(Written::Lost) => {
                    tracing::info!(source = %name, shard = %k, "kinesis lease taken by another instance; stopping the shard");
                    leases_lost.fetch_add(1, Ordering::Relaxed);
                    h.lost = true;
                    h.stop.cancel();
                }
                Err(e) => {
                    tracing::warn!(source = %name, error = %e, "kinesis lease renewal failed");
                    if h.renewed.elapsed() >= timeout {
                        tracing::warn!(source = %name, shard = %k, "kinesis lease not renewed for lease_timeout; stopping the shard");
                        leases_lost.fetch_add(1, Ordering::Relaxed);
                        h.lost = true;
                        h.stop.cancel();
                    }
                }
            }
        }
        leases_held.store(
            held.values().filter(|h| !h.lost).count() as i64,
            Ordering::Relaxed,
        );
        if stopping {
            continue;
        }
        match list_shards(&shared).await {
            Ok(list) => shards = list.into_iter().map(|s| (s.id.clone(), s)).collect(),
            Err(e) => tracing::warn!(source = %name, error = %e, "kinesis ListShards failed"),
        }
        for (k, h) in &held {
            if let Some(end) = shards.get(k).and_then(|s| s.ending.clone()) {
                h.ending.send_if_modified(|e| {
                    let changed = e.as_ref() != Some(&end);
                    *e = Some(end);
                    changed
                });
            }
        }
        let mut leases = match shared.leases.scan().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(source = %name, error = %e, "kinesis lease table scan failed");
                continue;
            }
        };
        let created = create_leases(&shared, &shards, &leases).await;
        if created {
            match shared.leases.scan().await {
                Ok(l) => leases = l,
                Err(e) => {
                    tracing::warn!(source = %name, error = %e, "kinesis lease table scan failed");
                    continue;
                }
            }
        }
        let now = Instant::now();
        observed.update(&leases, now);
        let listed: HashSet<&str> = shards.keys().map(String::as_str).collect();
        let running: HashSet<String> = held.keys().cloned().collect();
        let plan = lease::plan(
            &leases,
            &listed,
            &observed,
            &running,
            &shared.worker,
            now,
            timeout,
        );
        for l in plan {
            let Some(out) = &out else { break };
            match shared.leases.take(&l, &shared.worker).await {
                Ok(Written::Done(lease)) => {
                    tracing::info!(
                        source = %name,
                        shard = %lease.key,
                        from = ?l.owner,
                        checkpoint = %lease.checkpoint,
                        "kinesis lease taken"
                    );
                    leases_taken.fetch_add(1, Ordering::Relaxed);
                    let info = shards.get(&lease.key).cloned().unwrap_or(ShardInfo {
                        id: lease.key.clone(),
                        parents: lease.parents.clone(),
                        ending: None,
                    });
                    let stop = CancellationToken::new();
                    let (ending, ending_rx) = tokio::sync::watch::channel(info.ending.clone());
                    let reader = Reader(tokio::spawn(read_shard(
                        shared.clone(),
                        info.id,
                        ending_rx,
                        lease.checkpoint.clone(),
                        out.clone(),
                        stop.clone(),
                    )));
                    held.insert(
                        lease.key.clone(),
                        Held {
                            counter: lease.counter,
                            renewed: Instant::now(),
                            stop,
                            reader,
                            ending,
                            lost: false,
                        },
                    );
                }
                Ok(Written::Lost) => {
                    tracing::debug!(source = %name, shard = %l.key, "kinesis lease taken by another instance first")
                }
                Err(e) => tracing::warn!(source = %name, error = %e, "kinesis lease take failed"),
            }
        }
        leases_held.store(
            held.values().filter(|h| !h.lost).count() as i64,
            Ordering::Relaxed,
        );
    }
    leases_held.store(0, Ordering::Relaxed);
}

/// Adds leases for listed shards that have none; returns whether any was added. On the very
/// first run (an empty table) shards start at `starting_position` (with "latest", closed
/// shards are skipped: `SHARD_END`); shards that appear later are children of a resharding
/// and start at their beginning.
async fn create_leases(
    shared: &Shared,
    shards: &HashMap<String, ShardInfo>,
    leases: &[Lease],
) -> bool {
    let have: HashSet<&str> = leases.iter().map(|l| l.key.as_str()).collect();
    let first_run = leases.is_empty();
    let mut created = false;
    let mut missing: Vec<&ShardInfo> = shards
        .values()
        .filter(|s| !have.contains(s.id.as_str()))
        .collect();
    missing.sort_by(|a, b| a.id.cmp(&b.id));
    for s in missing {
        let checkpoint = match (first_run, shared.config.starting_position) {
            (true, StartingPosition::Latest) if s.ending.is_some() => SHARD_END,
            (true, StartingPosition::Latest) => LATEST,
            _ => TRIM_HORIZON,
        };
        match shared.leases.create(&s.id, checkpoint, &s.parents).await {
            Ok(_) => created = true,
            Err(e) => {
                tracing::warn!(source = %shared.source, error = %e, "kinesis lease creation failed")
            }
        }
    }
    created
}

/// Where to (re)start reading a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Position {
    TrimHorizon,
    Latest,
    At(String),
    After(String),
}

impl Position {
    fn from_checkpoint(c: &str) -> Position {
        match c {
            TRIM_HORIZON => Position::TrimHorizon,
            LATEST => Position::Latest,
            seq => Position::After(seq.to_string()),
        }
    }
}

/// Compares two sequence numbers (decimal strings of up to 56 digits, too long for a u128);
/// `None` if one is not a number.
fn seq_cmp(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    let digits = |s: &str| {
        let t = s.trim_start_matches('0');
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit())).then_some(t.to_string())
    };
    let (a, b) = (digits(a)?, digits(b)?);
    Some(a.len().cmp(&b.len()).then_with(|| a.cmp(&b)))
}

/// Whether an empty answer on a closed shard means its end (the fallback for servers that
/// keep returning an iterator there; real Kinesis returns none).
fn closed_and_done(ending: Option<&str>, last_read: Option<&str>, behind: Option<i64>) -> bool {
    let Some(ending) = ending else { return false };
    behind == Some(0) || last_read.is_some_and(|l| seq_cmp(l, ending).is_some_and(|o| o.is_ge()))
}

/// One batch of a shard waiting for its delivery status.
struct Pending {
    /// Sequence number of its last record.
    last: String,
    status: StatusReceiver,
    resolved: Option<BatchStatus>,
    /// Each Kinesis record's sequence number (`max_redeliveries` counts failures per record)
    /// and, while records that failed are watched, its own status, so that only the records
    /// that fail again are counted.
    own: Vec<(String, Option<StatusReceiver>)>,
}

impl Pending {
    /// Counts the failures of this batch's records (after a failure: only the records that
    /// failed themselves; a delivered batch forgets them).
    fn settle(&mut self, attempts: &mut Attempts<String>, status: BatchStatus) {
        let own = std::mem::take(&mut self.own);
        attempts.settle_batch(
            own.into_iter()
                .map(|(seq, s)| (seq, s.and_then(|mut s| s.try_status()))),
            status,
        );
    }
}

/// Reads one leased shard until its end, `stop`, or a lost lease.
async fn read_shard(
    shared: Arc<Shared>,
    shard: String,
    ending: Ending,
    checkpoint: String,
    out: Outputs,
    stop: CancellationToken,
) -> ShardEnd {
    if checkpoint == SHARD_END {
        return ShardEnd::Finished;
    }
    let name = shared.source.clone();
    let config = &shared.config;
    let mut out = Some(out);
    let mut decoder = match Decoder::new(config.decode.clone()) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(source = %name, error = %e, "kinesis decoder");
            return ShardEnd::Stopped;
        }
    };
    let envelope = Envelope::from_paths(config.body_path.as_deref(), config.topic_path.as_deref())
        .ok()
        .flatten();
    let behind = shared
        .metrics
        .labeled_gauge("millis_behind_latest", &[("shard", &shard)]);
    // `base`: where to read again after an errored batch (after the last delivered record).
    let mut base = Position::from_checkpoint(&checkpoint);
    let mut delivered: Option<String> = None;
    let mut checkpointed: Option<String> = None;
    let mut last_read: Option<String> = match &base {
        Position::After(s) => Some(s.clone()),
        _ => None,
    };
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut attempts: Attempts<String> =
        Attempts::new(config.max_redeliveries, MAX_WATCHED_RECORDS);
    let poisoned = shared.metrics.counter("poisoned");
    let mut iterator: Option<String> = None;
    let mut at_end = false;
    let mut throttle = THROTTLE_BACKOFF;
    let mut reread = REREAD_BACKOFF;
    let mut next_call = Instant::now();
    let mut last_checkpoint = Instant::now();
    loop {
        // Settle the delivered prefix.
        let mut errored = false;
        while let Some(front) = pending.front_mut() {
            let status = front.resolved.or_else(|| front.status.try_status());
            match status {
                None => break,
                Some(s) if s.is_ackable() => {
                    front.settle(&mut attempts, s);
                    delivered = pending.pop_front().map(|p| p.last);
                    reread = REREAD_BACKOFF;
                }
                Some(s) => {
                    front.settle(&mut attempts, s);
                    errored = true;
                    break;
                }
            }
        }
        if let Some(d) = &delivered {
            base = Position::After(d.clone());
        }
        if errored {
            tracing::warn!(
                source = %name,
                shard = %shard,
                from = ?base,
                "a kinesis batch was not delivered; reading the shard again from its last delivered record"
            );
            shared.rereads.fetch_add(1, Ordering::Relaxed);
            pending.clear();
            last_read = match &base {
                Position::After(s) => Some(s.clone()),
                _ => None,
            };
            iterator = None;
            at_end = false;
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(reread) => {}
            }
            reread = (reread * 2).min(MAX_REREAD_BACKOFF);
            continue;
        }
        let finished = at_end && pending.is_empty();
        if delivered != checkpointed
            && (finished || last_checkpoint.elapsed() >= config.checkpoint_interval.0)
        {
            if let Some(d) = delivered.clone() {
                if !write_checkpoint(&shared, &shard, &d, stop.is_cancelled()).await {
                    return ShardEnd::Stopped;
                }
                checkpointed = Some(d);
            }
            last_checkpoint = Instant::now();
        }
        if finished {
            if !write_checkpoint(&shared, &shard, SHARD_END, stop.is_cancelled()).await {
                return ShardEnd::Stopped;
            }
            tracing::info!(source = %name, shard = %shard, "kinesis shard read to its end");
            return ShardEnd::Finished;
        }
        if stop.is_cancelled() {
            break;
        }
        if at_end || pending.len() >= MAX_PENDING_BATCHES {
            // Wait for the oldest batch (or the next checkpoint round, or stop).
            if let Some(front) = pending.front_mut().filter(|f| f.resolved.is_none()) {
                let got = tokio::select! {
                    _ = stop.cancelled() => None,
                    s = &mut front.status => Some(s),
                    _ = tokio::time::sleep(config.checkpoint_interval.0) => None,
                };
                if got.is_some() {
                    front.resolved = got;
                }
            } else if at_end && pending.is_empty() {
                continue;
            } else {
                // The front is resolved; the loop settles it.
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
            continue;
        }
        // Get an iterator if there is none.
        let it = match iterator.take() {
            Some(it) => it,
            None => {
                let cursor = match &last_read {
                    Some(s) => Position::After(s.clone()),
                    None => base.clone(),
                };
                match shard_iterator(&shared, &shard, &cursor).await {
                    Ok(it) => it,
                    Err(e) => {
                        tracing::warn!(source = %name, shard = %shard, error = %e, "kinesis GetShardIterator failed; retrying");
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = tokio::time::sleep(throttle) => {}
                        }
                        throttle = (throttle * 2).min(MAX_THROTTLE_BACKOFF);
                        continue;
                    }
                }
            }
        };
        // At most 5 calls per second per shard.
        tokio::select! {
            _ = stop.cancelled() => continue,
            _ = tokio::time::sleep_until(next_call.into()) => {}
        }
        next_call = Instant::now() + MIN_CALL_GAP;
        let call = shared
            .kinesis
            .get_records()
            .shard_iterator(&it)
            .limit(config.max_records)
            .send();
        let answer = tokio::select! {
            _ = stop.cancelled() => { iterator = Some(it); continue }
            a = call => a,
        };
        let answer = match answer {
            Ok(a) => {
                throttle = THROTTLE_BACKOFF;
                a
            }
            Err(e) => {
                let service = e.as_service_error();
                let wait = if service.is_some_and(|s| {
                    s.is_provisioned_throughput_exceeded_exception()
                        || s.is_kms_throttling_exception()
                }) {
                    shared.throttled.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(source = %name, shard = %shard, "kinesis throughput exceeded; backing off");
                    iterator = Some(it);
                    throttle
                } else if service.is_some_and(|s| s.is_expired_iterator_exception()) {
                    Duration::ZERO
                } else {
                    tracing::warn!(source = %name, shard = %shard, error = %DisplayErrorContext(&e), "kinesis GetRecords failed; retrying");
                    throttle
                };
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
                if !wait.is_zero() {
                    throttle = (throttle * 2).min(MAX_THROTTLE_BACKOFF);
                }
                continue;
            }
        };
        if let Some(ms) = answer.millis_behind_latest {
            behind.store(ms, Ordering::Relaxed);
        }
        let records = answer.records;
        let full = records.len() >= config.max_records as usize;
        let caught_up = answer.millis_behind_latest == Some(0) && !full;
        match answer.next_shard_iterator {
            Some(next) => {
                if records.is_empty()
                    && closed_and_done(
                        ending.borrow().as_deref(),
                        last_read.as_deref(),
                        answer.millis_behind_latest,
                    )
                {
                    at_end = true;
                } else {
                    iterator = Some(next);
                }
            }
            None => at_end = true,
        }
        if caught_up {
            next_call = Instant::now() + config.poll_interval.0;
        }
        let Some(last) = records.last().map(|r| r.sequence_number.clone()) else {
            continue;
        };
        if base == Position::Latest {
            // Read again from this first record (not "latest") if its batch fails.
            if let Some(first) = records.first() {
                base = Position::At(first.sequence_number.clone());
            }
        }
        last_read = Some(last.clone());
        let received = now_ns();
        let mut decoded = Decoded::with_capacity(records.len());
        let mut bytes = 0;
        let watching = attempts.is_watching();
        let mut own = Vec::new();
        for r in records {
            let data = Bytes::from(r.data.into_inner());
            bytes += data.len();
            let meta = Meta {
                source: Some(name.clone()),
                origin: Origin::None,
                ..Meta::default()
            };
            let (first, first_dead) = (decoded.records.len(), decoded.dead.len());
            if attempts.is_exhausted(&r.sequence_number) {
                let why = redelivery::reason(
                    attempts.failures(&r.sequence_number),
                    config.max_redeliveries,
                );
                tracing::warn!(source = %name, shard = %shard, sequence = %r.sequence_number, "record dead-lettered: {why}");
                poisoned.fetch_add(1, Ordering::Relaxed);
                decoded.dead.push(Decoder::dead_letter(
                    data,
                    received,
                    meta,
                    &DecodeError(why),
                ));
            } else {
                match &envelope {
                    // Too big a record is left to the decoder, which dead-letters it unparsed.
                    Some(env) if data.len() as u64 <= config.decode.max_payload.0 => {
                        match env.open(&data) {
                            Ok((payload, topic)) => decoded.push(
                                &mut decoder,
                                payload,
                                topic.as_deref(),
                                received,
                                meta,
                            ),
                            Err(e) => decoded
                                .dead
                                .push(Decoder::dead_letter(data, received, meta, &e)),
                        }
                    }
                    _ => decoded.push(&mut decoder, data, None, received, meta),
                }
            }
            if watching {
                let (finalizer, status) = ack::batch();
                for rec in decoded.records[first..]
                    .iter_mut()
                    .chain(&mut decoded.dead[first_dead..])
                {
                    rec.finalizers.push(finalizer.clone());
                }
                finalizer.finish(BatchStatus::Delivered);
                own.push((r.sequence_number, Some(status)));
            } else if attempts.enabled() {
                own.push((r.sequence_number, None));
            }
        }
        shared.metrics.add_bytes(bytes);
        let (finalizer, status) = ack::batch();
        decoded.attach(&finalizer);
        finalizer.finish(BatchStatus::Delivered);
        pending.push_back(Pending {
            last,
            status,
            resolved: None,
            own,
        });
        let Some(o) = &out else { break };
        tokio::select! {
            // Backpressure: a full pipeline holds this shard's reads.
            sent = decoded.send(o) => if sent.is_err() { break },
            _ = stop.cancelled() => {}
        }
    }
    // Stopped: let downstream drain, wait for what is in flight, checkpoint it, free the lease.
    drop(out.take());
    for p in pending.iter_mut() {
        if p.resolved.is_none() {
            p.resolved = Some((&mut p.status).await);
        }
    }
    let mut last_good = delivered;
    for p in pending {
        match p.resolved {
            Some(s) if s.is_ackable() => last_good = Some(p.last),
            _ => break,
        }
    }
    if last_good != checkpointed {
        if let Some(d) = last_good {
            if !write_checkpoint(&shared, &shard, &d, stop.is_cancelled()).await {
                return ShardEnd::Stopped;
            }
        }
    }
    match shared.leases.release(&shard, &shared.worker).await {
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(source = %name, shard = %shard, error = %e, "kinesis lease release failed (another instance takes it after lease_timeout)")
        }
    }
    ShardEnd::Stopped
}

/// Writes a shard's checkpoint; `false` when the lease is no longer this instance's (stop
/// reading the shard). Transient errors are retried a few times, then the checkpoint is left
/// for the next round (a later checkpoint covers it).
async fn write_checkpoint(shared: &Shared, shard: &str, checkpoint: &str, stopping: bool) -> bool {
    let mut backoff = Duration::from_millis(200);
    for _ in 0..5 {
        match shared
            .leases
            .checkpoint(shard, &shared.worker, checkpoint)
            .await
        {
            Ok(Written::Done(())) => {
                shared.checkpoints.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Ok(Written::Lost) => {
                // A reader told to stop already counts as lost, by the coordinator.
                if !stopping {
                    shared.leases_lost.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(source = %shared.source, shard, "kinesis lease owned by another instance; stopping the shard");
                }
                return false;
            }
            Err(e) => {
                shared.checkpoint_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(source = %shared.source, shard, error = %e, "kinesis checkpoint failed");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
    }
    true
}

/// A shard iterator at `position`.
async fn shard_iterator(
    shared: &Shared,
    shard: &str,
    position: &Position,
) -> Result<String, String> {
    let call = shared
        .kinesis
        .get_shard_iterator()
        .stream_name(&shared.config.stream_name)
        .shard_id(shard);
    let call = match position {
        Position::TrimHorizon => call.shard_iterator_type(ShardIteratorType::TrimHorizon),
        Position::Latest => call.shard_iterator_type(ShardIteratorType::Latest),
        Position::At(s) => call
            .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
            .starting_sequence_number(s),
        Position::After(s) => call
            .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
            .starting_sequence_number(s),
    };
    call.send()
        .await
        .map_err(|e| format!("{}", DisplayErrorContext(&e)))?
        .shard_iterator
        .ok_or_else(|| "GetShardIterator answered without an iterator".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates_options() {
        let c: KinesisConfig = toml::from_str(
            "stream_name = \"s\"\nlease_table = \"t\"\nstarting_position = \"latest\"\nmax_records = 500",
        )
        .expect("valid config");
        assert_eq!(c.starting_position, StartingPosition::Latest);
        assert_eq!(c.max_records, 500);
        assert!(c.validate().is_ok());
        assert!(toml::from_str::<KinesisConfig>("stream_name = \"s\"\nbogus = 1").is_err());
        assert!(
            toml::from_str::<KinesisConfig>("stream_name = \"s\"").is_err(),
            "lease_table is required"
        );
        let mut bad = c.clone();
        bad.max_records = 10_001;
        assert!(bad.validate().is_err());
        let mut bad = c.clone();
        bad.poll_interval = HumanDuration(Duration::from_millis(100));
        assert!(bad.validate().is_err());
        let mut bad = c.clone();
        bad.body_path = Some("a..b".into());
        assert!(bad
            .validate()
            .expect_err("bad path")
            .contains("dotted keys"));
        let mut bad = c;
        bad.worker_id = Some(String::new());
        assert!(bad.validate().is_err());
    }

    #[test]
    fn sequence_numbers_compare_as_numbers() {
        use std::cmp::Ordering::*;
        assert_eq!(seq_cmp("9", "10"), Some(Less));
        assert_eq!(
            seq_cmp(
                "49590338271490256608559692538361571095921575989136588898",
                "49590338271490256608559692538361571095921575989136588897"
            ),
            Some(Greater)
        );
        assert_eq!(seq_cmp("x", "1"), None);
        assert_eq!(seq_cmp("007", "7"), Some(Equal));
    }

    #[test]
    fn closed_shard_end_detection() {
        assert!(!closed_and_done(None, Some("5"), Some(0)), "open shard");
        assert!(closed_and_done(Some("5"), Some("5"), Some(3)));
        assert!(closed_and_done(Some("5"), None, Some(0)));
        assert!(!closed_and_done(Some("5"), Some("4"), Some(10)));
    }

    #[test]
    fn checkpoints_map_to_positions() {
        assert_eq!(
            Position::from_checkpoint(TRIM_HORIZON),
            Position::TrimHorizon
        );
        assert_eq!(Position::from_checkpoint(LATEST), Position::Latest);
        assert_eq!(
            Position::from_checkpoint("42"),
            Position::After("42".into())
        );
    }
}
