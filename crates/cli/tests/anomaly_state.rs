//! The `anomaly` stage's baselines survive a restart of the real binary: a first `sluice run`
//! warms a series from a file and ends (orderly end: the stage saves its state under
//! `<data_dir>/<pipeline id>/<component>/`); a second run on the same `data_dir` flags the
//! first spike it reads, while the same run on an empty `data_dir` does not (the series would
//! still be warming up).

use std::path::{Path, PathBuf};
use std::process::Command;

const START_MS: i64 = 1_700_000_000_000;

fn pipeline(dir: &Path, name: &str, input: &Path, alerts: &Path, data_dir: &Path) -> PathBuf {
    let text = format!(
        r#"[pipeline]
id = "plant"
data_dir = {data:?}

[sources.in]
type = "file"
path = {input:?}
decode = {{ tags = ["device_id"] }}

[transforms.detect]
type = "anomaly"
inputs = ["in"]
fields = ["temp"]
warmup = 20
detectors = [{{ type = "zscore", window = 30 }}]

[sinks.passthrough]
type = "blackhole"
inputs = ["detect"]

[sinks.alerts]
type = "file"
inputs = ["detect.anomalies"]
path = {alerts:?}
"#,
        data = data_dir.display().to_string(),
        input = input.display().to_string(),
        alerts = alerts.display().to_string(),
    );
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write pipeline");
    p
}

fn readings(path: &Path, from: i64, values: &[f64]) {
    let lines: String = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            format!(
                "{{\"ts\":{},\"device_id\":\"d1\",\"temp\":{v}}}\n",
                START_MS + (from + i as i64) * 1000
            )
        })
        .collect();
    std::fs::write(path, lines).expect("write input");
}

/// Runs the pipeline to the end of its input file; returns the alert lines written.
fn run(pipeline: &Path, alerts: &Path) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(pipeline)
        .env("RUST_LOG", "info")
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "sluice failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(alerts)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn baselines_survive_a_restart_of_the_binary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let normal: Vec<f64> = (0..60)
        .map(|i| 20.0 + 0.3 * (f64::from(i) * 1.7).sin())
        .collect();
    let warm_input = dir.path().join("warm.jsonl");
    readings(&warm_input, 0, &normal);
    let spike_input = dir.path().join("spike.jsonl");
    readings(&spike_input, 60, &[30.0]);

    let warm_alerts = dir.path().join("warm-alerts.jsonl");
    let first = pipeline(dir.path(), "warm.toml", &warm_input, &warm_alerts, &data);
    assert!(run(&first, &warm_alerts).is_empty(), "normal readings only");
    let snapshot = data.join("plant").join("detect").join("anomaly.json");
    assert!(snapshot.exists(), "state saved at {}", snapshot.display());

    let alerts = dir.path().join("alerts.jsonl");
    let second = pipeline(dir.path(), "spike.toml", &spike_input, &alerts, &data);
    let flagged = run(&second, &alerts);
    assert_eq!(flagged.len(), 1, "{flagged:?}");
    assert!(
        flagged[0].contains("\"detector\":\"zscore\""),
        "{flagged:?}"
    );
    assert!(flagged[0].contains("\"device_id\":\"d1\""), "{flagged:?}");

    // The same run without the saved state: the spike meets a cold series.
    let fresh_alerts = dir.path().join("fresh-alerts.jsonl");
    let fresh = pipeline(
        dir.path(),
        "fresh.toml",
        &spike_input,
        &fresh_alerts,
        &dir.path().join("empty-data"),
    );
    let flagged = run(&fresh, &fresh_alerts);
    assert!(flagged.is_empty(), "{flagged:?}");
}
