//! Kafka through the real binary: a consuming pipeline killed with SIGKILL midway loses
//! nothing, and `pipelines/mqtt-kafka-bridge.toml` as shipped forwards MQTT to Kafka with every
//! message once and the tenant / project of its topic.
//!
//! Needs the broker (`scripts/services.sh start tansu`) and mosquitto (`scripts/services.sh
//! start mosquitto`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{assert_all_present, duplicates, wait_for, written, Sluice};
use sluice_core::ack::BatchStatus;
use sluice_core::config::HumanDuration;
use sluice_core::record::Origin;
use sluice_core::testing::SourceHarness;
use sluice_sinks::kafka_testing::{
    committed, consume, create_topic, produce, require_kafka, unique, BOOTSTRAP,
};
use sluice_sources::kafka::KafkaSourceConfig;

/// How long a graceful stop may take before the test fails.
const STOP: Duration = Duration::from_secs(60);
/// The kafka source's log line once the group gave it partitions.
const ASSIGNED: Option<&str> = Some("kafka partitions assigned");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_midway_loses_nothing() {
    require_kafka();
    const MESSAGES: u64 = 50_000;
    let topic = unique("crash");
    let group = unique("crash-group");
    create_topic(&topic, 6).await;
    produce(
        &topic,
        (0..MESSAGES)
            .map(|i| {
                (
                    Some(format!("dev-{}", i % 100)),
                    format!("{{\"seq\":{i},\"temp\":21.5}}").into_bytes(),
                )
            })
            .collect(),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.jsonl");
    let pipeline = dir.path().join("crash.toml");
    std::fs::write(
        &pipeline,
        format!(
            r#"[pipeline]
id = "kafka-crash"

[sources.bus]
type = "kafka"
bootstrap_servers = "127.0.0.1:9092"
topics = ["{topic}"]
group_id = "{group}"
session_timeout = "6s"
commit_interval = "200ms"
# The group's rebalance timeout: how long the coordinator waits for the killed member to
# rejoin before it gives the restarted one its partitions (librdkafka's default is 300 s).
librdkafka_options = {{ "max.poll.interval.ms" = "10000" }}

[sinks.out]
type = "file"
inputs = ["bus"]
path = "{}"
write_delay = "50ms"
batch = {{ max_records = 500, max_age = "100ms" }}
"#,
            out.display()
        ),
    )
    .expect("write pipeline");

    let first = Sluice::start(&pipeline, &[], ASSIGNED);
    let before = wait_for(&out, 15_000, Duration::from_secs(180));
    assert!(before.len() >= 15_000, "first run wrote {}", before.len());
    first.kill();
    let at_kill = written(&out);
    assert!(
        (at_kill.len() as u64) < MESSAGES,
        "killed too late to test anything ({} written)",
        at_kill.len()
    );

    let started = Instant::now();
    // Let the group expire the killed member (session_timeout) before the restart joins.
    std::thread::sleep(Duration::from_secs(8));
    let second = Sluice::start(&pipeline, &[], ASSIGNED);
    let seen = wait_for(&out, MESSAGES as usize, Duration::from_secs(300));
    let exit = second.interrupt(STOP);
    eprintln!(
        "kafka crash test: {MESSAGES} messages, {} written before kill -9, {} distinct after \
         restart ({:.1} s), {} duplicates",
        at_kill.len(),
        seen.len(),
        started.elapsed().as_secs_f64(),
        duplicates(&seen)
    );
    assert_all_present(MESSAGES, &seen);
    assert!(exit.success(), "graceful stop after SIGINT: {exit:?}");
}

/// `pipelines/mqtt-kafka-bridge.toml` as shipped: 10,000 QoS 1 messages over 50
/// tenant/project pairs arrive in Kafka once each, in envelopes with the right tenant and
/// project, keyed by them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_pipeline_forwards_every_message_once() {
    require_kafka();
    sluice_mqtt::testing::require_broker();
    const MESSAGES: usize = 10_000;
    let topic = unique("bridge");
    create_topic(&topic, 6).await;
    let run = unique("run");
    let dir = tempfile::tempdir().expect("tempdir");
    let pipeline =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines/mqtt-kafka-bridge.toml");
    let filter = format!("mtic/msg/client/realtime/+/+/{run}");
    let data_dir = dir.path().display().to_string();
    let sluice = Sluice::start(
        &pipeline,
        &[
            ("KAFKA_TOPIC", &topic),
            ("BRIDGE_FILTER", &filter),
            ("SLUICE_DATA_DIR", &data_dir),
            ("MQTT_URL", "mqtt://127.0.0.1:1883"),
        ],
        Some("subscribed"),
    );
    let messages: Vec<(String, Bytes)> = (0..MESSAGES)
        .map(|i| {
            (
                format!(
                    "mtic/msg/client/realtime/tenant-{}/project-{}/{run}",
                    i % 10,
                    (i / 10) % 5
                ),
                Bytes::from(format!("{{\"seq\":{i},\"temp\":21.5}}")),
            )
        })
        .collect();
    let published = Instant::now();
    sluice_mqtt::testing::publish("mqtt://127.0.0.1:1883", 1, messages).await;
    let back = consume(&topic, MESSAGES, Duration::from_secs(15)).await;
    let elapsed = published.elapsed();
    let exit = sluice.interrupt(STOP);

    let mut count: BTreeMap<u64, u32> = BTreeMap::new();
    for m in &back {
        let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("envelope JSON");
        let mqtt_topic = v["mqtt_topic"].as_str().expect("mqtt_topic");
        if !mqtt_topic.ends_with(&run) {
            continue; // a message left in the bridge's persistent session by an older run
        }
        let seq = v["payload"]["seq"].as_u64().expect("payload.seq");
        let (tenant, project) = (
            format!("tenant-{}", seq % 10),
            format!("project-{}", (seq / 10) % 5),
        );
        assert_eq!(v["tenant_id"], tenant.as_str(), "{v}");
        assert_eq!(v["project_id"], project.as_str(), "{v}");
        assert!(v["timestamp"].as_i64().is_some(), "{v}");
        assert_eq!(
            m.key.as_deref(),
            Some(format!("{tenant}/{project}").as_str())
        );
        assert!(
            m.headers
                .contains(&("tenant_id".to_string(), tenant.clone())),
            "headers {:?}",
            m.headers
        );
        *count.entry(seq).or_default() += 1;
    }
    let missing = (0..MESSAGES as u64)
        .filter(|s| !count.contains_key(s))
        .count();
    let duplicated = count.values().filter(|n| **n > 1).count();
    eprintln!(
        "bridge: {MESSAGES} MQTT messages → {} in Kafka in {:.1} s, {missing} missing, {duplicated} duplicated",
        count.len(),
        elapsed.as_secs_f64()
    );
    assert_eq!(missing, 0, "every message reached Kafka");
    assert_eq!(duplicated, 0, "no message twice in a run without failures");
    assert!(exit.success(), "graceful stop: {exit:?}");
}

/// Two `sluice` processes in one consumer group split the partitions; one is killed with
/// SIGKILL; after the group's session timeout the survivor owns every partition and the two
/// output files together hold every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_one_killed_the_other_takes_over() {
    require_kafka();
    const MESSAGES: u64 = 20_000;
    let topic = unique("pair");
    let group = unique("pair-group");
    create_topic(&topic, 6).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pipeline = dir.path().join("pair.toml");
    std::fs::write(
        &pipeline,
        format!(
            r#"[pipeline]
id = "kafka-pair"

[sources.bus]
type = "kafka"
bootstrap_servers = "127.0.0.1:9092"
topics = ["{topic}"]
group_id = "{group}"
session_timeout = "6s"
commit_interval = "200ms"

[sinks.out]
type = "file"
inputs = ["bus"]
path = "${{OUT}}"
write_delay = "100ms"
batch = {{ max_records = 200, max_age = "100ms" }}
"#
        ),
    )
    .expect("write pipeline");
    let (out_a, out_b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    let a = Sluice::start(
        &pipeline,
        &[("OUT", &out_a.display().to_string())],
        ASSIGNED,
    );
    let b = Sluice::start(
        &pipeline,
        &[("OUT", &out_b.display().to_string())],
        ASSIGNED,
    );
    // The group has split the partitions (b logged its assignment; give a's side of the same
    // rebalance a moment); the messages arrive while both consume, so neither holds them all
    // in its pipeline before the other joins.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let producer = tokio::spawn({
        let topic = topic.clone();
        async move {
            produce(
                &topic,
                (0..MESSAGES)
                    .map(|i| {
                        (
                            Some(format!("dev-{}", i % 100)),
                            format!("{{\"seq\":{i}}}").into_bytes(),
                        )
                    })
                    .collect(),
            )
            .await
        }
    });
    // Both write, then b dies without leaving the group.
    let deadline = Instant::now() + Duration::from_secs(120);
    while (written(&out_a).len() < 500 || written(&out_b).len() < 500) && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (wa, wb) = (written(&out_a).len(), written(&out_b).len());
    assert!(wa >= 500 && wb >= 500, "both members wrote: a {wa}, b {wb}");
    b.kill();
    producer.await.expect("producer task");
    let at_kill = written(&out_b).len();
    let deadline = Instant::now() + Duration::from_secs(300);
    let union = loop {
        let mut all = written(&out_a);
        for (s, n) in written(&out_b) {
            *all.entry(s).or_insert(0) += n;
        }
        if all.len() as u64 >= MESSAGES || Instant::now() > deadline {
            break all;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let exit = a.interrupt(STOP);
    eprintln!(
        "two processes: {MESSAGES} messages, b wrote {at_kill} before kill -9, a wrote {} in \
         all, {} distinct",
        written(&out_a).len(),
        union.len()
    );
    assert_all_present(MESSAGES, &union);
    assert!(exit.success(), "graceful stop of the survivor: {exit:?}");
}

/// A kafka source on `topic` in `group`, tuned for tests: quick group forming (tansu takes
/// ~23 s at the default session timeout), quick re-reads and commits.
fn source_config(topic: &str, group: &str) -> KafkaSourceConfig {
    let mut c = KafkaSourceConfig::new(BOOTSTRAP, &[topic], group);
    c.session_timeout = HumanDuration(Duration::from_secs(6));
    c.commit_interval = HumanDuration(Duration::from_millis(200));
    c.retry_backoff = HumanDuration(Duration::from_millis(100));
    c
}

fn seq(r: &sluice_core::record::Record) -> i64 {
    match r.field("seq") {
        Some(sluice_core::record::Value::I64(s)) => *s,
        other => panic!("record without integer seq: {other:?}"),
    }
}

/// Polls the group's committed offset of partition 0 until it reaches `want`.
async fn wait_committed(group: &str, topic: &str, want: i64, within: Duration) -> Option<i64> {
    let deadline = Instant::now() + within;
    loop {
        let got = committed(group, topic, 1).await[0];
        if got == Some(want) || Instant::now() >= deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Issue 13, item 6: a poison record (its sink fails it every time) is read once plus
/// `max_redeliveries` times, then dead-lettered with the reason and the count; the records
/// behind it on the partition are delivered and the committed offset passes them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_record_is_dead_lettered_after_max_redeliveries() {
    require_kafka();
    let topic = unique("poison");
    let group = unique("poison-group");
    create_topic(&topic, 1).await;
    produce(
        &topic,
        (0..21)
            .map(|i| (None, format!("{{\"seq\":{i},\"temp\":21.5}}").into_bytes()))
            .collect(),
    )
    .await;
    let mut c = source_config(&topic, &group);
    c.max_redeliveries = 3;
    let mut src = SourceHarness::start(&c, "poison", "kafka-tests")
        .await
        .expect("source starts");
    let (mut delivered, mut attempts, mut dead) = (BTreeSet::new(), 0, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(120);
    while dead.is_empty() || delivered.len() < 20 {
        assert!(
            Instant::now() < deadline,
            "poison read {attempts} times, dead-lettered {}, {} of 20 delivered",
            dead.len(),
            delivered.len()
        );
        tokio::select! {
            b = src.input.recv() => {
                let mut b = b.expect("output open");
                for r in &mut b.records {
                    if seq(r) == 0 {
                        attempts += 1;
                        r.finalize(BatchStatus::Errored);
                    } else {
                        delivered.insert(seq(r));
                        r.finalize(BatchStatus::Delivered);
                    }
                }
            }
            d = src.dead.recv() => {
                let mut d = d.expect("dead_letter open");
                d.finalize(BatchStatus::Delivered);
                dead.extend(d.records);
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    assert_eq!(attempts, 4, "read once + max_redeliveries (3) times");
    assert_eq!(dead.len(), 1);
    let error = dead[0].meta.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("failed 4 times") && error.contains("max_redeliveries = 3"),
        "reason and count in the error: {error}"
    );
    assert!(
        matches!(dead[0].meta.origin, Origin::Kafka { offset: 0, .. }),
        "{:?}",
        dead[0].meta.origin
    );
    assert_eq!(delivered, (1..=20).collect::<BTreeSet<i64>>());
    assert_eq!(src.gauge("poisoned"), 1);
    // Records re-read with the poison come again (duplicates); deliver them.
    src.take(1000, BatchStatus::Delivered, Duration::from_secs(1))
        .await;
    assert_eq!(
        wait_committed(&group, &topic, 21, Duration::from_secs(30)).await,
        Some(21),
        "the partition's commit passes the poison and everything behind it"
    );
    src.stop(STOP).await.expect("clean stop");
}

/// Issue 13, item 11: the consumer keeps polling (its partitions paused) while a shutdown
/// waits for slow sinks, so the group does not evict it after `max.poll.interval.ms` and the
/// final commit succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_shutdown_drain_keeps_the_group_membership() {
    require_kafka();
    let topic = unique("drain");
    let group = unique("drain-group");
    create_topic(&topic, 1).await;
    produce(
        &topic,
        (0..10)
            .map(|i| (None, format!("{{\"seq\":{i}}}").into_bytes()))
            .collect(),
    )
    .await;
    let mut c = source_config(&topic, &group);
    // librdkafka's minimum is the session timeout.
    c.librdkafka_options
        .0
        .insert("max.poll.interval.ms".into(), "6000".into());
    let mut src = SourceHarness::start(&c, "drain", "kafka-tests")
        .await
        .expect("source starts");
    let mut held = Vec::new();
    let mut n = 0;
    while n < 10 {
        let b = src
            .next_batch(Duration::from_secs(60))
            .await
            .expect("records arrive");
        n += b.len();
        held.push(b);
    }
    let metrics = src.metrics.clone();
    // Shut down while the "sink" still holds every record, for twice max.poll.interval.ms.
    let stopping = tokio::spawn(src.stop(STOP));
    tokio::time::sleep(Duration::from_secs(13)).await;
    for mut b in held {
        b.finalize(BatchStatus::Delivered);
    }
    stopping.await.expect("stop task").expect("clean stop");
    let failures = metrics
        .counter("commit_failures")
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(failures, 0, "no commit failed (the member was not evicted)");
    assert_eq!(
        committed(&group, &topic, 1).await[0],
        Some(10),
        "the records delivered during the drain are committed"
    );
}
