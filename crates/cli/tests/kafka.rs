//! Kafka through the real binary: a consuming pipeline killed with SIGKILL midway loses
//! nothing, and `pipelines/mqtt-kafka-bridge.toml` as shipped forwards MQTT to Kafka with every
//! message once and the tenant / project of its topic.
//!
//! Needs the broker (`scripts/services.sh start tansu`) and mosquitto (`scripts/services.sh
//! start mosquitto`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_sinks::kafka_testing::{consume, create_topic, produce, require_kafka, unique};

/// Starts `sluice run` and waits until a stderr line contains `ready`.
fn start(pipeline: &Path, envs: &[(&str, &str)], ready: &'static str) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(pipeline)
        .envs(envs.iter().copied())
        .env("RUST_LOG", "info,sluice_sources::mqtt=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(ready) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(());
                }
            }
            if line.contains("ERROR") || line.contains("WARN") {
                eprintln!("sluice: {line}");
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(60)).is_err() {
        let _ = child.kill();
        panic!("sluice did not log {ready:?} within 60 s");
    }
    child
}

fn interrupt(mut child: Child) -> std::process::ExitStatus {
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    child.wait().expect("sluice exits")
}

/// Sequence numbers in the file sink's output with how often each was written (lines cut by
/// a SIGKILL are skipped; the glued next object is still parsed).
fn written(path: &Path) -> BTreeMap<u64, u32> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut seen = BTreeMap::new();
    for line in text.lines() {
        let starts: Vec<usize> = line.match_indices("{\"time\":").map(|(i, _)| i).collect();
        for (k, start) in starts.iter().enumerate() {
            let end = starts.get(k + 1).copied().unwrap_or(line.len());
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line[*start..end]) else {
                continue;
            };
            if let Some(s) = v.pointer("/fields/seq").and_then(|s| s.as_u64()) {
                *seen.entry(s).or_insert(0) += 1;
            }
        }
    }
    seen
}

fn wait_for(path: &Path, distinct: usize, timeout: Duration) -> BTreeMap<u64, u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = written(path);
        if seen.len() >= distinct || Instant::now() > deadline {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

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

    let first = start(&pipeline, &[], "kafka partitions assigned");
    let before = wait_for(&out, 15_000, Duration::from_secs(180));
    assert!(before.len() >= 15_000, "first run wrote {}", before.len());
    let mut first = first;
    first.kill().expect("SIGKILL sluice");
    let _ = first.wait();
    let at_kill = written(&out);
    assert!(
        (at_kill.len() as u64) < MESSAGES,
        "killed too late to test anything ({} written)",
        at_kill.len()
    );

    let started = Instant::now();
    let second = start(&pipeline, &[], "kafka partitions assigned");
    let seen = wait_for(&out, MESSAGES as usize, Duration::from_secs(300));
    let exit = interrupt(second);
    let missing: Vec<u64> = (0..MESSAGES).filter(|s| !seen.contains_key(s)).collect();
    let duplicates: u64 = seen.values().map(|n| u64::from(*n).saturating_sub(1)).sum();
    eprintln!(
        "kafka crash test: {MESSAGES} messages, {} written before kill -9, {} distinct after \
         restart ({:.1} s), {} missing, {duplicates} duplicates",
        at_kill.len(),
        seen.len(),
        started.elapsed().as_secs_f64(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "lost {} messages, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
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
    let sluice = start(
        &pipeline,
        &[
            ("KAFKA_TOPIC", &topic),
            ("BRIDGE_FILTER", &filter),
            ("SLUICE_DATA_DIR", &data_dir),
            ("MQTT_URL", "mqtt://127.0.0.1:1883"),
        ],
        "subscribed",
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
    let exit = interrupt(sluice);

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
    let a = start(
        &pipeline,
        &[("OUT", &out_a.display().to_string())],
        "kafka partitions assigned",
    );
    let mut b = start(
        &pipeline,
        &[("OUT", &out_b.display().to_string())],
        "kafka partitions assigned",
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
    b.kill().expect("SIGKILL b");
    let _ = b.wait();
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
    let exit = interrupt(a);
    let missing: Vec<u64> = (0..MESSAGES).filter(|s| !union.contains_key(s)).collect();
    eprintln!(
        "two processes: {MESSAGES} messages, b wrote {at_kill} before kill -9, a wrote {} in \
         all, {} missing",
        written(&out_a).len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "lost {} messages, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(exit.success(), "graceful stop of the survivor: {exit:?}");
}
