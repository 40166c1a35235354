//! End to end: simulator → aggregate + anomaly → file sinks, through the real topology.
//! Also checks that `pipelines/fleet-health.toml` plans with the registered components.

use std::path::Path;

use serde_json::Value as Json;
use sluice_core::config::parse_str;
use sluice_core::metrics::Metrics;
use sluice_core::registry::Registry;
use sluice_core::topology;

fn registry() -> Registry {
    let mut r = Registry::new();
    sluice_sources::register(&mut r);
    sluice_transforms::register(&mut r);
    sluice_sinks::register(&mut r);
    r
}

fn read_jsonl(path: &Path) -> Vec<Json> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .map(|l| serde_json::from_str(l).expect("each line is a JSON record"))
        .collect()
}

const DEVICES: usize = 20;
const ROUNDS: usize = 150;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_to_rollups_and_alerts_in_files() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path().display();
    let text = format!(
        r#"
        [pipeline]
        data_dir = "{d}/data" # the anomaly stage saves its state there, not in the crate

        [sources.fleet]
        type = "simulator"
        devices = {DEVICES}
        rate = "unlimited"
        count = {count}
        start_time = "2024-01-01T00:00:00Z"
        anomalies = {{ spike_probability = 0.01, label = true }}

        [transforms.rollup]
        type = "aggregate"
        inputs = ["fleet"]
        window = "1m"
        group_by = ["device_id"]
        fields = {{ temp = ["count", "mean", "p99"] }}

        [transforms.detect]
        type = "anomaly"
        inputs = ["fleet"]
        fields = ["temp"]
        detectors = [{{ type = "zscore" }}]

        [sinks.rollups]
        type = "file"
        inputs = ["rollup"]
        path = "{d}/rollups.jsonl"

        [sinks.alerts]
        type = "file"
        inputs = ["detect.anomalies"]
        path = "{d}/alerts.jsonl"

        [sinks.passthrough]
        type = "file"
        inputs = ["detect"]
        path = "{d}/passthrough.jsonl"
        "#,
        count = DEVICES * ROUNDS,
    );
    let config = parse_str(&text, Path::new("e2e.toml")).expect("valid pipeline");
    topology::run(config, &registry(), &Metrics::new(), None)
        .await
        .expect("pipeline runs to completion");

    // 150 s of data: minutes 0 and 1 close on the watermark, minute 2 is flushed at shutdown.
    let rollups = read_jsonl(&dir.path().join("rollups.jsonl"));
    assert_eq!(
        rollups.len(),
        DEVICES * 3,
        "one rollup per device per minute"
    );
    let total: i64 = rollups
        .iter()
        .map(|r| r["fields"]["temp_count"].as_i64().expect("count"))
        .sum();
    assert_eq!(
        total as usize,
        DEVICES * ROUNDS,
        "every reading counted once"
    );
    let partial = rollups
        .iter()
        .filter(|r| r["fields"]["partial"] == Json::Bool(true))
        .count();
    assert_eq!(partial, DEVICES, "only the last minute is partial");
    assert!(rollups.iter().all(|r| r["tags"]["device_id"].is_string()
        && r["fields"]["temp_mean"].is_f64()
        && r["fields"]["temp_p99"].is_f64()));

    let passthrough = read_jsonl(&dir.path().join("passthrough.jsonl"));
    assert_eq!(passthrough.len(), DEVICES * ROUNDS);
    let spikes = passthrough
        .iter()
        .filter(|r| r["fields"]["label"] == "spike")
        .count();
    let alerts = read_jsonl(&dir.path().join("alerts.jsonl"));
    println!("{spikes} labelled spikes, {} zscore alerts", alerts.len());
    assert!(spikes > 0, "the simulator injected spikes");
    assert!(!alerts.is_empty(), "spikes raise alerts");
    assert!(alerts.len() <= spikes + 2, "few false alarms");
    assert!(alerts
        .iter()
        .all(|a| a["fields"]["detector"] == "zscore" && a["fields"]["score"].is_f64()));
}

#[test]
fn fleet_health_example_plans() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines/fleet-health.toml");
    let text = std::fs::read_to_string(&path).expect("pipelines/fleet-health.toml exists");
    let config = parse_str(&text, &path).expect("parses");
    let plan = topology::plan(config, &registry());
    assert!(plan.is_ok(), "{:?}", plan.err());
}
