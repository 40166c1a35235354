//! `mqtt` sink: publishes records to a templated topic (anomaly alerts back to devices or
//! dashboards, MQTT → MQTT bridges).
//!
//! ```toml
//! [sinks.alerts]
//! type = "mqtt"
//! inputs = ["threshold"]
//! url = "mqtt://127.0.0.1:1883"
//! topic = "alerts/{device_id}"
//! qos = 1
//! ```
//!
//! `{name}` in `topic` is replaced by the record's tag `name` (or, failing that, its field).
//! A record is acknowledged when the broker confirms it: PUBACK at QoS 1, PUBCOMP at QoS 2,
//! and once written to the socket at QoS 0. Records whose topic or payload cannot be built go
//! to the sink's `dead_letter` output (Rejected), and so do records whose topic a broker would
//! refuse: empty, longer than 65,535 bytes, holding a control character (U+0000–U+001F,
//! U+007F–U+009F) or a wildcard (`+`, `#`), and records whose PUBLISH would exceed
//! `max_packet_size`. With MQTT 5, a publish the broker refuses (a PUBACK / PUBCOMP with a
//! failure reason, e.g. `NotAuthorized` from an ACL) is dead-lettered with that reason; MQTT
//! 3.1.1 has no reason codes, and a broker drops a refused publish silently.
//!
//! The sink uses a clean session and keeps every unconfirmed publish itself: after a
//! reconnect it publishes them again on the new connection (at-least-once; a message the
//! broker had already received before the connection dropped arrives twice). Publishes wait
//! in the sink until the broker's in-flight window (the smaller of `max_inflight` and, for v5,
//! the broker's Receive Maximum: 20 on a default mosquitto) has room for them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::ack::BatchStatus;
use sluice_core::config::HumanDuration;
use sluice_core::metrics::ComponentMetrics;
use sluice_core::record::Record;
use sluice_core::registry::{BuildContext, SinkConfig};
use sluice_core::sink::{BatchConfig, Sink, SinkContext, SinkInput};
use sluice_core::BoxError;
use sluice_mqtt::{ClientSettings, ConnectionConfig, Connector, Event, QoS};
use tokio::sync::mpsc;

pub use crate::encoding::Format;
use crate::encoding::{payload, Template};
pub use sluice_mqtt::{Protocol, TlsConfig};

/// Characters a topic name built from a template may not contain.
const TOPIC_FORBIDDEN: &[char] = &['+', '#', '\0'];

/// Size of the PUBLISH packet for `topic` and `payload_len` payload bytes, as rumqttc
/// computes it before refusing a packet over `max_packet_size` (by dropping the connection,
/// which would make the sink re-send it forever): fixed header, topic, packet id (QoS > 0),
/// and for v5 the (empty) properties' length byte.
fn publish_size(protocol: Protocol, qos: QoS, topic: &str, payload_len: usize) -> usize {
    let mut len = 2 + topic.len() + payload_len;
    if qos != QoS::AtMostOnce {
        len += 2;
    }
    if protocol == Protocol::V5 {
        len += 1;
    }
    // The remaining length is a variable-length integer of 7 bits per byte.
    let len_len = match len {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + len_len + len
}

/// Longest topic name MQTT can carry: a length-prefixed string with a 16-bit length.
const TOPIC_MAX_BYTES: usize = 65_535;

/// Why `topic` cannot be published, if it cannot. Checked before publishing because a broker
/// answers such a PUBLISH by dropping the connection (mosquitto treats U+0000–U+001F and
/// U+007F–U+009F as malformed UTF-8, MQTT 3.1.1 §1.5.3 / 5.0 §1.5.4), and the sink would then
/// re-send it on every reconnect forever, blocking every record behind it.
fn topic_error(topic: &str) -> Option<String> {
    if topic.is_empty() {
        return Some("the topic is empty".into());
    }
    if topic.len() > TOPIC_MAX_BYTES {
        return Some(format!(
            "the topic is {} bytes long, MQTT allows at most {TOPIC_MAX_BYTES}",
            topic.len()
        ));
    }
    // `char::is_control` is exactly Unicode's Cc category: U+0000–U+001F and U+007F–U+009F.
    if let Some(c) = topic.chars().find(|c| c.is_control()) {
        return Some(format!(
            "topic {topic:?} contains the control character U+{:04X}, which brokers refuse",
            c as u32
        ));
    }
    if let Some(c) = topic.chars().find(|c| matches!(c, '+' | '#')) {
        return Some(format!(
            "topic {topic:?} contains the wildcard `{c}`, which a published topic may not"
        ));
    }
    None
}

/// Publishes records to an MQTT broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MqttSinkConfig {
    #[serde(flatten)]
    pub connection: ConnectionConfig,
    /// Topic template: `{name}` becomes the record's tag (or field) `name`, e.g.
    /// "alerts/{device_id}". Required.
    pub topic: String,
    /// QoS of the publishes: 0, 1 (default) or 2.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Publish with the retain flag (the broker keeps the last message per topic for new
    /// subscribers). Default false.
    #[serde(default)]
    pub retain: bool,
    /// Payload: "json" (flat object, default), "record" (sluice record JSON) or "raw".
    #[serde(default)]
    pub format: Format,
    /// Most publishes awaiting the broker's confirmation. Default 1000.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Batching of the input. Default: 1000 records / 10MiB / "10ms".
    #[serde(default = "default_batch")]
    pub batch: BatchConfig,
}

fn default_qos() -> u8 {
    1
}
fn default_max_inflight() -> u16 {
    1000
}
fn default_batch() -> BatchConfig {
    BatchConfig {
        max_age: HumanDuration(Duration::from_millis(10)),
        ..BatchConfig::default()
    }
}

impl MqttSinkConfig {
    /// A sink publishing to `topic` on broker `url`, other options at their defaults.
    pub fn new(url: &str, topic: &str) -> Self {
        MqttSinkConfig {
            connection: ConnectionConfig::new(url),
            topic: topic.to_string(),
            qos: default_qos(),
            retain: false,
            format: Format::default(),
            max_inflight: default_max_inflight(),
            batch: default_batch(),
        }
    }
}

#[async_trait]
impl SinkConfig for MqttSinkConfig {
    async fn build(&self, cx: &BuildContext) -> Result<Box<dyn Sink>, BoxError> {
        if self.connection.clean_session == Some(false) {
            return Err("`clean_session = false` is not supported by the mqtt sink: it re-sends unconfirmed messages itself after a reconnect".into());
        }
        let connector = Connector::new(&self.connection, &cx.pipeline_id, &cx.name)?;
        let qos = sluice_mqtt::qos(self.qos)?;
        let topic = Template::new("topic", &self.topic, TOPIC_FORBIDDEN)?;
        if let Some(c) = self.topic.chars().find(|c| c.is_control()) {
            return Err(format!(
                "`topic` = {:?} contains the control character U+{:04X}, which brokers refuse",
                self.topic, c as u32
            )
            .into());
        }
        if self.max_inflight == 0 {
            return Err("`max_inflight` must be at least 1".into());
        }
        Ok(Box::new(MqttSink {
            protocol: self.connection.protocol,
            max_packet_size: usize::try_from(self.connection.max_packet_size.0)
                .unwrap_or(usize::MAX),
            connector,
            topic,
            qos,
            retain: self.retain,
            format: self.format,
            max_inflight: self.max_inflight,
            batch: self.batch,
        }))
    }
}

struct MqttSink {
    protocol: Protocol,
    /// `max_packet_size`: bigger publishes are dead-lettered.
    max_packet_size: usize,
    connector: Connector,
    topic: Template,
    qos: QoS,
    retain: bool,
    format: Format,
    max_inflight: u16,
    batch: BatchConfig,
}

/// What the poller tells the sink task.
enum Signal {
    Connected(sluice_mqtt::Client),
    /// The publish queued `n`-th on this connection went out with packet id `pkid`.
    Sent(u16),
    /// The broker confirmed packet id `pkid`, or (v5) refused it with this reason.
    Confirmed(u16, Option<String>),
    Lost,
    Fatal(String),
}

/// A publish waiting for the broker's confirmation.
struct Unconfirmed {
    topic: String,
    payload: Bytes,
    /// Kept whole (with its finalizers) so that a publish the broker refuses can be
    /// dead-lettered.
    record: Record,
}

#[async_trait]
impl Sink for MqttSink {
    async fn run(self: Box<Self>, mut input: SinkInput, cx: SinkContext) -> Result<(), BoxError> {
        let settings = ClientSettings {
            clean_session: true,
            manual_acks: false,
            max_inflight: self.max_inflight,
            request_capacity: self.max_inflight as usize + 16,
        };
        let (signal_tx, mut signals) = mpsc::unbounded_channel();
        let poller = Poller {
            name: cx.name.clone(),
            connector: self.connector.clone(),
            settings,
            qos: self.qos,
            metrics: cx.metrics.clone(),
            tx: signal_tx,
        };
        let poller = AbortOnDrop(tokio::spawn(poller.run()));
        // Batches come through a channel so that waiting for one can be cancelled safely.
        let (batch_tx, mut batches) = mpsc::channel(1);
        let batch_config = self.batch;
        let reader = AbortOnDrop(tokio::spawn(async move {
            while let Some(b) = input.next_batch(&batch_config).await {
                if batch_tx.send(b).await.is_err() {
                    break;
                }
            }
        }));

        let mut client: Option<sluice_mqtt::Client> = None;
        let mut next_seq = 0u64;
        let mut unconfirmed: BTreeMap<u64, Unconfirmed> = BTreeMap::new();
        // Publishes not yet handed to the current connection's client, oldest first. The
        // client's request channel is drained by rumqttc only while the broker's in-flight
        // window has room (for v5 the broker's Receive Maximum, 20 on a default mosquitto),
        // so handing it everything at once fails for what does not fit; those wait here and
        // go out as confirmations free room.
        let mut to_send: VecDeque<u64> = VecDeque::new();
        // Publishes handed to the current connection, in order, until rumqttc assigns their ids.
        let mut queued: VecDeque<u64> = VecDeque::new();
        let mut by_pkid: HashMap<u16, u64> = HashMap::new();
        // A hand-over failed although there was room (the event loop is going away): retry
        // after a pause, in case no signal arrives to trigger it.
        let mut retry_later = false;
        let mut input_open = true;
        let max = self.max_inflight as usize;
        let result: Result<(), BoxError> = loop {
            if !input_open && unconfirmed.is_empty() {
                break Ok(());
            }
            let can_take = input_open && client.is_some() && unconfirmed.len() < max;
            tokio::select! {
                signal = signals.recv() => match signal {
                    Some(Signal::Connected(c)) => {
                        // Everything unconfirmed goes out again on the new connection.
                        queued.clear();
                        by_pkid.clear();
                        to_send = unconfirmed.keys().copied().collect();
                        client = Some(c);
                    }
                    Some(Signal::Sent(pkid)) => {
                        if let Some(seq) = queued.pop_front() {
                            if self.qos == QoS::AtMostOnce {
                                if let Some(mut u) = unconfirmed.remove(&seq) {
                                    cx.metrics.add_out(1);
                                    std::mem::take(&mut u.record.finalizers).finish(BatchStatus::Delivered);
                                }
                            } else {
                                by_pkid.insert(pkid, seq);
                            }
                        }
                    }
                    Some(Signal::Confirmed(pkid, refused)) => {
                        if let Some(mut u) = by_pkid.remove(&pkid).and_then(|seq| unconfirmed.remove(&seq)) {
                            match refused {
                                None => {
                                    cx.metrics.add_out(1);
                                    std::mem::take(&mut u.record.finalizers).finish(BatchStatus::Delivered);
                                }
                                // A v5 broker refused it (e.g. its ACL denies the topic):
                                // sending it again gets the same answer.
                                Some(reason) => {
                                    let reason = format!("the broker refused the PUBLISH to {:?}: {reason}", u.topic);
                                    cx.reject(vec![u.record], &reason).await;
                                }
                            }
                        }
                    }
                    Some(Signal::Lost) => client = None,
                    Some(Signal::Fatal(e)) => break Err(format!("mqtt sink `{}`: {e}", cx.name).into()),
                    None => break Err(format!("mqtt sink `{}`: connection task stopped", cx.name).into()),
                },
                batch = batches.recv(), if can_take => match batch {
                    None => input_open = false,
                    Some(mut batch) => {
                        let mut rejected: Vec<(Record, String)> = Vec::new();
                        for r in batch.records.drain(..) {
                            let built = self
                                .topic
                                .render(&r)
                                .and_then(|t| match topic_error(&t) {
                                    Some(e) => Err(e),
                                    None => Ok(t),
                                })
                                .and_then(|t| payload(self.format, &r).map(|p| (t, p)));
                            match built {
                                Err(e) => rejected.push((r, e)),
                                Ok((topic, payload))
                                    if publish_size(self.protocol, self.qos, &topic, payload.len())
                                        > self.max_packet_size =>
                                {
                                    let size = publish_size(self.protocol, self.qos, &topic, payload.len());
                                    rejected.push((
                                        r,
                                        format!(
                                            "the PUBLISH to {topic:?} would be {size} bytes, over `max_packet_size` ({} bytes)",
                                            self.max_packet_size
                                        ),
                                    ));
                                }
                                Ok((topic, payload)) => {
                                    cx.metrics.add_bytes(payload.len());
                                    let seq = next_seq;
                                    next_seq += 1;
                                    to_send.push_back(seq);
                                    unconfirmed.insert(seq, Unconfirmed {
                                        topic,
                                        payload,
                                        record: r,
                                    });
                                }
                            }
                        }
                        for (r, reason) in rejected {
                            cx.reject(vec![r], &reason).await;
                        }
                    }
                },
                _ = tokio::time::sleep(Duration::from_millis(50)), if retry_later => {}
            }
            // Hand over what fits: at most `max_inflight` publishes are in the client's
            // channel or in flight at once, which the channel (max_inflight + 16) always holds.
            retry_later = false;
            if let Some(c) = &client {
                while queued.len() + by_pkid.len() < max {
                    let Some(&seq) = to_send.front() else { break };
                    let Some(u) = unconfirmed.get(&seq) else {
                        to_send.pop_front();
                        continue;
                    };
                    if c.try_publish(u.topic.clone(), self.qos, self.retain, u.payload.clone())
                        .is_err()
                    {
                        // (If the connection just went away, everything unconfirmed is sent
                        // again after the reconnect.)
                        retry_later = true;
                        break;
                    }
                    to_send.pop_front();
                    queued.push_back(seq);
                }
            }
            cx.metrics
                .gauge("inflight")
                .store(unconfirmed.len() as i64, Ordering::Relaxed);
        };
        drop(reader);
        if let Some(c) = &client {
            let _ = c.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_secs(2), poller.join()).await;
        }
        // Anything still unconfirmed (fatal error) is dropped: its finalizers report Errored.
        drop(unconfirmed);
        result
    }
}

/// Aborts the task when dropped (the sink was aborted or failed).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    async fn join(&self) {
        while !self.0.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Poller {
    name: String,
    connector: Connector,
    settings: ClientSettings,
    qos: QoS,
    metrics: Arc<ComponentMetrics>,
    tx: mpsc::UnboundedSender<Signal>,
}

impl Poller {
    /// Passes a broker confirmation (PUBACK for QoS 1, PUBCOMP for QoS 2) to the sink task;
    /// other events need nothing.
    fn confirm(&self, ev: Event) {
        match ev {
            Event::PubAck { pkid, refused } if self.qos == QoS::AtLeastOnce => {
                let _ = self.tx.send(Signal::Confirmed(pkid, refused));
            }
            Event::PubComp { pkid, refused } if self.qos == QoS::ExactlyOnce => {
                let _ = self.tx.send(Signal::Confirmed(pkid, refused));
            }
            _ => {}
        }
    }

    /// One fresh client per connection: requests queued on a lost connection die with it, and
    /// the sink task re-sends what is unconfirmed on the next one.
    async fn run(self) {
        let connected = self.metrics.gauge("connected");
        let reconnects = self.metrics.counter("reconnects");
        let mut backoff = self.connector.backoff();
        let mut ever_connected = false;
        let mut failures = 0u64;
        loop {
            let (client, mut el) = self.connector.client(self.settings);
            let mut up = false;
            loop {
                match el.poll().await {
                    Ok(Event::Connected { .. }) => {
                        up = true;
                        connected.store(1, Ordering::Relaxed);
                        if ever_connected {
                            reconnects.fetch_add(1, Ordering::Relaxed);
                        }
                        ever_connected = true;
                        failures = 0;
                        backoff.reset();
                        tracing::info!(sink = %self.name, broker = %self.connector.address(), "mqtt connected");
                        if self.tx.send(Signal::Connected(client.clone())).is_err() {
                            return;
                        }
                    }
                    Ok(Event::PublishSent(pkid)) => {
                        let _ = self.tx.send(Signal::Sent(pkid));
                    }
                    Ok(Event::DisconnectSent) => return,
                    Ok(ev) => self.confirm(ev),
                    Err(e) => {
                        if !ever_connected && e.permanent {
                            let _ = self.tx.send(Signal::Fatal(format!(
                                "cannot connect to {}: {}",
                                self.connector.address(),
                                e.message
                            )));
                            return;
                        }
                        // Confirmations read together with the close are still valid (a
                        // refused publish must not be sent again on the next connection).
                        for ev in el.take_buffered_events() {
                            self.confirm(ev);
                        }
                        if up {
                            connected.store(0, Ordering::Relaxed);
                            tracing::warn!(sink = %self.name, broker = %self.connector.address(), error = %e, "mqtt disconnected; reconnecting");
                            if self.tx.send(Signal::Lost).is_err() {
                                return;
                            }
                        } else if failures == 0 {
                            tracing::warn!(sink = %self.name, broker = %self.connector.address(), error = %e, "mqtt cannot connect; retrying with backoff");
                        }
                        failures += 1;
                        tokio::time::sleep(backoff.next_delay()).await;
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::record::Value;

    fn record() -> Record {
        let mut r = Record::new(1_764_000_000_123_000_000);
        r.set_tag("device_id", "dev-7");
        r.set_field("temp", Value::F64(31.5));
        r.set_field("zone", Value::Str("b".into()));
        r
    }

    #[test]
    fn topic_template_refuses_wildcards() {
        let t =
            Template::new("topic", "alerts/{device_id}/{zone}", TOPIC_FORBIDDEN).expect("valid");
        assert_eq!(t.render(&record()).expect("renders"), "alerts/dev-7/b");
        assert!(Template::new("topic", "alerts/#", TOPIC_FORBIDDEN).is_err());
        let mut bad = record();
        bad.set_tag("device_id", "a+b");
        assert!(t.render(&bad).is_err());
    }

    #[tokio::test]
    async fn topics_brokers_refuse_are_caught_before_publishing() {
        assert_eq!(topic_error("alerts/dev-7"), None);
        assert_eq!(topic_error("alerts/gerät/温度"), None);
        for bad in [
            "alerts/dev\n1",
            "alerts/\0",
            "alerts/\u{1f}",
            "alerts/\u{7f}",
            "alerts/\u{85}",
            "alerts/\u{9f}",
        ] {
            let e = topic_error(bad).expect("refused");
            assert!(e.contains("control character"), "{bad:?}: {e}");
        }
        assert!(topic_error("a/+/b").is_some());
        assert!(topic_error("a/#").is_some());
        assert!(topic_error("").is_some());
        assert!(topic_error(&"a".repeat(TOPIC_MAX_BYTES)).is_none());
        let long = topic_error(&"a".repeat(TOPIC_MAX_BYTES + 1)).expect("too long");
        assert!(long.contains("65535"), "{long}");
        let c = MqttSinkConfig::new("mqtt://127.0.0.1:1", "alerts/\t{device_id}");
        let cx = BuildContext {
            name: "alerts".into(),
            pipeline_id: "p".into(),
            state_dir: None,
        };
        let err = c.build(&cx).await.err().expect("refused");
        assert!(err.to_string().contains("U+0009"), "{err}");
    }

    /// The size the sink checks is the size rumqttc refuses (a larger estimate would reject
    /// publishes that fit; a smaller one would let the connection-dropping ones through).
    #[test]
    fn publish_size_matches_rumqttc() {
        use rumqttc::v5::mqttbytes::v5::Publish as Publish5;
        use rumqttc::v5::mqttbytes::QoS as QoS5;
        for topic in ["a", "alerts/dev-7/temp"] {
            for n in [0usize, 100, 127, 200, 16_400, 2_100_000] {
                for (qos, qos5) in [
                    (QoS::AtMostOnce, QoS5::AtMostOnce),
                    (QoS::AtLeastOnce, QoS5::AtLeastOnce),
                    (QoS::ExactlyOnce, QoS5::ExactlyOnce),
                ] {
                    let mut p4 = rumqttc::Publish::new(topic, qos, vec![0u8; n]);
                    let mut p5 = Publish5::new(topic, qos5, vec![0u8; n], None);
                    if qos != QoS::AtMostOnce {
                        p4.pkid = 1;
                        p5.pkid = 1;
                    }
                    assert_eq!(publish_size(Protocol::V311, qos, topic, n), p4.size());
                    assert_eq!(publish_size(Protocol::V5, qos, topic, n), p5.size());
                }
            }
        }
    }

    #[test]
    fn config_rejects_unknown_keys() {
        let err =
            toml::from_str::<MqttSinkConfig>("url = \"mqtt://x\"\ntopic = \"a\"\nretian = true")
                .expect_err("typo");
        assert!(err.to_string().contains("retian"), "{err}");
    }
}
