//! `mqtt` source: subscribes to topic filters on an MQTT broker (v3.1.1 or v5, rumqttc) and
//! decodes each message with the shared decoders.
//!
//! ```toml
//! [sources.telemetry]
//! type = "mqtt"
//! url = "mqtt://127.0.0.1:1883"
//! topics = ["devices/+/data"]
//! qos = 1
//! decode = { codec = "json", topic_pattern = "devices/{device_id}/data" }
//! ```
//!
//! **No loss at QoS 1/2.** Acknowledgements are manual: the PUBACK (QoS 1) or PUBREC (QoS 2)
//! of a message is sent only once its record is delivered (or dead-lettered) by every sink.
//! With a persistent session (`clean_session = false`, the default) and a stable client id
//! (derived from the pipeline id and component name), a crash before delivery means the broker
//! sends the message again. Delivery is therefore at-least-once: expect duplicates after a
//! crash or reconnect.
//!
//! **Ack ordering.** MQTT requires a client to acknowledge QoS 1/2 messages in the order the
//! broker sent them. Messages are grouped in batches as they arrive; one acknowledgement task
//! waits for the batches' statuses strictly in arrival order (a later batch that finishes first
//! waits for the earlier ones), then hands their acks, in order, to the poller. A batch that
//! fails downstream (status `Errored`) is never acknowledged, and neither is anything after it
//! on the same connection: the source disconnects and reconnects so that the broker redelivers.
//! Acks that belong to a previous connection are dropped, never sent on a new one (after a
//! reconnect the broker redelivers the message anyway, and a stale packet id could name another
//! message); they are counted in `acks_dropped`.
//!
//! **Acks are never dropped for lack of room.** The poller, the only task that touches the
//! connection, sends the acks before it reads anything more. With MQTT 3.1.1 it writes them
//! straight to the socket, so acks keep pace with reads whatever the backlog. With MQTT 5
//! (rumqttc does not expose that connection) they go through the client's request queue, which
//! rumqttc drains one request per poll while it reads up to ten packets per poll; an ack that
//! does not fit stays queued in order and is retried (`ack_retries`), and while such acks wait
//! the poller keeps polling so that they go out. A broker that holds us to our Receive Maximum
//! sends nothing more meanwhile; mosquitto 2.0.11 does not do so for rumqttc's v5 connections
//! (measured: a 10,000-message window still received 60+ unacknowledged messages per 10 acks),
//! so a deep v5 backlog drains at the pace of the acks (~1–2k msg/s here, against ~7k msg/s
//! with v3.1.1). Prefer `protocol = "v3.1.1"` for sessions that build up large backlogs.
//!
//! **Flow control.** At most `max_inflight` QoS 1/2 messages are unacknowledged at a time (a
//! window slot is freed only once the message's ack is written, or handed to the v5 client);
//! a v5 broker is told so (Receive Maximum). A v3.1.1 broker uses its own limit (mosquitto:
//! `max_inflight_messages`, default 20, which caps throughput at 20 / delivery latency: raise it
//! on the broker). QoS 0 messages count against the same window until they are sent downstream.
//! When the window is full (downstream is slow) the poller stops reading the socket, so memory
//! stays flat and TCP pushes back on the broker (with v5, while acks wait for the client's queue,
//! it reads on, but never holds more than `max_inflight` messages waiting for the source task).
//! (Only if downstream stalls with a full window for longer than 1.5 × `keep_alive` does the
//! broker drop the connection; the source reconnects and the broker redelivers what was not
//! acknowledged.) Also set mosquitto's `max_queued_messages` high (or 0): by default
//! it drops messages beyond 1000 queued for a slow or offline client.
//!
//! Sizing `max_inflight`: a larger window (default 10000) keeps more messages in flight; a small
//! one (e.g. 2000) uses less memory and drains QoS 0 faster, at the price of more waiting for
//! acks. After a crash, at most the window comes back as duplicates.
//!
//! **Poison messages.** A QoS 1/2 message whose delivery fails every time would come back
//! forever and hold back every message behind it (acks keep order). The source counts failed
//! deliveries per (topic, payload) in a bounded in-memory map (after a failed batch it follows
//! each message on its own, so only the ones that fail again are counted); once a message failed
//! more than `max_redeliveries` times (default 10, 0 = unlimited) it goes to `dead_letter` with
//! the reason and the count, and is acknowledged once that resolves (metric `poisoned`).
//!
//! **Keep-alive under backpressure.** While the window is full the poller does not read, so
//! the broker's PINGRESP waits behind unread messages: incoming messages count as proof of
//! life, and (v3.1.1) the poller writes a PINGREQ every `keep_alive / 2` while it waits, so a
//! slow pipeline never costs the connection (nor the QoS 0 messages queued for it). With v5 the
//! broker is told the window (Receive Maximum), so a full window of held QoS 1/2 messages means
//! nothing more arrives and the poller keeps polling, which sends the client's own PINGREQs
//! (mosquitto also queues QoS 0 messages behind the held ones). Only a v5 broker that sends
//! past Receive Maximum can make it stop reading, and then the broker's keep-alive applies
//! (rumqttc does not expose the v5 connection for a ping of our own).
//!
//! **Metrics**: `connected` (0/1), `subscribed` (0/1, after the SUBACK), `reconnects`,
//! `messages`, `inflight` (QoS 1/2 messages not yet acknowledged), `acks_dropped` (acks of a
//! lost connection: those messages come again), `ack_retries` (v5 acks that waited for room in
//! the client's queue), `poisoned` (messages dead-lettered by `max_redeliveries`), and the
//! standard `bytes`.
//!
//! **Structure.** A poller task polls rumqttc's event loop, writes acks, and hands whole reads
//! of messages to the source task, which decodes and sends them; an acknowledgement task
//! resolves statuses in order and hands the acks to the poller.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::ack::{self, BatchStatus, StatusReceiver};
use sluice_core::decode::{DecodeConfig, DecodeError, Decoded, Decoder};
use sluice_core::metrics::ComponentMetrics;
use sluice_core::record::{intern, Meta, Origin};
use sluice_core::registry::{BuildContext, SourceConfig};
use sluice_core::source::{Source, SourceContext};
use sluice_core::topic::TopicPattern;
use sluice_core::topology::now_ns;
use sluice_core::BoxError;
use sluice_mqtt::{ClientSettings, ConnectionConfig, Connector, Event, EventLoop, Message};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::redelivery::{self, Attempts};

pub use sluice_mqtt::{Protocol, TlsConfig};

/// Subscribes to MQTT topics; acknowledges QoS 1/2 messages after delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MqttSourceConfig {
    #[serde(flatten)]
    pub connection: ConnectionConfig,
    /// Topic filters to subscribe to (`+` matches one level, `#` the rest). Default: the filter
    /// of `decode.topic_pattern` (its captures become `+`).
    #[serde(default)]
    pub topics: Vec<String>,
    /// Subscription QoS: 0 (at most once), 1 (at least once, default) or 2. With 1 and 2 a
    /// message is acknowledged only after delivery.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Subscribe as `$share/<group>/<filter>` so that several instances split the messages.
    /// Default: none.
    #[serde(default)]
    pub shared_group: Option<String>,
    /// Most messages held at once: QoS 1/2 messages until acknowledged, QoS 0 messages until
    /// sent downstream (bounds memory; sent to v5 brokers as Receive Maximum, at most 65535).
    /// Default 10000.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Most messages per batch sent downstream. Default 1000.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Payload decoding. Default: JSON; `max_payload` (default "1MiB") dead-letters bigger
    /// payloads.
    #[serde(default)]
    pub decode: DecodeConfig,
    /// A QoS 1/2 message whose delivery failed (a sink gave up with a transient error) more
    /// than this many times is sent to `dead_letter`, with the reason and the count, and then
    /// acknowledged, instead of being redelivered forever and holding back every message
    /// behind it. Failures are counted in memory per (topic, payload) (at most 100,000
    /// messages; a restart starts the count again). 0 = unlimited. Default 10.
    #[serde(default = "default_max_redeliveries")]
    pub max_redeliveries: u32,
}

fn default_max_redeliveries() -> u32 {
    redelivery::DEFAULT_MAX_REDELIVERIES
}

fn default_qos() -> u8 {
    1
}
fn default_max_inflight() -> u16 {
    // Measured (benches/mqtt-load.sh, crash test): 10000 keeps acks flowing under a deep
    // backlog (7 duplicates after kill -9 vs ~3300 with 2000); 2000 drains QoS 0 faster with
    // a smaller peak RSS (33 MiB vs 75 MiB). See the module docs.
    10_000
}
fn default_batch_size() -> usize {
    1000
}

impl MqttSourceConfig {
    /// A source of `topics` on broker `url`, other options at their defaults.
    pub fn new(url: &str, topics: &[&str]) -> Self {
        MqttSourceConfig {
            connection: ConnectionConfig::new(url),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            qos: default_qos(),
            shared_group: None,
            max_inflight: default_max_inflight(),
            batch_size: default_batch_size(),
            decode: DecodeConfig::default(),
            max_redeliveries: default_max_redeliveries(),
        }
    }

    /// The filters actually subscribed (with the shared-subscription prefix).
    fn filters(&self) -> Result<Vec<String>, String> {
        let mut topics = self.topics.clone();
        if topics.is_empty() {
            match &self.decode.topic_pattern {
                Some(p) => topics.push(TopicPattern::new(p)?.filter()),
                None => {
                    return Err(
                        "`topics` is empty: list topic filters, e.g. topics = [\"devices/+/data\"]"
                            .into(),
                    )
                }
            }
        }
        for t in &topics {
            validate_filter(t)?;
        }
        match &self.shared_group {
            None => Ok(topics),
            Some(g) => {
                if g.is_empty() || g.contains(['/', '+', '#']) {
                    return Err(format!(
                        "`shared_group` = {g:?}: must be non-empty without `/`, `+` or `#`"
                    ));
                }
                Ok(topics.iter().map(|t| format!("$share/{g}/{t}")).collect())
            }
        }
    }
}

fn validate_filter(f: &str) -> Result<(), String> {
    if f.is_empty() {
        return Err("`topics`: empty topic filter".into());
    }
    let levels: Vec<&str> = f.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        let bad = (l.contains('#') && (*l != "#" || i + 1 != levels.len()))
            || (l.contains('+') && *l != "+");
        if bad {
            return Err(format!(
                "`topics`: invalid filter {f:?} (`+` must be a whole level, `#` the whole last level)"
            ));
        }
    }
    Ok(())
}

#[async_trait]
impl SourceConfig for MqttSourceConfig {
    /// QoS 1 and 2 messages are acknowledged after delivery; QoS 0 has nothing to ack.
    fn acknowledges(&self) -> bool {
        self.qos > 0
    }

    /// `keep_alive`: the plan-time bound on how long a QoS 1/2 message may wait for its ack.
    /// The poller pings while it waits, but a stage that holds acks stalls the source well
    /// before that at any real rate: once `max_inflight` messages (or the broker's own
    /// inflight limit, mosquitto's `max_inflight_messages`, default 20) are unacknowledged,
    /// nothing more is read, and a window that needs newer records to close waits for them.
    fn ack_tolerance(&self) -> Option<(Duration, &'static str)> {
        Some((self.connection.keep_alive.0, "keep_alive"))
    }

    async fn build(&self, cx: &BuildContext) -> Result<Box<dyn Source>, BoxError> {
        let connector = Connector::new(&self.connection, &cx.pipeline_id, &cx.name)?;
        let qos = sluice_mqtt::qos(self.qos)?;
        let filters = self.filters()?;
        let decoder = Decoder::new(self.decode.clone())?;
        if self.max_inflight == 0 {
            return Err("`max_inflight` must be at least 1".into());
        }
        if self.batch_size == 0 {
            return Err("`batch_size` must be at least 1".into());
        }
        Ok(Box::new(MqttSource {
            connector,
            clean_session: self.connection.clean_session.unwrap_or(false),
            qos,
            filters,
            decoder,
            max_inflight: self.max_inflight,
            batch_size: self.batch_size,
            max_redeliveries: self.max_redeliveries,
        }))
    }
}

struct MqttSource {
    connector: Connector,
    clean_session: bool,
    qos: rumqttc::QoS,
    filters: Vec<String>,
    decoder: Decoder,
    max_inflight: u16,
    batch_size: usize,
    max_redeliveries: u32,
}

/// Messages of one read, all from the same connection.
struct Incoming {
    generation: u64,
    messages: Vec<Message>,
}

/// A batch waiting for its status before its messages are acknowledged.
struct Pending {
    generation: u64,
    acks: Vec<(u8, u16)>,
    status: StatusReceiver,
    /// Redelivery keys of the QoS 1/2 messages (empty with `max_redeliveries = 0`), with
    /// the message's own status when it is followed one by one (it failed recently).
    keys: Vec<(u64, Option<StatusReceiver>)>,
}

/// The key under which a message's failed deliveries are counted: MQTT has no message id
/// that survives a reconnect (packet ids are reused), so the topic and payload stand for it.
fn message_key(topic: &str, payload: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    topic.hash(&mut h);
    payload.hash(&mut h);
    h.finish()
}

/// What the acknowledgement task hands to the poller.
#[derive(Debug, Clone, Copy)]
enum AckItem {
    /// Acknowledge message `pkid` (PUBACK for QoS 1, PUBREC for QoS 2) on connection
    /// `generation`.
    Ack { generation: u64, qos: u8, pkid: u16 },
    /// A batch failed downstream: reconnect so that the broker redelivers (after the acks
    /// queued before it went out).
    Reconnect { generation: u64 },
}

impl Shared {
    fn push_acks(&self, items: impl IntoIterator<Item = AckItem>) {
        let mut q = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        let before = q.len();
        q.extend(items);
        let added = q.len() - before;
        drop(q);
        if added > 0 {
            self.unsent.fetch_add(added as i64, Ordering::AcqRel);
            self.acks_ready.notify_one();
        }
    }

    fn acks_empty(&self) -> bool {
        self.acks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    fn take_acks(&self) -> std::collections::VecDeque<AckItem> {
        let mut q = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *q)
    }
}

/// State shared by the three tasks.
struct Shared {
    /// Bumped at every lost connection: acks of older generations are never sent.
    generation: AtomicU64,
    /// Messages that may still be received: QoS 1/2 messages hold their permit until they are
    /// acknowledged, QoS 0 messages until they are sent downstream. Bounds memory; when it is
    /// exhausted the poller stops reading. The poller never waits for anything else, so acks
    /// and keep-alives keep flowing while downstream is slow.
    window: Semaphore,
    /// Stop forwarding messages (shutdown): they stay unacknowledged and come back later.
    draining: CancellationToken,
    inflight: Arc<AtomicI64>,
    /// Acknowledgements resolved by the acknowledgement task, in arrival order, waiting for the
    /// poller to write them (it alone touches the connection, so acks never lag behind reads).
    acks: std::sync::Mutex<std::collections::VecDeque<AckItem>>,
    /// Wakes the poller when `acks` got items.
    acks_ready: tokio::sync::Notify,
    /// Messages handed to the source task and not yet taken by it.
    to_source: AtomicI64,
    /// Notified when the source task takes messages.
    taken: tokio::sync::Notify,
    /// Acks resolved but not yet written to the connection (the shutdown waits for 0).
    unsent: AtomicI64,
    /// Acks that could not be handed to the client at once and were retried (metric).
    ack_retries: Arc<AtomicI64>,
    /// Acks of delivered messages that were never written because their connection was lost
    /// (the broker redelivers them: duplicates, not loss) (metric).
    acks_dropped: Arc<AtomicI64>,
    /// Incoming QoS 2 messages whose PUBREC went out and whose PUBCOMP did not yet.
    qos2_open: AtomicI64,
    /// Notified when the broker answers our UNSUBSCRIBE (the shutdown barrier).
    barrier: tokio::sync::Notify,
    /// Failed deliveries per message (`max_redeliveries`): counted by the acknowledgement
    /// task, read by the source task.
    attempts: std::sync::Mutex<Attempts<u64>>,
}

#[async_trait]
impl Source for MqttSource {
    fn can_acknowledge(&self) -> bool {
        self.qos != rumqttc::QoS::AtMostOnce
    }

    async fn run(mut self: Box<Self>, cx: SourceContext) -> Result<(), BoxError> {
        let SourceContext {
            name,
            out,
            shutdown,
            metrics,
        } = cx;
        let (client, eventloop) = self.connector.client(ClientSettings {
            clean_session: self.clean_session,
            manual_acks: true,
            max_inflight: self.max_inflight,
            // v5 acks go through this queue: held messages (a window plus at most one more
            // read beyond it) always fit, with room for subscribes and the disconnect.
            request_capacity: 2 * self.max_inflight as usize + 64,
        });
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            window: Semaphore::new(self.max_inflight as usize),
            draining: CancellationToken::new(),
            inflight: metrics.gauge("inflight"),
            acks: std::sync::Mutex::new(std::collections::VecDeque::new()),
            acks_ready: tokio::sync::Notify::new(),
            unsent: AtomicI64::new(0),
            to_source: AtomicI64::new(0),
            taken: tokio::sync::Notify::new(),
            ack_retries: metrics.counter("ack_retries"),
            acks_dropped: metrics.counter("acks_dropped"),
            qos2_open: AtomicI64::new(0),
            barrier: tokio::sync::Notify::new(),
            attempts: std::sync::Mutex::new(Attempts::new(
                self.max_redeliveries,
                redelivery::DEFAULT_CAPACITY,
            )),
        });
        let poisoned = metrics.counter("poisoned");
        tracing::info!(
            source = %name,
            broker = %self.connector.address(),
            client_id = %self.connector.client_id(),
            topics = ?self.filters,
            "mqtt source starting"
        );

        // Unbounded, but never holds more than `max_inflight` messages (the window).
        let (batch_tx, mut batch_rx) = mpsc::unbounded_channel::<Incoming>();
        let poller = Poller {
            name: name.clone(),
            max_inflight: self.max_inflight as usize,
            client: client.clone(),
            connector: self.connector.clone(),
            filters: self.filters.clone(),
            qos: self.qos,
            batch_size: self.batch_size,
            shared: shared.clone(),
            metrics: metrics.clone(),
            tx: batch_tx,
        };
        let mut poller = TaskGuard(Some(tokio::spawn(poller.run(eventloop))));
        let (ack_tx, ack_rx) = mpsc::unbounded_channel::<Pending>();
        let mut acker = TaskGuard(Some(tokio::spawn(acknowledge(
            name.clone(),
            ack_rx,
            shared.clone(),
        ))));

        let source = intern(&name);
        let mut send_failed = None;
        // A burst of the same connection that did not fit the previous batch.
        let mut carry: Option<Incoming> = None;
        // Consecutive messages usually share a topic: share its allocation.
        let mut last_topic: Arc<str> = Arc::from("");
        loop {
            let mut incoming = match carry.take() {
                Some(i) => i,
                None => tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    b = batch_rx.recv() => match b {
                        Some(b) => b,
                        None => break, // the poller stopped (fatal error): report it below
                    },
                },
            };
            // The poller hands over what one socket read held (rumqttc reads at most 10
            // packets at a time); merge what queued up while we were busy into one batch.
            while incoming.messages.len() < self.batch_size {
                match batch_rx.try_recv() {
                    Ok(next) if next.generation == incoming.generation => {
                        incoming.messages.extend(next.messages)
                    }
                    Ok(next) => {
                        carry = Some(next);
                        break;
                    }
                    Err(_) => break,
                }
            }
            let received = now_ns();
            let mut decoded = Decoded::with_capacity(incoming.messages.len());
            let mut acks = Vec::new();
            let mut keys = Vec::new();
            let count = incoming.messages.len();
            shared.to_source.fetch_sub(count as i64, Ordering::AcqRel);
            shared.taken.notify_one();
            {
                let attempts = shared.attempts.lock().unwrap_or_else(|p| p.into_inner());
                let (counting, watching) = (attempts.enabled(), attempts.is_watching());
                for m in incoming.messages {
                    let key = (m.qos > 0 && counting).then(|| message_key(&m.topic, &m.payload));
                    if m.qos > 0 {
                        acks.push((m.qos, m.pkid));
                    }
                    if *last_topic != *m.topic {
                        last_topic = Arc::from(m.topic.as_str());
                    }
                    let meta = Meta {
                        source: Some(source.clone()),
                        origin: Origin::Mqtt {
                            topic: last_topic.clone(),
                        },
                        error: None,
                    };
                    let Some(key) = key else {
                        decoded.push(&mut self.decoder, m.payload, Some(&m.topic), received, meta);
                        continue;
                    };
                    let failures = if watching { attempts.failures(&key) } else { 0 };
                    if redelivery::exhausted(failures, attempts.max()) {
                        // A poison message: dead-letter it; it is acknowledged once that resolves.
                        let why = redelivery::reason(failures, attempts.max());
                        tracing::warn!(source = %name, topic = %m.topic, failures, "message dead-lettered: {why}");
                        poisoned.fetch_add(1, Ordering::Relaxed);
                        decoded.dead.push(Decoder::dead_letter(
                            m.payload,
                            received,
                            meta,
                            &DecodeError(why),
                        ));
                        keys.push((key, None));
                    } else if watching {
                        // Something failed recently: follow this message on its own, so that only
                        // the messages that fail again are counted (a batch's status is its
                        // worst record's).
                        let (records, dead) = (decoded.records.len(), decoded.dead.len());
                        decoded.push(&mut self.decoder, m.payload, Some(&m.topic), received, meta);
                        let (own, status) = ack::batch();
                        for r in decoded.records[records..]
                            .iter_mut()
                            .chain(&mut decoded.dead[dead..])
                        {
                            r.finalizers.push(own.clone());
                        }
                        own.finish(BatchStatus::Delivered);
                        keys.push((key, Some(status)));
                    } else {
                        decoded.push(&mut self.decoder, m.payload, Some(&m.topic), received, meta);
                        keys.push((key, None));
                    }
                }
            }
            let qos0 = count - acks.len();
            if !acks.is_empty() {
                let (finalizer, status) = ack::batch();
                decoded.attach(&finalizer);
                finalizer.finish(BatchStatus::Delivered);
                // Registered before sending so acks keep arrival order.
                let _ = ack_tx.send(Pending {
                    generation: incoming.generation,
                    acks,
                    status,
                    keys,
                });
            }
            tokio::select! {
                // Shutdown first: downstream closing during a shutdown is not a failure.
                biased;
                _ = shutdown.cancelled() => break,
                res = decoded.send(&out) => if let Err(e) = res {
                    send_failed = Some(e);
                    break;
                },
            }
            shared.window.add_permits(qos0);
        }

        // Shutdown: stop taking messages, let downstream drain, acknowledge what it delivered.
        shared.draining.cancel();
        drop(batch_rx);
        drop(out);
        drop(ack_tx);
        if let Some(Err(e)) = acker.join().await {
            tracing::error!(source = %name, error = %e, "mqtt acknowledgement task failed");
        }
        // The poller writes the last acks; wait for them (bounded: a lost connection drops
        // them, and the broker redelivers those messages).
        for _ in 0..500 {
            if shared.unsent.load(Ordering::Acquire) <= 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Let QoS 2 handshakes finish (PUBREL → PUBCOMP) before saying goodbye: rumqttc 0.25
        // cannot resume one on a new connection (it rejects the broker's PUBREL).
        for _ in 0..200 {
            if shared.qos2_open.load(Ordering::Acquire) <= 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Barrier: an UNSUBSCRIBE round trip (of a filter we never subscribed) proves that the
        // broker processed our acks. Without it a quick restart can take the session over
        // before the broker has read them, and it redelivers acknowledged messages.
        if client
            .try_unsubscribe(&format!(
                "sluice/ack-barrier/{}",
                self.connector.client_id()
            ))
            .is_ok()
        {
            let _ = tokio::time::timeout(Duration::from_secs(2), shared.barrier.notified()).await;
        }
        let _ = client.try_disconnect();
        let polled = match tokio::time::timeout(Duration::from_secs(5), poller.join()).await {
            Ok(Some(Ok(r))) => r,
            Ok(Some(Err(e))) => Err(format!("mqtt poller task failed: {e}")),
            // Could not say goodbye to the broker: the session is kept anyway.
            Ok(None) | Err(_) => Ok(()),
        };
        metrics.gauge("connected").store(0, Ordering::Relaxed);
        metrics.gauge("subscribed").store(0, Ordering::Relaxed);
        tracing::info!(source = %name, "mqtt source stopped");
        polled.map_err(|e| format!("mqtt source `{name}`: {e}"))?;
        if let Some(e) = send_failed {
            return Err(e.into());
        }
        Ok(())
    }
}

/// Aborts its task when dropped: if the source is aborted (shutdown deadline), its poller and
/// acknowledgement tasks go with it instead of keeping the connection open.
struct TaskGuard<T>(Option<tokio::task::JoinHandle<T>>);

impl<T> TaskGuard<T> {
    async fn join(&mut self) -> Option<Result<T, tokio::task::JoinError>> {
        match self.0.as_mut() {
            Some(h) => {
                let r = h.await;
                self.0 = None;
                Some(r)
            }
            None => None,
        }
    }
}

impl<T> Drop for TaskGuard<T> {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

/// Resolves batch statuses in arrival order and hands their acknowledgements to the poller.
async fn acknowledge(name: String, mut rx: mpsc::UnboundedReceiver<Pending>, shared: Arc<Shared>) {
    // Generation in which a batch failed: nothing more is acknowledged on that connection.
    let mut failed_generation = None;
    while let Some(p) = rx.recv().await {
        let status = p.status.await;
        if !p.keys.is_empty() {
            // Count failed deliveries before a reconnect makes the broker send them again.
            let mut settled = Vec::with_capacity(p.keys.len());
            for (key, own) in p.keys {
                let own = match own {
                    Some(rx) => Some(rx.await),
                    None => None,
                };
                settled.push((key, own));
            }
            shared
                .attempts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .settle_batch(settled, status);
        }
        let current = shared.generation.load(Ordering::Acquire);
        let n = p.acks.len();
        tracing::trace!(source = %name, messages = n, ?status, generation = p.generation, "batch resolved");
        if p.generation == current && failed_generation != Some(current) {
            if status.is_ackable() {
                // The window permits of these messages are released once the poller has
                // written their acks.
                shared.push_acks(p.acks.iter().map(|&(qos, pkid)| AckItem::Ack {
                    generation: p.generation,
                    qos,
                    pkid,
                }));
                continue;
            }
            tracing::warn!(
                source = %name,
                messages = n,
                "a batch failed downstream; reconnecting so that the broker redelivers it"
            );
            failed_generation = Some(current);
            shared.push_acks([AckItem::Reconnect {
                generation: current,
            }]);
        }
        // Not acknowledged (failed, or its connection is gone): the broker redelivers it.
        shared.inflight.fetch_sub(n as i64, Ordering::Relaxed);
        shared.window.add_permits(n);
    }
}

struct Poller {
    name: String,
    max_inflight: usize,
    client: sluice_mqtt::Client,
    connector: Connector,
    filters: Vec<String>,
    qos: rumqttc::QoS,
    batch_size: usize,
    shared: Arc<Shared>,
    metrics: Arc<ComponentMetrics>,
    tx: mpsc::UnboundedSender<Incoming>,
}

impl Poller {
    /// Polls the event loop until shutdown; `Err` on a permanent connection failure before the
    /// first successful connection (bad certificate, refused credentials).
    async fn run(self, mut el: EventLoop) -> Result<(), String> {
        let connected_gauge = self.metrics.gauge("connected");
        let reconnects = self.metrics.counter("reconnects");
        let messages = self.metrics.counter("messages");
        let mut backoff = self.connector.backoff();
        let mut connected = false;
        let mut ever_connected = false;
        let mut failures = 0u64;
        let mut warned_unsolicited = false;
        // Counted per handed-over burst, not per message (shared atomics are not free).
        let (mut burst_messages, mut burst_bytes) = (0i64, 0usize);
        let mut batch: Vec<Message> = Vec::new();
        let draining = self.shared.draining.clone();
        // Messages read while the window was full (held without a permit): paid back first.
        let mut debt = 0usize;
        // v5: acks handed to the client and not yet reported written.
        let mut in_client = 0usize;
        let keep_alive = self
            .connector
            .config()
            .keep_alive
            .0
            .max(Duration::from_secs(1));
        loop {
            // Acks resolved downstream go out before anything more is read.
            if self.send_acks(&mut el, &mut in_client).await {
                let _ = self.client.try_disconnect();
            }
            while debt > 0 {
                match self.shared.window.try_acquire() {
                    Ok(p) => {
                        p.forget();
                        debt -= 1;
                    }
                    Err(_) => break,
                }
            }
            if debt > 0 && !draining.is_cancelled() {
                // Window full. MQTT 3.1.1 writes its acks without polling, so stop reading
                // (TCP pushes back on the broker) until acks or downstream free room. With v5
                // the acks still waiting for the client's queue only move when we poll; keep
                // polling for them while the source task has room (a broker that honours our
                // Receive Maximum sends nothing more meanwhile; one that does not makes this
                // read ahead, bounded by `max_inflight` messages waiting for the source task).
                let must_poll = (in_client > 0 || !self.shared.acks_empty())
                    && self.shared.to_source.load(Ordering::Acquire) < self.max_inflight as i64;
                if !must_poll {
                    self.flush(&mut batch);
                    tokio::select! {
                        p = self.shared.window.acquire() => if let Ok(p) = p {
                            p.forget();
                            debt -= 1;
                        },
                        _ = self.shared.acks_ready.notified() => {}
                        _ = self.shared.taken.notified() => {}
                        _ = draining.cancelled() => {}
                        // Not reading, but still talking: the broker drops a client it has
                        // not heard from for 1.5 × keep_alive (v3.1.1; v5 pings when polled).
                        _ = tokio::time::sleep(keep_alive / 2), if connected => {
                            el.ping().await;
                        }
                    }
                    continue;
                }
            }
            let event = tokio::select! {
                biased;
                // New acks to write: stop waiting for the network. (Cancelling a poll is safe
                // here: rumqttc keeps partial reads in its framed buffer and writes whole
                // packets to its write buffer without waiting.)
                _ = self.shared.acks_ready.notified(), if connected => continue,
                ev = el.poll() => ev,
            };
            match event {
                Ok(Event::Connected { session_present }) => {
                    connected = true;
                    connected_gauge.store(1, Ordering::Relaxed);
                    if ever_connected {
                        reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    ever_connected = true;
                    failures = 0;
                    backoff.reset();
                    tracing::info!(
                        source = %self.name,
                        broker = %self.connector.address(),
                        session_present,
                        "mqtt connected"
                    );
                    // Subscribing again on a resumed session is harmless and covers a broker
                    // that lost the session.
                    if let Err(e) = self.client.try_subscribe(&self.filters, self.qos) {
                        return Err(format!("cannot queue SUBSCRIBE: {e}"));
                    }
                }
                Ok(Event::SubAck { refused }) => {
                    if !refused.is_empty() {
                        let names: Vec<&String> = refused
                            .iter()
                            .filter_map(|i| self.filters.get(*i))
                            .collect();
                        return Err(format!(
                            "the broker refused the subscription to {names:?} (ACL, invalid filter or unsupported shared subscription)"
                        ));
                    }
                    self.metrics.gauge("subscribed").store(1, Ordering::Relaxed);
                    tracing::debug!(source = %self.name, "subscribed");
                }
                Ok(Event::Publish(m)) => {
                    // Data arrives: the connection is alive even if the PINGRESP is still
                    // queued behind messages we have not read (see `saw_traffic`).
                    el.saw_traffic();
                    if draining.is_cancelled() {
                        // Left unacknowledged: redelivered on the next connection.
                        continue;
                    }
                    burst_messages += 1;
                    burst_bytes += m.payload.len();
                    if m.qos > 0 {
                        self.shared.inflight.fetch_add(1, Ordering::Relaxed);
                    }
                    batch.push(m);
                    match self.shared.window.try_acquire() {
                        Ok(p) => p.forget(),
                        // Window full: the top of the loop waits (it writes acks meanwhile).
                        Err(_) => debt += 1,
                    }
                }
                Ok(Event::UnsubAck) => self.shared.barrier.notify_one(),
                Ok(Event::PubAckSent(_)) | Ok(Event::PubRecSent(_)) => {
                    in_client = in_client.saturating_sub(1);
                }
                Ok(Event::PubCompSent(_)) => {
                    self.shared.qos2_open.fetch_sub(1, Ordering::AcqRel);
                }
                Ok(Event::DisconnectSent) => {
                    if draining.is_cancelled() {
                        return Ok(());
                    }
                    // Requested by the acknowledgement task after a failed batch.
                    self.flush(&mut batch);
                    el.drop_connection();
                    in_client = 0;
                    self.lost(
                        &mut connected,
                        "disconnected to get failed messages redelivered",
                    );
                }
                Ok(Event::DisconnectReceived(reason)) => {
                    tracing::warn!(source = %self.name, reason, "the broker sent DISCONNECT");
                }
                Ok(_) => {}
                Err(e) => {
                    self.shared.qos2_open.store(0, Ordering::Release);
                    if draining.is_cancelled() {
                        return Ok(());
                    }
                    self.flush(&mut batch);
                    if !ever_connected && e.permanent {
                        return Err(format!(
                            "cannot connect to {}: {}",
                            self.connector.address(),
                            e.message
                        ));
                    }
                    if e.message.contains("nsolicited") && !warned_unsolicited {
                        warned_unsolicited = true;
                        tracing::error!(
                            source = %self.name,
                            error = %e,
                            "the broker resumed a QoS 2 handshake this client cannot continue \
                             (rumqttc 0.25 forgets incoming QoS 2 state across connections); \
                             use qos = 1, or clear the session once with clean_session = true"
                        );
                    }
                    in_client = 0;
                    if connected {
                        self.lost(&mut connected, &e.message);
                    } else if failures == 0 {
                        tracing::warn!(
                            source = %self.name,
                            broker = %self.connector.address(),
                            error = %e,
                            "mqtt cannot connect; retrying with backoff"
                        );
                    } else {
                        tracing::debug!(source = %self.name, error = %e, failures, "mqtt connect failed");
                    }
                    failures += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = draining.cancelled() => return Ok(()),
                    }
                }
            }
            // Hand over a whole read at a time: flush when rumqttc has nothing more buffered
            // (its next poll would wait for the network) or the batch is full.
            if !batch.is_empty() && (batch.len() >= self.batch_size || !el.has_buffered_events()) {
                self.flush(&mut batch);
            }
            if burst_messages > 0 && batch.is_empty() {
                messages.fetch_add(burst_messages, Ordering::Relaxed);
                self.metrics.add_bytes(burst_bytes);
                (burst_messages, burst_bytes) = (0, 0);
            }
        }
    }

    /// Writes (v3.1.1) or queues (v5) the acks the acknowledgement task handed over, in order;
    /// drops those of a lost connection. Returns whether a reconnect was asked for.
    async fn send_acks(&self, el: &mut EventLoop, in_client: &mut usize) -> bool {
        let mut items = self.shared.take_acks();
        if items.is_empty() {
            return false;
        }
        let current = self.shared.generation.load(Ordering::Acquire);
        let mut acks: Vec<(u8, u16)> = Vec::with_capacity(items.len());
        let (mut stale, mut reconnect) = (0usize, false);
        while let Some(item) = items.pop_front() {
            match item {
                AckItem::Ack {
                    generation,
                    qos,
                    pkid,
                } if generation == current => acks.push((qos, pkid)),
                AckItem::Ack { .. } => stale += 1,
                AckItem::Reconnect { generation } => {
                    self.shared.unsent.fetch_sub(1, Ordering::AcqRel);
                    reconnect |= generation == current;
                }
            }
        }
        if stale > 0 {
            // Their connection is gone: the broker sends them again.
            self.shared
                .acks_dropped
                .fetch_add(stale as i64, Ordering::Relaxed);
            self.release(stale);
        }
        if acks.is_empty() {
            return reconnect;
        }
        let qos2 = acks.iter().filter(|(q, _)| *q == 2).count() as i64;
        // Open until the poller sees our PUBCOMP go out.
        self.shared.qos2_open.fetch_add(qos2, Ordering::AcqRel);
        match el.write_acks(&acks).await {
            Some(Ok(())) => self.release(acks.len()),
            Some(Err(e)) => {
                // The connection broke: the next poll reconnects and the broker redelivers.
                tracing::debug!(source = %self.name, error = %e, acks = acks.len(), "acks not written");
                self.shared.qos2_open.fetch_sub(qos2, Ordering::AcqRel);
                self.shared
                    .acks_dropped
                    .fetch_add(acks.len() as i64, Ordering::Relaxed);
                self.release(acks.len());
            }
            None => {
                for (i, &(qos, pkid)) in acks.iter().enumerate() {
                    if self.client.try_ack(qos, pkid).is_err() {
                        // The client's queue is full (it is sized for two windows, so this
                        // is rare): keep the rest, in order, for the next round.
                        self.shared.ack_retries.fetch_add(1, Ordering::Relaxed);
                        let mut q = self.shared.acks.lock().unwrap_or_else(|p| p.into_inner());
                        for &(qos, pkid) in acks[i..].iter().rev() {
                            q.push_front(AckItem::Ack {
                                generation: current,
                                qos,
                                pkid,
                            });
                        }
                        let rest = acks[i..].iter().filter(|(q, _)| *q == 2).count() as i64;
                        self.shared.qos2_open.fetch_sub(rest, Ordering::AcqRel);
                        break;
                    }
                    *in_client += 1;
                    self.release(1);
                }
            }
        }
        reconnect
    }

    /// Returns `n` window permits of messages that are acknowledged (or will be redelivered).
    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.shared.inflight.fetch_sub(n as i64, Ordering::Relaxed);
        self.shared.unsent.fetch_sub(n as i64, Ordering::AcqRel);
        self.shared.window.add_permits(n);
    }

    fn lost(&self, connected: &mut bool, why: &str) {
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        self.metrics.gauge("subscribed").store(0, Ordering::Relaxed);
        if *connected {
            *connected = false;
            self.metrics.gauge("connected").store(0, Ordering::Relaxed);
            tracing::warn!(source = %self.name, broker = %self.connector.address(), reason = why, "mqtt disconnected; reconnecting");
        }
    }

    /// Hands the batch to the source task (never waits: the window bounds what is queued).
    fn flush(&self, batch: &mut Vec<Message>) {
        if batch.is_empty() {
            return;
        }
        let incoming = Incoming {
            generation: self.shared.generation.load(Ordering::Acquire),
            messages: std::mem::replace(batch, Vec::with_capacity(self.batch_size.min(1024))),
        };
        self.shared
            .to_source
            .fetch_add(incoming.messages.len() as i64, Ordering::AcqRel);
        // A send error means the source task stopped: the messages stay unacknowledged.
        let _ = self.tx.send(incoming);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<MqttSourceConfig, toml::de::Error> {
        toml::from_str(toml_text)
    }

    #[test]
    fn flattened_connection_options_and_unknown_keys() {
        let c = parse(
            r#"url = "mqtt://127.0.0.1:1883"
               protocol = "v3.1.1"
               topics = ["devices/+/data"]
               tls = { ca_file = "ca.pem" }"#,
        )
        .expect("valid");
        assert_eq!(c.connection.protocol, Protocol::V311);
        assert_eq!(c.qos, 1);
        let err = parse(
            r#"url = "mqtt://x"
               topcis = ["a"]"#,
        )
        .expect_err("typo");
        assert!(err.to_string().contains("topcis"), "{err}");
    }

    #[test]
    fn filters_default_to_the_topic_pattern_and_get_shared() {
        let mut c = MqttSourceConfig::new("mqtt://x", &[]);
        assert!(c.filters().is_err());
        c.decode.topic_pattern = Some("mtic/msg/client/realtime/{tenant_id}/{project_id}/#".into());
        assert_eq!(
            c.filters().expect("ok"),
            vec!["mtic/msg/client/realtime/+/+/#".to_string()]
        );
        c.shared_group = Some("g1".into());
        assert_eq!(
            c.filters().expect("ok"),
            vec!["$share/g1/mtic/msg/client/realtime/+/+/#".to_string()]
        );
        c.topics = vec!["a/#/b".into()];
        assert!(c.filters().is_err());
        c.topics = vec!["a/b+".into()];
        assert!(c.filters().is_err());
    }
}
