//! The `sluice` binary end to end: validation errors, the demo, graceful shutdown on SIGINT.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `sluice` with its state (disk buffers, anomaly baselines) in a data directory of this test
/// process, never in the crate directory: a run must not inherit state from an earlier run.
fn sluice() -> Command {
    let data =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-data-{}", std::process::id()));
    let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
    c.env("SLUICE_DATA_DIR", data);
    c
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

/// Records a component rejects under an acknowledging source are acknowledged even when
/// nothing reads its `dead_letter` output: `validate` says so, with the fix, and still passes.
#[test]
fn validate_warns_about_unconsumed_dead_letters_under_acknowledging_sources() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        "acks.toml",
        r#"[sources.devices]
type = "mqtt"
url = "mqtt://127.0.0.1:1883"
topics = ["devices/+/data"]
qos = 1

[transforms.dd]
type = "dedupe"
inputs = ["devices"]
key = ["tags.device_id", "seq"]

[sinks.out]
type = "console"
inputs = ["dd"]

[sinks.dead]
type = "console"
inputs = ["devices.dead_letter"]

[sources.sim]
type = "simulator"

[transforms.sim_dd]
type = "dedupe"
inputs = ["sim"]
key = ["tags.device_id", "seq"]

[sinks.sim_out]
type = "console"
inputs = ["sim_dd"]
"#,
    );
    let out = sluice().arg("validate").arg(&file).output().expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "a warning, not an error: {stderr}"
    );
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    let w = warnings[0];
    assert!(
        w.contains("acks.toml:7: transforms.dd:"),
        "file, line, component: {w}"
    );
    assert!(
        w.contains("`devices`"),
        "names the acknowledging source: {w}"
    );
    assert!(
        w.contains(r#"add a sink with inputs = ["dd.dead_letter"]"#),
        "names the fix: {w}"
    );
}

/// An aggregate holding acknowledgements for an hour behind an MQTT source (30 s keep-alive)
/// warns, naming the stage and the fix; with the fix (a disk buffer) the warning is gone.
#[test]
fn validate_warns_about_holds_longer_than_the_source_tolerates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = r#"[sources.in]
type = "mqtt"
url = "mqtt://127.0.0.1:1883"
topics = ["devices/+/data"]

[transforms.hourly]
type = "aggregate"
inputs = ["in"]
window = "1h"
fields = { temp = ["mean"] }
BUFFER

[sinks.out]
type = "console"
inputs = ["hourly"]

[sinks.dead]
type = "console"
inputs = ["in.dead_letter", "hourly.dead_letter"]
"#;
    let validate = |buffer: &str| {
        let file = write(dir.path(), "hold.toml", &text.replace("BUFFER", buffer));
        let out = sluice().arg("validate").arg(&file).output().expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(
            out.status.code(),
            Some(0),
            "a warning, not an error: {stderr}"
        );
        stderr
            .lines()
            .filter(|l| l.starts_with("warning:"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let warnings = validate("");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let w = &warnings[0];
    assert!(
        w.contains("hold.toml:6: transforms.hourly:"),
        "file, line, component: {w}"
    );
    assert!(
        w.contains("holds acknowledgements up to 1h 10s (window + allowed_lateness) but source `in` tolerates 30s (keep_alive)"),
        "the hold and the tolerance: {w}"
    );
    assert!(
        w.contains(r#"add buffer = { type = "disk" } to `hourly`"#),
        "names the fix: {w}"
    );
    let fixed = validate(r#"buffer = { type = "disk", max_size = "64MiB" }"#);
    assert_eq!(fixed, Vec::<String>::new());
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

#[test]
fn stdin_to_file_then_file_source_reads_it_back() {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("tempdir");
    let first = dir.path().join("first.jsonl");
    let second = dir.path().join("second.jsonl");
    let from_stdin = write(
        dir.path(),
        "stdin.toml",
        &format!(
            "[sources.in]\ntype = \"stdin\"\ndecode = {{ tags = [\"device\"] }}\n\n[sinks.out]\ntype = \"file\"\ninputs = [\"in\"]\npath = {:?}\n\n[sinks.bad]\ntype = \"file\"\ninputs = [\"in.dead_letter\"]\npath = {:?}\n",
            first.display().to_string(),
            dir.path().join("bad.jsonl").display().to_string()
        ),
    );
    let mut child = sluice()
        .arg("run")
        .arg(&from_stdin)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        for i in 0..500 {
            writeln!(
                stdin,
                "{{\"ts\":{},\"device\":\"d{}\",\"v\":{i}}}",
                1_700_000_000_000i64 + i,
                i % 7
            )
            .expect("write");
        }
        writeln!(stdin, "not json").expect("write");
    }
    let out = child.wait_with_output().expect("exits at end of input");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&first)
            .expect("out")
            .lines()
            .count(),
        500
    );
    let bad = std::fs::read_to_string(dir.path().join("bad.jsonl")).expect("dead letters");
    assert_eq!(bad.lines().count(), 1);
    assert!(bad.contains("\"payload\":\"not json\""), "{bad}");

    // The record codec reads the file sink's output back with the same tags, fields and types.
    let from_file = write(
        dir.path(),
        "file.toml",
        &format!(
            "[sources.in]\ntype = \"file\"\npath = {:?}\ndecode = {{ codec = \"record\" }}\n\n[sinks.out]\ntype = \"file\"\ninputs = [\"in\"]\npath = {:?}\n",
            first.display().to_string(),
            second.display().to_string()
        ),
    );
    let out = sluice().arg("run").arg(&from_file).output().expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = std::fs::read_to_string(&first).expect("first");
    let b = std::fs::read_to_string(&second).expect("second");
    let strip = |s: &str| -> Vec<serde_json::Value> {
        s.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).expect("json");
                v.as_object_mut().expect("object").remove("source");
                v
            })
            .collect()
    };
    assert_eq!(strip(&a), strip(&b));
    assert!(a.contains("\"tags\":{\"device\":\"d3\"}"), "{a}");
}

#[test]
fn metrics_and_health_endpoints() {
    use std::io::Write;
    use std::net::TcpStream;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        "m.toml",
        "[sources.sim]\ntype = \"simulator\"\nrate = 500\n\n[sinks.hole]\ntype = \"blackhole\"\ninputs = [\"sim\"]\n",
    );
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        l.local_addr().expect("addr").port()
    };
    let mut child = sluice()
        .arg("run")
        .arg(&file)
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawns");
    let get = |path: &str| -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        Some(body)
    };
    let started = Instant::now();
    let metrics = loop {
        if let Some(m) = get("/metrics") {
            if m.contains("sluice_component_records_out_total{component=\"sim\",kind=\"source\"} ")
                && !m.contains("kind=\"source\"} 0\r\n")
            {
                break m;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "metrics never served"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let health = get("/health").expect("health");
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().expect("exits");
    assert!(health.starts_with("HTTP/1.1 200 OK"), "{health}");
    assert!(
        metrics.contains("# TYPE sluice_component_records_in_total counter"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_component_records_in_total{component=\"hole\",kind=\"sink\"}"),
        "{metrics}"
    );
    assert_eq!(status.code(), Some(0), "SIGTERM is a graceful shutdown");
}

#[test]
fn every_example_pipeline_validates() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../pipelines");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).expect("pipelines dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let out = sluice()
            .arg("validate")
            .arg(&path)
            // Secrets the examples take from the environment.
            .env("INFLUX_TOKEN", "test-token")
            .env("MQTT_PASSWORD", "test-password")
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {stderr}", path.display());
        assert!(
            !stderr.contains("holds acknowledgements"),
            "{}: add the disk buffer the warning names: {stderr}",
            path.display()
        );
        checked += 1;
    }
    assert!(checked >= 6, "only {checked} pipeline files found");
}
