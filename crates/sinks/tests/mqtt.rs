//! Integration tests of the `mqtt` sink against a real mosquitto (the shared one on
//! 127.0.0.1:1883 from `scripts/services.sh start`, and a private one for the restart test).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sluice_core::ack::{self, BatchStatus, StatusReceiver};
use sluice_core::channel::{buffer, BufferConfig, Input, Output, Outputs, DEAD_LETTER};
use sluice_core::metrics::{ComponentMetrics, Kind};
use sluice_core::record::{Batch, Record, Value};
use sluice_core::registry::{BuildContext, SinkConfig};
use sluice_core::sink::{SinkContext, SinkInput};
use sluice_mqtt::testing::{self, Mosquitto, BROKER};
use sluice_mqtt::Protocol;
use sluice_sinks::mqtt::MqttSinkConfig;
use tokio::task::JoinHandle;

struct Running {
    out: Output,
    dead: Input,
    metrics: Arc<ComponentMetrics>,
    task: JoinHandle<Result<(), String>>,
}

async fn start(config: &MqttSinkConfig) -> Running {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let metrics = Arc::new(ComponentMetrics::new("alerts", Kind::Sink));
    let (edge, input) = buffer(BufferConfig::default(), metrics.clone());
    let (dead_edge, dead) = buffer(
        BufferConfig::default(),
        Arc::new(ComponentMetrics::new("dlq", Kind::Sink)),
    );
    let cx = SinkContext {
        name: "alerts".into(),
        metrics: metrics.clone(),
        out: Outputs::new(
            Output::default(),
            HashMap::from([(DEAD_LETTER.to_string(), Output::new(vec![dead_edge]))]),
            metrics.clone(),
        ),
    };
    let sink = config
        .build(&BuildContext {
            name: "alerts".into(),
            // A pipeline id of its own per sink: the default client id derives from it, and
            // tests running in parallel on the shared broker with one client id take each
            // other's connection over (mosquitto drops the older one: QoS 0 publishes lost,
            // QoS 1 ones duplicated).
            pipeline_id: testing::unique("mqtt-sink-tests"),
            state_dir: None,
        })
        .await
        .expect("sink builds");
    let task = tokio::spawn(async move {
        sink.run(SinkInput::new(input), cx)
            .await
            .map_err(|e| e.to_string())
    });
    Running {
        out: Output::new(vec![edge]),
        dead,
        metrics,
        task,
    }
}

/// `n` alert records over 5 devices, in one batch with one finalizer.
fn alerts(range: std::ops::Range<i64>) -> (Batch, StatusReceiver) {
    let (f, status) = ack::batch();
    let records = range
        .map(|i| {
            let mut r = Record::new((1_764_000_000_000 + i) * 1_000_000);
            r.set_tag("device_id", format!("dev-{}", i % 5));
            r.set_field("seq", Value::I64(i));
            r.set_field("temp", Value::F64(40.5));
            r.finalizers.push(f.clone());
            r
        })
        .collect();
    f.finish(BatchStatus::Delivered);
    (Batch::new(records), status)
}

async fn round_trip(protocol: Protocol, qos: u8, retain: bool) {
    testing::require_broker();
    let prefix = testing::unique("sink");
    let mut c = MqttSinkConfig::new(BROKER, &format!("{prefix}/alerts/{{device_id}}"));
    c.connection.protocol = protocol;
    c.qos = qos;
    c.retain = retain;
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let filter = format!("{prefix}/alerts/+");
    let collector = tokio::spawn(async move {
        testing::collect(BROKER, &filter, 200, Duration::from_secs(30), ready_tx).await
    });
    ready.await.expect("collector subscribed");
    let sink = start(&c).await;
    let mut statuses = Vec::new();
    for chunk in 0..4 {
        let (batch, status) = alerts(chunk * 50..(chunk + 1) * 50);
        sink.out.send(batch).await.expect("send");
        statuses.push(status);
    }
    for s in statuses {
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(30), s)
                .await
                .expect("confirmed in time"),
            BatchStatus::Delivered
        );
    }
    drop(sink.out);
    tokio::time::timeout(Duration::from_secs(10), sink.task)
        .await
        .expect("sink stops")
        .expect("task")
        .expect("sink ok");
    assert_eq!(sink.metrics.records_out.load(Ordering::Relaxed), 200);
    let got = collector.await.expect("collector");
    assert_eq!(got.len(), 200);
    let mut seqs = BTreeSet::new();
    for (topic, payload, _) in &got {
        let v: serde_json::Value = serde_json::from_slice(payload).expect("JSON payload");
        let seq = v["seq"].as_i64().expect("seq");
        assert_eq!(topic, &format!("{prefix}/alerts/dev-{}", seq % 5));
        assert_eq!(v["device_id"], format!("dev-{}", seq % 5));
        assert_eq!(v["temp"], 40.5);
        assert_eq!(v["ts"], 1_764_000_000_000i64 + seq);
        seqs.insert(seq);
    }
    assert_eq!(seqs, (0..200).collect());
    if retain {
        // A new subscriber gets the last message of each of the 5 topics, flagged retained.
        let (tx, _ready) = tokio::sync::oneshot::channel();
        let retained = testing::collect(
            BROKER,
            &format!("{prefix}/alerts/+"),
            5,
            Duration::from_secs(5),
            tx,
        )
        .await;
        assert_eq!(retained.len(), 5);
        assert!(retained.iter().all(|(_, _, r)| *r));
        // Clear the retained messages again.
        testing::publish(
            BROKER,
            1,
            retained
                .into_iter()
                .map(|(t, _, _)| (t, bytes::Bytes::new()))
                .collect(),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_v311_qos1() {
    round_trip(Protocol::V311, 1, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_v5_qos2() {
    round_trip(Protocol::V5, 2, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_v5_qos0_retained() {
    round_trip(Protocol::V5, 0, true).await;
}

/// A record without the tag the topic needs is dead-lettered (and its batch `Rejected`, so
/// the source acknowledges it); the others are published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_without_topic_tag_is_dead_lettered() {
    testing::require_broker();
    let prefix = testing::unique("sink-dlq");
    let c = MqttSinkConfig::new(BROKER, &format!("{prefix}/alerts/{{device_id}}"));
    let mut sink = start(&c).await;
    let (mut batch, status) = alerts(0..3);
    batch.records[1].remove_tag("device_id");
    sink.out.send(batch).await.expect("send");
    let mut dead = sink.dead.recv().await.expect("dead letter");
    assert_eq!(dead.len(), 1);
    let error = dead.records[0].meta.error.clone().unwrap_or_default();
    assert!(error.contains("`device_id`"), "{error}");
    dead.finalize(BatchStatus::Delivered);
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), status)
            .await
            .expect("resolved"),
        BatchStatus::Rejected
    );
    assert_eq!(sink.metrics.records_out.load(Ordering::Relaxed), 2);
    drop(sink.out);
    sink.task.await.expect("task").expect("sink ok");
}

/// The broker restarts while records flow: every record is eventually confirmed (re-sent on
/// the new connection) and reaches a persistent subscriber; none is reported lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_resends_unconfirmed() {
    let mut broker = Mosquitto::start("");
    let url = broker.url();
    let prefix = testing::unique("sink-restart");
    let filter = format!("{prefix}/alerts/+");
    // A persistent QoS 1 subscriber that survives the restart.
    let (host, port) = ("127.0.0.1", broker.port);
    let mut o = rumqttc_opts(host, port);
    o.set_clean_session(false);
    let (sub, mut sub_el) = rumqttc::AsyncClient::new(o, 64);
    sub.subscribe(&filter, rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let subscriber = tokio::spawn(async move {
        let mut subscribed_tx = Some(subscribed_tx);
        loop {
            match sub_el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let v: serde_json::Value =
                        serde_json::from_slice(&p.payload).expect("JSON payload");
                    let _ = seen_tx.send(v["seq"].as_i64().expect("seq"));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    subscribed.await.expect("subscribed");

    let mut c = MqttSinkConfig::new(&url, &format!("{prefix}/alerts/{{device_id}}"));
    c.connection.reconnect_max = "500ms".parse().expect("duration");
    let sink = start(&c).await;
    let mut statuses = Vec::new();
    for chunk in 0..10 {
        if chunk == 5 {
            broker.stop();
            broker.restart();
        }
        let (batch, status) = alerts(chunk * 100..(chunk + 1) * 100);
        sink.out.send(batch).await.expect("send");
        statuses.push(status);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    for s in statuses {
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(30), s)
                .await
                .expect("confirmed in time"),
            BatchStatus::Delivered
        );
    }
    assert!(sink.metrics.counter("reconnects").load(Ordering::Relaxed) >= 1);
    let mut seen = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < 1000 {
        match tokio::time::timeout_at(deadline, seen_rx.recv()).await {
            Ok(Some(s)) => *seen.entry(s).or_insert(0u32) += 1,
            _ => break,
        }
    }
    subscriber.abort();
    let missing: Vec<i64> = (0..1000).filter(|s| !seen.contains_key(s)).collect();
    assert!(
        missing.is_empty(),
        "missing {} e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    drop(sink.out);
    sink.task.await.expect("task").expect("sink ok");
}

fn rumqttc_opts(host: &str, port: u16) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(testing::unique("persistent-sub"), host, port);
    o.set_keep_alive(Duration::from_secs(5));
    o
}

/// mosquitto at its default `max_inflight_messages 20` (the helper's config sets 0 = no limit;
/// mosquitto takes the last value of a repeated option), which a v5 client receives as the
/// broker's Receive Maximum. Queues stay unlimited so that the collector loses nothing.
const DEFAULT_INFLIGHT: &str = "max_inflight_messages 20";

/// Against a broker that allows only 20 publishes in flight, far fewer than the sink's
/// `max_inflight` (1000), publishes that do not fit the client's request queue at once must
/// wait in the sink and go out as confirmations free room — not sit stranded until a
/// reconnect that never comes. 2,000 records: each batch resolves Delivered in bounded time
/// and a subscriber receives all of them.
async fn drains_through_small_receive_maximum(protocol: Protocol) {
    let broker = Mosquitto::start(DEFAULT_INFLIGHT);
    let url = broker.url();
    let prefix = testing::unique("sink-rm20");
    let mut c = MqttSinkConfig::new(&url, &format!("{prefix}/alerts/{{device_id}}"));
    c.connection.protocol = protocol;
    let total = 2_000i64;
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let filter = format!("{prefix}/alerts/+");
    let collect_url = url.clone();
    let collector = tokio::spawn(async move {
        testing::collect(
            &collect_url,
            &filter,
            total as usize,
            Duration::from_secs(60),
            ready_tx,
        )
        .await
    });
    ready.await.expect("collector subscribed");
    let sink = start(&c).await;
    let mut statuses = Vec::new();
    for chunk in 0..20 {
        let (batch, status) = alerts(chunk * 100..(chunk + 1) * 100);
        sink.out.send(batch).await.expect("send");
        statuses.push(status);
    }
    for (i, s) in statuses.into_iter().enumerate() {
        let status = tokio::time::timeout(Duration::from_secs(30), s)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "batch {i} not confirmed within 30 s ({} of {total} records out, inflight gauge {})",
                    sink.metrics.records_out.load(Ordering::Relaxed),
                    sink.metrics.gauge("inflight").load(Ordering::Relaxed)
                )
            });
        assert_eq!(status, BatchStatus::Delivered, "batch {i}");
    }
    assert_eq!(
        sink.metrics.counter("reconnects").load(Ordering::Relaxed),
        0,
        "the sink drained without reconnecting"
    );
    drop(sink.out);
    tokio::time::timeout(Duration::from_secs(10), sink.task)
        .await
        .expect("sink stops")
        .expect("task")
        .expect("sink ok");
    let got = collector.await.expect("collector");
    let seqs: BTreeSet<i64> = got
        .iter()
        .map(|(_, p, _)| {
            let v: serde_json::Value = serde_json::from_slice(p).expect("JSON payload");
            v["seq"].as_i64().expect("seq")
        })
        .collect();
    assert_eq!(
        seqs,
        (0..total).collect(),
        "every record reached the subscriber"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drains_through_default_mosquitto_v5() {
    drains_through_small_receive_maximum(Protocol::V5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drains_through_default_mosquitto_v311() {
    drains_through_small_receive_maximum(Protocol::V311).await;
}

/// A tag holding a control character makes a topic the broker refuses (mosquitto drops the
/// connection). The record is dead-lettered with the reason before it is published; the
/// records around it arrive and the sink never reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_character_in_topic_is_dead_lettered() {
    testing::require_broker();
    let prefix = testing::unique("sink-ctl");
    let c = MqttSinkConfig::new(BROKER, &format!("{prefix}/echo/{{device_id}}"));
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let filter = format!("{prefix}/echo/+");
    let collector = tokio::spawn(async move {
        testing::collect(BROKER, &filter, 20, Duration::from_secs(10), ready_tx).await
    });
    ready.await.expect("collector subscribed");
    let mut sink = start(&c).await;
    let (first, first_status) = alerts(0..10);
    let (mut bad, bad_status) = alerts(10..11);
    bad.records[0].set_tag("device_id", "dev\n1");
    let (last, last_status) = alerts(11..21);
    for b in [first, bad, last] {
        sink.out.send(b).await.expect("send");
    }
    let mut dead = tokio::time::timeout(Duration::from_secs(10), sink.dead.recv())
        .await
        .expect("dead-lettered in time")
        .expect("dead letter");
    assert_eq!(dead.len(), 1);
    let error = dead.records[0].meta.error.clone().unwrap_or_default();
    assert!(error.contains("control character"), "{error}");
    dead.finalize(BatchStatus::Delivered);
    for (name, status, want) in [
        ("first", first_status, BatchStatus::Delivered),
        ("bad", bad_status, BatchStatus::Rejected),
        ("last", last_status, BatchStatus::Delivered),
    ] {
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(10), status)
                .await
                .unwrap_or_else(|_| panic!("{name} batch resolved in time")),
            want,
            "{name} batch"
        );
    }
    assert_eq!(sink.metrics.records_out.load(Ordering::Relaxed), 20);
    assert_eq!(
        sink.metrics.counter("reconnects").load(Ordering::Relaxed),
        0,
        "the bad topic never reached the broker"
    );
    let got = collector.await.expect("collector");
    let seqs: BTreeSet<i64> = got
        .iter()
        .map(|(_, p, _)| {
            let v: serde_json::Value = serde_json::from_slice(p).expect("JSON payload");
            v["seq"].as_i64().expect("seq")
        })
        .collect();
    assert_eq!(seqs, (0..10).chain(11..21).collect());
    drop(sink.out);
    tokio::time::timeout(Duration::from_secs(10), sink.task)
        .await
        .expect("sink stops")
        .expect("task")
        .expect("sink ok");
}

/// A record whose PUBLISH would exceed `max_packet_size` makes rumqttc drop the connection
/// ("outgoing packet too large"), and the sink would re-send it on every reconnect. It is
/// dead-lettered with the reason instead; the records around it arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_over_max_packet_size_is_dead_lettered() {
    testing::require_broker();
    for protocol in [Protocol::V5, Protocol::V311] {
        let prefix = testing::unique("sink-big");
        let mut c = MqttSinkConfig::new(BROKER, &format!("{prefix}/echo/{{device_id}}"));
        c.connection.protocol = protocol;
        c.connection.max_packet_size = "1KiB".parse().expect("size");
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let filter = format!("{prefix}/echo/+");
        let collector = tokio::spawn(async move {
            testing::collect(BROKER, &filter, 20, Duration::from_secs(10), ready_tx).await
        });
        ready.await.expect("collector subscribed");
        let mut sink = start(&c).await;
        let (first, first_status) = alerts(0..10);
        let (mut big, big_status) = alerts(10..11);
        big.records[0].set_field("note", Value::Str("x".repeat(2_000).into()));
        let (last, last_status) = alerts(11..21);
        for b in [first, big, last] {
            sink.out.send(b).await.expect("send");
        }
        let mut dead = tokio::time::timeout(Duration::from_secs(10), sink.dead.recv())
            .await
            .expect("dead-lettered in time")
            .expect("dead letter");
        let error = dead.records[0].meta.error.clone().unwrap_or_default();
        assert!(error.contains("max_packet_size"), "{error}");
        dead.finalize(BatchStatus::Delivered);
        for (name, status, want) in [
            ("first", first_status, BatchStatus::Delivered),
            ("big", big_status, BatchStatus::Rejected),
            ("last", last_status, BatchStatus::Delivered),
        ] {
            assert_eq!(
                tokio::time::timeout(Duration::from_secs(10), status)
                    .await
                    .unwrap_or_else(|_| panic!("{name} batch resolved in time ({protocol:?})")),
                want,
                "{name} batch ({protocol:?})"
            );
        }
        assert_eq!(
            sink.metrics.counter("reconnects").load(Ordering::Relaxed),
            0
        );
        assert_eq!(collector.await.expect("collector").len(), 20);
        drop(sink.out);
        sink.task.await.expect("task").expect("sink ok");
    }
}

/// A v5 broker that refuses a publish says so in its PUBACK (here mosquitto's ACL denies the
/// topic: reason NotAuthorized). The record is dead-lettered with that reason — not counted
/// Delivered and acknowledged upstream, as it was while the reason code was ignored — and
/// records to allowed topics around it are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_refused_by_the_broker_is_dead_lettered() {
    let acl_dir = std::env::temp_dir().join(testing::unique("sluice-acl"));
    std::fs::create_dir_all(&acl_dir).expect("acl dir");
    let acl = acl_dir.join("acl");
    std::fs::write(&acl, "topic readwrite allowed/#\n").expect("write acl");
    let broker = Mosquitto::start(&format!("acl_file {}", acl.display()));
    let mut c = MqttSinkConfig::new(&broker.url(), "{area}/echo/{device_id}");
    c.connection.protocol = Protocol::V5;
    let mut sink = start(&c).await;
    let (mut good, good_status) = alerts(0..5);
    for r in &mut good.records {
        r.set_tag("area", "allowed");
    }
    let (mut denied, denied_status) = alerts(5..6);
    denied.records[0].set_tag("area", "denied");
    sink.out.send(good).await.expect("send");
    sink.out.send(denied).await.expect("send");
    let mut dead = tokio::time::timeout(Duration::from_secs(10), sink.dead.recv())
        .await
        .expect("dead-lettered in time")
        .expect("dead letter");
    assert_eq!(dead.len(), 1);
    let error = dead.records[0].meta.error.clone().unwrap_or_default();
    assert!(
        error.contains("refused") && error.contains("NotAuthorized"),
        "{error}"
    );
    dead.finalize(BatchStatus::Delivered);
    for (name, status, want) in [
        ("allowed", good_status, BatchStatus::Delivered),
        ("denied", denied_status, BatchStatus::Rejected),
    ] {
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(10), status)
                .await
                .unwrap_or_else(|_| panic!("{name} batch resolved in time")),
            want,
            "{name} batch"
        );
    }
    assert_eq!(sink.metrics.records_out.load(Ordering::Relaxed), 5);
    drop(sink.out);
    tokio::time::timeout(Duration::from_secs(10), sink.task)
        .await
        .expect("sink stops")
        .expect("task")
        .expect("sink ok");
}
