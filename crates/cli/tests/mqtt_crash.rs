//! Crash test of the `mqtt` source through the real binary: 10,000 QoS 1 messages with
//! sequence numbers flow mqtt → slow file sink; `sluice` is killed with SIGKILL midway and
//! started again with the same client id. The file must hold every sequence number at least
//! once (acknowledgement after delivery + persistent session); duplicates are reported.
//!
//! Needs the shared mosquitto (`scripts/services.sh start`) and its `mosquitto_pub` client.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    assert_all_present, duplicates, require_broker, wait_child, wait_for, written, Sluice,
};

/// How long a graceful stop may take before the test fails.
const STOP: Duration = Duration::from_secs(60);
/// The mqtt source's log line once its subscription is confirmed.
const SUBSCRIBED: Option<&str> = Some("subscribed");

const MESSAGES: u64 = 10_000;

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

    let first = Sluice::start(&pipeline, &[], SUBSCRIBED);
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
    let status = wait_child(&mut publisher, Duration::from_secs(120), "mosquitto_pub");
    assert!(status.success(), "mosquitto_pub failed");

    // Kill -9 once a good part (but not all) is written.
    let before_kill = wait_for(&out, 3000, Duration::from_secs(60));
    assert!(
        before_kill.len() >= 3000,
        "the first run wrote {} records",
        before_kill.len()
    );
    first.kill();
    let at_kill = written(&out);
    assert!(
        (at_kill.len() as u64) < MESSAGES,
        "killed too late to test anything ({} written)",
        at_kill.len()
    );

    // Same pipeline file → same client id → the broker redelivers the unacknowledged rest.
    let second = Sluice::start(&pipeline, &[], SUBSCRIBED);
    let seen = wait_for(&out, MESSAGES as usize, Duration::from_secs(90));
    let exit = second.interrupt(STOP);
    eprintln!(
        "crash test: {MESSAGES} messages published, {} written before kill -9, {} distinct \
         after restart, {} duplicates",
        at_kill.len(),
        seen.len(),
        duplicates(&seen)
    );
    assert_all_present(MESSAGES, &seen);
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
    let data_dir = dir.path().display().to_string();
    let sluice = Sluice::start(
        &pipeline,
        &[
            ("SLUICE_DATA_DIR", &data_dir),
            ("MQTT_URL", "mqtt://127.0.0.1:1883"),
        ],
        SUBSCRIBED,
    );
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
    let exit = sluice.interrupt(STOP);
    let alert: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON alert on alerts/<device>");
    assert_eq!(alert["device_id"], device.as_str());
    assert_eq!(alert["detector"], "threshold");
    assert_eq!(alert["value"], 45.2);
    assert!(exit.success(), "graceful stop: {exit:?}");
}
