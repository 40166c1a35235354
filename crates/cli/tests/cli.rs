//! The `sluice` binary end to end: validation errors, the demo, graceful shutdown on SIGINT.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write file");
    p
}

#[test]
fn validate_names_file_line_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        "broken.toml",
        "[sources.sim]\ntype = \"simulator\"\ndevices = 3\n\n[sinks.out]\ntype = \"file\"\ninputs = [\"sim\"]\npaht = \"x.jsonl\"\n",
    );
    let out = sluice().arg("validate").arg(&file).output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("broken.toml:8: sinks.out: unknown option `paht` for sink type `file` (did you mean `path`?)"),
        "{stderr}"
    );
}

#[test]
fn validate_reports_graph_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        "graph.toml",
        "[sources.sim]\ntype = \"simulatr\"\n\n[sinks.a]\ntype = \"console\"\ninputs = [\"b.dead_letter\"]\n\n[sinks.b]\ntype = \"console\"\ninputs = [\"a.dead_letter\"]\n",
    );
    let out = sluice().arg("validate").arg(&file).output().expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "graph.toml:2: sources.sim: unknown source type `simulatr` (did you mean `simulator`?)"
        ),
        "{stderr}"
    );

    let fixed = std::fs::read_to_string(&file)
        .expect("read")
        .replace("simulatr", "simulator");
    std::fs::write(&file, fixed).expect("write");
    let out = sluice().arg("validate").arg(&file).output().expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("cycle between components"), "{stderr}");
}

#[test]
fn graph_prints_mermaid() {
    let out = sluice()
        .args([
            "graph",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../pipelines/demo.toml"),
        ])
        .output()
        .expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("flowchart LR\n"), "{text}");
    assert!(
        text.contains("fleet -- dead_letter --> dead_letters"),
        "{text}"
    );
    assert!(text.contains("fleet --> console"), "{text}");
}

#[test]
fn components_lists_options_with_defaults() {
    let out = sluice()
        .args(["components", "--json"])
        .output()
        .expect("runs");
    assert!(out.status.success());
    let docs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let sim = docs
        .as_array()
        .expect("array")
        .iter()
        .find(|d| d["name"] == "simulator")
        .expect("simulator listed");
    let devices = sim["options"]
        .as_array()
        .expect("options")
        .iter()
        .find(|o| o["name"] == "devices")
        .expect("devices option");
    assert_eq!(devices["default"], "10");
    assert!(!devices["description"].as_str().unwrap_or("").is_empty());
    // Every option of every built-in component is documented.
    for d in docs.as_array().expect("array") {
        for o in d["options"].as_array().expect("options") {
            assert!(
                !o["description"].as_str().unwrap_or("").is_empty(),
                "{} {} option {} has no description",
                d["kind"],
                d["name"],
                o["name"]
            );
        }
    }
}

#[test]
fn demo_runs_to_count_and_writes_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = sluice()
        .args(["demo", "--count", "40", "--status-interval", "1s"])
        .env("SLUICE_DATA_DIR", dir.path())
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("device_id=dev-0001"), "{stdout}");
    assert!(stderr.contains("[sluice"), "rate line missing: {stderr}");
    let records = std::fs::read_to_string(dir.path().join("demo/records.jsonl")).expect("records");
    let dead =
        std::fs::read_to_string(dir.path().join("demo/dead_letter.jsonl")).unwrap_or_default();
    assert_eq!(records.lines().count() + dead.lines().count(), 40);
    assert!(dead.lines().all(|l| l.contains("\"error\":\"invalid JSON")));
}

#[test]
fn sigint_drains_flushes_and_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_file = dir.path().join("out.jsonl");
    let file = write(
        dir.path(),
        "endless.toml",
        &format!(
            "[sources.sim]\ntype = \"simulator\"\nrate = 2000\n\n[sinks.out]\ntype = \"file\"\ninputs = [\"sim\"]\npath = {:?}\nbatch = {{ max_records = 100000, max_age = \"1h\" }}\n",
            out_file.display().to_string()
        ),
    );
    let mut child = sluice()
        .arg("run")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns");
    std::thread::sleep(Duration::from_millis(1500));
    // The sink batches for an hour: nothing is written until the shutdown flush.
    assert_eq!(
        std::fs::metadata(&out_file).map(|m| m.len()).unwrap_or(0),
        0
    );
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read");
    assert_eq!(status.code(), Some(0), "{stderr}");
    let written = std::fs::read_to_string(&out_file).expect("flushed on shutdown");
    let n = written.lines().count();
    assert!(n > 1000, "only {n} records flushed");
    // Everything the source emitted was written: the final totals line says so.
    assert!(stderr.contains(&format!("sim out {n}")), "{stderr}");
    assert!(
        stderr.contains(&format!("out in {n} written {n}")),
        "{stderr}"
    );
}
