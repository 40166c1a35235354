//! Crash test of the `mqtt` source through the real binary: 10,000 QoS 1 messages with
//! sequence numbers flow mqtt → slow file sink; `sluice` is killed with SIGKILL midway and
//! started again with the same client id. The file must hold every sequence number at least
//! once (acknowledgement after delivery + persistent session); duplicates are reported.
//!
//! Needs the shared mosquitto (`scripts/services.sh start`) and its `mosquitto_pub` client.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MESSAGES: u64 = 10_000;

fn require_broker() {
    if std::net::TcpStream::connect_timeout(
        &"127.0.0.1:1883".parse().expect("address"),
        Duration::from_secs(2),
    )
    .is_err()
    {
        panic!("mosquitto is not listening on 127.0.0.1:1883: run `scripts/services.sh start`");
    }
}

/// Starts `sluice run` and waits until its mqtt source reports the subscription.
fn start(pipeline: &Path) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(pipeline)
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
            if line.contains("subscribed") {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(());
                }
            }
            if line.contains("ERROR") || line.contains("WARN") {
                eprintln!("sluice: {line}");
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(30)).is_err() {
        let _ = child.kill();
        panic!("sluice did not subscribe within 30 s");
    }
    child
}

/// Sequence numbers found in the file sink's output, with how often each was written.
fn written(path: &Path) -> BTreeMap<u64, u32> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut seen = BTreeMap::new();
    for line in text.lines() {
        // A SIGKILL can cut a line; the next run's first line is then glued to it. Parse
        // every `{"time":…}` object on the line separately.
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
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kill_9_midway_loses_nothing() {
    require_broker();
    let dir = tempfile::tempdir().expect("tempdir");
    let tag = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let topic = format!("crash-{tag}/seq");
    let out = dir.path().join("out.jsonl");
    let pipeline = dir.path().join("crash.toml");
    std::fs::write(
        &pipeline,
        format!(
            r#"[pipeline]
id = "crash-{tag}"

[sources.in]
type = "mqtt"
url = "mqtt://127.0.0.1:1883"
protocol = "v3.1.1"
topics = ["{topic}"]
qos = 1

[sinks.out]
type = "file"
inputs = ["in"]
path = "{}"
write_delay = "40ms"
batch = {{ max_records = 250, max_age = "100ms" }}
"#,
            out.display()
        ),
    )
    .expect("write pipeline");

    let mut first = start(&pipeline);
    // Publish all messages (QoS 1, acknowledged by the broker) while the sink crawls.
    let mut publisher = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            "1883",
            "-q",
            "1",
            "-l",
            "-t",
            &topic,
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub (installed by scripts/services.sh start)");
    {
        let mut stdin = publisher.stdin.take().expect("stdin");
        let mut lines = String::new();
        for i in 0..MESSAGES {
            lines.push_str(&format!("{{\"seq\":{i},\"temp\":21.5}}\n"));
        }
        stdin
            .write_all(lines.as_bytes())
            .expect("feed mosquitto_pub");
    }
    let status = publisher.wait().expect("mosquitto_pub");
    assert!(status.success(), "mosquitto_pub failed");

    // Kill -9 once a good part (but not all) is written.
    let before_kill = wait_for(&out, 3000, Duration::from_secs(60));
    assert!(
        before_kill.len() >= 3000,
        "the first run wrote {} records",
        before_kill.len()
    );
    first.kill().expect("SIGKILL sluice");
    let _ = first.wait();
    let at_kill = written(&out);
    assert!(
        (at_kill.len() as u64) < MESSAGES,
        "killed too late to test anything ({} written)",
        at_kill.len()
    );

    // Same pipeline file → same client id → the broker redelivers the unacknowledged rest.
    let mut second = start(&pipeline);
    let seen = wait_for(&out, MESSAGES as usize, Duration::from_secs(90));
    let _ = Command::new("kill")
        .args(["-INT", &second.id().to_string()])
        .status();
    let exit = second.wait().expect("sluice exits");
    let missing: Vec<u64> = (0..MESSAGES).filter(|s| !seen.contains_key(s)).collect();
    let duplicates: u64 = seen.values().map(|n| (*n as u64).saturating_sub(1)).sum();
    eprintln!(
        "crash test: {MESSAGES} messages published, {} written before kill -9, {} distinct \
         after restart, {} missing, {duplicates} duplicates",
        at_kill.len(),
        seen.len(),
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

/// `pipelines/edge-rules.toml` as shipped: a hot reading on `devices/<id>/telemetry` comes back
/// as an alert on `alerts/<id>`; a normal one does not.
#[test]
fn edge_rules_pipeline_publishes_alerts() {
    require_broker();
    let dir = tempfile::tempdir().expect("tempdir");
    let device = format!("edge-test-{}", std::process::id());
    let pipeline = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines/edge-rules.toml");
    let alerts = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            "1883",
            "-q",
            "1",
            "-C",
            "1",
            "-W",
            "30",
        ])
        .args(["-t", &format!("alerts/{device}")])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (installed by scripts/services.sh start)");
    let mut sluice = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(&pipeline)
        .env("SLUICE_DATA_DIR", dir.path())
        .env("MQTT_URL", "mqtt://127.0.0.1:1883")
        .env("RUST_LOG", "info,sluice_sources::mqtt=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    let stderr = sluice.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("subscribed") {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(());
                }
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("edge-rules subscribed");
    for (ts, temp) in [(1_764_000_000_000i64, 21.5), (1_764_000_001_000, 45.2)] {
        let ok = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", "1883", "-q", "1"])
            .args(["-t", &format!("devices/{device}/telemetry")])
            .args(["-m", &format!(r#"{{"ts":{ts},"temp":{temp}}}"#)])
            .status()
            .expect("mosquitto_pub");
        assert!(ok.success());
    }
    let out = alerts.wait_with_output().expect("alert subscriber");
    let _ = Command::new("kill")
        .args(["-INT", &sluice.id().to_string()])
        .status();
    let exit = sluice.wait().expect("sluice exits");
    let alert: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON alert on alerts/<device>");
    assert_eq!(alert["device_id"], device.as_str());
    assert_eq!(alert["detector"], "threshold");
    assert_eq!(alert["value"], 45.2);
    assert!(exit.success(), "graceful stop: {exit:?}");
}
