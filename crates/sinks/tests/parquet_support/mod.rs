//! Shared helpers of the parquet sink's integration tests: running a pipeline in-process and
//! reading the output back with DuckDB from the services venv (an independent reader).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use sluice_core::config::parse_str;
use sluice_core::metrics::Metrics;
use sluice_core::registry::Registry;
use sluice_core::topology;

/// Runs the pipeline in `toml` to completion (its sources must stop by themselves).
pub async fn run_pipeline(toml: &str) {
    // Component logs (RUST_LOG=debug for file-level detail) help when an assertion fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    let mut registry = Registry::new();
    sluice_sources::register(&mut registry);
    sluice_sinks::register(&mut registry);
    let config = parse_str(toml, Path::new("test.toml")).unwrap_or_else(|e| {
        panic!(
            "pipeline does not parse: {}",
            e.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    topology::run(config, &registry, &Metrics::new(), None)
        .await
        .expect("pipeline runs");
}

/// The services directory (`SLUICE_SERVICES_DIR`, default /tmp/sluice-services).
pub fn services_dir() -> PathBuf {
    std::env::var_os("SLUICE_SERVICES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/sluice-services"))
}

/// Python of the services venv, which has DuckDB (+ httpfs) and pyarrow.
pub fn python() -> PathBuf {
    let py = services_dir().join("venv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: the DuckDB reader is installed by `scripts/services.sh start`",
        py.display()
    );
    py
}

/// Runs `sql` in DuckDB (with S3 set up for moto when `s3`) and returns the rows as JSON
/// arrays of strings.
pub fn duckdb(sql: &str, s3: bool) -> Vec<Vec<String>> {
    let program = r#"
import duckdb, glob, json, os, sys
con = duckdb.connect()
if sys.argv[2] == "1":
    # The extension file shipped by the duckdb-ext-httpfs package (INSTALL would download).
    site = os.path.dirname(os.path.dirname(duckdb.__file__))
    paths = glob.glob(os.path.join(site, "duckdb_ext", "**", "httpfs.duckdb_extension"), recursive=True)
    if not paths:
        sys.exit("httpfs extension file not found in the venv: run scripts/services.sh start")
    con.execute(f"LOAD '{paths[0]}'")
    con.execute("CREATE SECRET (TYPE s3, KEY_ID 'test', SECRET 'test', REGION 'us-east-1', ENDPOINT '127.0.0.1:5000', URL_STYLE 'path', USE_SSL false)")
rows = con.execute(sys.argv[1]).fetchall()
print(json.dumps([[None if v is None else str(v) for v in row] for row in rows]))
"#;
    let out = Command::new(python())
        .arg("-c")
        .arg(program)
        .arg(sql)
        .arg(if s3 { "1" } else { "0" })
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "DuckDB query failed: {sql}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Vec<Option<String>>> =
        serde_json::from_slice(&out.stdout).expect("DuckDB output is JSON");
    rows.into_iter()
        .map(|r| {
            r.into_iter()
                .map(|v| v.unwrap_or_else(|| "NULL".into()))
                .collect()
        })
        .collect()
}

/// Per-device figures: record count, sum of `temp`, min and max time (µs since epoch).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DeviceStats {
    pub count: u64,
    pub temp_sum: f64,
    pub min_us: i64,
    pub max_us: i64,
}

/// Figures of what the source produced, from a JSON-lines file written by a `file` sink beside
/// the parquet sink in the same pipeline.
pub fn expected_from_jsonl(path: &Path) -> BTreeMap<String, DeviceStats> {
    let text = std::fs::read_to_string(path).expect("read jsonl");
    let mut stats: BTreeMap<String, DeviceStats> = BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("jsonl line");
        let device = v["tags"]["device_id"]
            .as_str()
            .expect("device_id")
            .to_string();
        let time = sluice_core::json::parse_time(v["time"].as_str().expect("time"))
            .expect("rfc3339")
            / 1_000;
        let temp = v["fields"]["temp"].as_f64().expect("temp");
        let s = stats.entry(device).or_insert(DeviceStats {
            min_us: i64::MAX,
            max_us: i64::MIN,
            ..Default::default()
        });
        s.count += 1;
        s.temp_sum += temp;
        s.min_us = s.min_us.min(time);
        s.max_us = s.max_us.max(time);
    }
    stats
}

/// The same figures read from Parquet files by DuckDB (`files` is a DuckDB path or glob).
pub fn actual_from_parquet(files: &str, s3: bool) -> BTreeMap<String, DeviceStats> {
    let rows = duckdb(
        &format!(
            "SELECT device_id, count(*), sum(temp), epoch_us(min(time)), epoch_us(max(time)) \
             FROM read_parquet('{files}', hive_partitioning = true) GROUP BY device_id ORDER BY device_id"
        ),
        s3,
    );
    rows.into_iter()
        .map(|r| {
            (
                r[0].clone(),
                DeviceStats {
                    count: r[1].parse().expect("count"),
                    temp_sum: r[2].parse().expect("sum"),
                    min_us: r[3].parse().expect("min"),
                    max_us: r[4].parse().expect("max"),
                },
            )
        })
        .collect()
}

/// Asserts both sides agree (sums within floating-point summation error).
pub fn assert_same(
    expected: &BTreeMap<String, DeviceStats>,
    actual: &BTreeMap<String, DeviceStats>,
) {
    assert_eq!(
        expected.keys().collect::<Vec<_>>(),
        actual.keys().collect::<Vec<_>>(),
        "devices differ"
    );
    for (device, e) in expected {
        let a = &actual[device];
        assert_eq!(e.count, a.count, "count of {device}");
        assert_eq!(e.min_us, a.min_us, "min time of {device}");
        assert_eq!(e.max_us, a.max_us, "max time of {device}");
        assert!(
            (e.temp_sum - a.temp_sum).abs() <= 1e-9 * e.temp_sum.abs().max(1.0),
            "sum of temp of {device}: expected {} got {}",
            e.temp_sum,
            a.temp_sum
        );
    }
}

/// Every file under `dir` (recursively), relative paths sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).expect("under dir").to_path_buf());
            }
        }
    }
    out.sort();
    out
}
