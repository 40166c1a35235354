//! Runs a pipeline file that uses the plugin's `scale` transform through the plugin's binary.

use std::process::Command;

#[test]
fn pipeline_with_plugin_transform_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_path = dir.path().join("out.jsonl");
    let pipeline = concat!(env!("CARGO_MANIFEST_DIR"), "/pipeline.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-plugin-scale"))
        .args(["run", pipeline, "--status-interval", "0s"])
        .env("COUNT", "300")
        .env("OUT", &out_path)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&out_path).expect("output written");
    let temps: Vec<f64> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json line");
            v["fields"]["temp"].as_f64().expect("temp is a number")
        })
        .collect();
    assert_eq!(temps.len(), 300);
    // The simulator's temperatures are 10–40 °C: in Fahrenheit they are all above 50.
    assert!(temps.iter().all(|t| *t > 50.0 && *t < 104.0), "{temps:?}");

    // The plugin binary also lists the plugin with its documented options.
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-plugin-scale"))
        .args(["components", "scale"])
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("transform scale"), "{text}");
    assert!(text.contains("factor"), "{text}");
}
