//! `kill -9` of `sluice run` while the parquet sink is writing: no partial file is visible, and a
//! restart (the simulator replays the same stream from its seed) leaves every record in the
//! lake. Files are read back with DuckDB from the services venv (`scripts/services.sh start`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn python() -> PathBuf {
    let dir = std::env::var_os("SLUICE_SERVICES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/sluice-services"));
    let py = dir.join("venv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: the DuckDB reader is installed by `scripts/services.sh start`",
        py.display()
    );
    py
}

/// One row of a DuckDB query, as strings.
fn duckdb_row(sql: &str) -> Vec<String> {
    let out = Command::new(python())
        .arg("-c")
        .arg("import duckdb, json, sys; print(json.dumps([str(v) for v in duckdb.sql(sys.argv[1]).fetchone()]))")
        .arg(sql)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "DuckDB failed on {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json row")
}

fn files(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let (mut done, mut temp) = (Vec::new(), Vec::new());
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            if p.is_dir() {
                stack.push(p);
            } else if name.ends_with(".parquet") && !name.starts_with('.') {
                done.push(p);
            } else {
                temp.push(p);
            }
        }
    }
    (done, temp)
}

fn pipeline(lake: &Path, rate: &str) -> String {
    format!(
        r#"
[sources.sim]
type = "simulator"
devices = 10
rate = {rate}
count = 200000
seed = 3
start_time = "2026-03-01T00:00:00Z"

[sinks.lake]
type = "parquet"
inputs = ["sim"]
destination = "{}"
key = "device={{device_id}}/"
max_records = 4000
max_age = "1s"
cleanup_after = "2s"
batch = {{ max_records = 1000, max_age = "100ms" }}
"#,
        lake.display()
    )
}

#[test]
fn kill_9_leaves_no_partial_file_and_restart_loses_nothing() {
    python();
    let dir = tempfile::tempdir().expect("tempdir");
    let lake = dir.path().join("lake");
    let config = dir.path().join("crash.toml");
    // 20,000 records/s: the run would take 10 s; it is killed after the first files appear.
    std::fs::write(&config, pipeline(&lake, "20000")).expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sluice starts");
    let started = Instant::now();
    loop {
        let (done, temp) = files(&lake);
        if done.len() >= 10 && !temp.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no files after 60 s: {done:?} {temp:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("SIGKILL"); // std's kill is SIGKILL on Unix
    child.wait().expect("reaped");

    let (done, temp) = files(&lake);
    assert!(
        !temp.is_empty(),
        "the kill should have caught files being written"
    );
    assert!(
        temp.iter().all(|t| {
            let name = t
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            name.starts_with('.') && name.ends_with(".tmp")
        }),
        "in-progress files must be hidden temporaries: {temp:?}"
    );
    // Every visible file is complete: DuckDB reads all of them (a file without its footer
    // would fail the whole query).
    let glob = format!("{}/**/*.parquet", lake.display());
    let before: u64 = duckdb_row(&format!("SELECT count(*) FROM read_parquet('{glob}')"))[0]
        .parse()
        .expect("count");
    assert!(
        before > 0 && before < 200_000,
        "{before} records before the kill"
    );
    assert!(done.len() >= 10, "{} files", done.len());

    // Restart after the leftovers are older than cleanup_after: they are removed, and the
    // replayed stream fills in everything.
    std::thread::sleep(Duration::from_millis(2200));
    std::fs::write(&config, pipeline(&lake, "\"unlimited\"")).expect("write config");
    let status = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("sluice runs");
    assert!(status.success(), "restart failed: {status:?}");
    let (_, temp) = files(&lake);
    assert!(
        temp.is_empty(),
        "leftover temporaries after restart: {temp:?}"
    );
    let row = duckdb_row(&format!(
        "SELECT count(*), count(DISTINCT (device_id, seq)), min(seq), max(seq) FROM read_parquet('{glob}')"
    ));
    assert_eq!(row[0].parse::<u64>().expect("count"), before + 200_000);
    assert_eq!(row[1], "200000", "every record of the stream is present");
    assert_eq!((row[2].as_str(), row[3].as_str()), ("1", "20000"));
}
