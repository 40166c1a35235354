//! The parquet sink on a local directory: simulator → Parquet, read back with DuckDB (from the
//! services venv: `scripts/services.sh start`); rotation and open-file limits; schema evolution
//! and the mismatch policies; the jsonl format.

mod parquet_support;

use std::path::Path;

use parquet_support::*;

fn sim(count: u64, devices: usize) -> String {
    format!(
        r#"
[sources.sim]
type = "simulator"
devices = {devices}
rate = "unlimited"
count = {count}
seed = 7
start_time = "2026-03-01T00:00:00Z"
batch_size = 500
"#
    )
}

/// 100,000 simulator records → hive-partitioned Parquet on disk → DuckDB agrees with what the
/// source produced (counts, sums per device, min/max time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_round_trip_read_back_with_duckdb() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lake = dir.path().join("lake");
    let copy = dir.path().join("copy.jsonl");
    let toml = format!(
        r#"{}
[sinks.lake]
type = "parquet"
inputs = ["sim"]
destination = "file://{}"
key = "date={{%Y-%m-%d}}/hour={{%H}}/"
max_age = "1m"

[sinks.copy]
type = "file"
inputs = ["sim"]
path = "{}"
fsync = false
"#,
        sim(100_000, 20),
        lake.display(),
        copy.display()
    );
    run_pipeline(&toml).await;

    let files = files_under(&lake);
    assert!(!files.is_empty(), "no files written");
    for f in &files {
        let s = f.to_string_lossy();
        assert!(s.ends_with(".parquet"), "leftover non-parquet file {s}");
        assert!(
            s.starts_with("date=2026-03-01/hour="),
            "not hive-partitioned: {s}"
        );
    }
    // 100,000 records of 20 devices at 1 s intervals span 5,000 s: hours 00 and 01.
    let hours: std::collections::BTreeSet<_> = files
        .iter()
        .filter_map(|f| f.parent().map(|p| p.to_string_lossy().to_string()))
        .collect();
    assert_eq!(
        hours.into_iter().collect::<Vec<_>>(),
        vec!["date=2026-03-01/hour=00", "date=2026-03-01/hour=01"]
    );

    let expected = expected_from_jsonl(&copy);
    assert_eq!(expected.values().map(|s| s.count).sum::<u64>(), 100_000);
    let actual = actual_from_parquet(&format!("{}/**/*.parquet", lake.display()), false);
    assert_same(&expected, &actual);

    // Column types as the issue asks: UTC timestamp, dictionary tags read as VARCHAR, typed fields.
    let types = duckdb(
        &format!(
            "SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet('{}/**/*.parquet', hive_partitioning = true)) ORDER BY column_name",
            lake.display()
        ),
        false,
    );
    let types: std::collections::BTreeMap<_, _> = types
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect();
    assert_eq!(types["time"], "TIMESTAMP WITH TIME ZONE");
    assert_eq!(types["device_id"], "VARCHAR");
    assert_eq!(types["temp"], "DOUBLE");
    assert_eq!(types["seq"], "BIGINT");
    assert!(
        types.contains_key("hour") && types.contains_key("date"),
        "hive partition columns: {types:?}"
    );
    let codec = duckdb(
        &format!(
            "SELECT DISTINCT compression FROM parquet_metadata('{}/**/*.parquet')",
            lake.display()
        ),
        false,
    );
    assert_eq!(codec, vec![vec!["ZSTD".to_string()]]);
}

/// `max_records` is exact, `max_file_size` is respected within one write, and with
/// `max_open_files` below the number of partitions every record still lands exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_and_open_file_limits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let by_count = dir.path().join("by_count");
    let by_size = dir.path().join("by_size");
    let toml = format!(
        r#"{}
[sinks.by_count]
type = "parquet"
inputs = ["sim"]
destination = "{}"
key = "device={{device_id}}/"
max_records = 400
max_open_files = 3
batch = {{ max_records = 1000 }}

[sinks.by_size]
type = "parquet"
inputs = ["sim"]
destination = "{}"
key = ""
row_group_size = 1000
compression = "none"
max_file_size = "32KiB"
batch = {{ max_records = 1000 }}
"#,
        sim(20_000, 10),
        by_count.display(),
        by_size.display()
    );
    run_pipeline(&toml).await;

    // max_records: exact, per file, and nothing lost or duplicated.
    let rows = duckdb(
        &format!(
            "SELECT filename, count(*), count(DISTINCT device_id), min(device) = min(device_id) FROM read_parquet('{}/**/*.parquet', hive_partitioning = true, filename = true) GROUP BY filename",
            by_count.display()
        ),
        false,
    );
    let mut total = 0;
    for r in &rows {
        let n: u64 = r[1].parse().expect("count");
        assert!(
            n <= 400,
            "file {} holds {n} records > max_records 400",
            r[0]
        );
        assert_eq!(r[2], "1", "a file mixes partitions: {}", r[0]);
        assert_eq!(r[3], "True", "partition path and tag disagree: {}", r[0]);
        total += n;
    }
    assert_eq!(total, 20_000);
    // 10 partitions of 2,000 records each: at least 5 files each; with only 3 open files and
    // batches that interleave all 10 devices, files are also closed early (LRU), so more.
    assert!(rows.len() >= 50, "{} files", rows.len());
    let distinct = duckdb(
        &format!(
            "SELECT count(*), count(DISTINCT (device_id, seq)) FROM read_parquet('{}/**/*.parquet')",
            by_count.display()
        ),
        false,
    );
    assert_eq!(
        distinct,
        vec![vec!["20000".to_string(), "20000".to_string()]]
    );

    // max_file_size: a file is closed by the first write that takes it to 32 KiB; one write
    // (1000 records = one row group here) adds about 12 KiB.
    let files = files_under(&by_size);
    assert!(files.len() >= 5, "expected several files, got {files:?}");
    for (i, f) in files.iter().enumerate() {
        let size = std::fs::metadata(by_size.join(f)).expect("stat").len();
        assert!(
            size <= 32 * 1024 + 20 * 1024,
            "{} is {size} bytes",
            f.display()
        );
        if i + 1 < files.len() {
            assert!(
                size >= 32 * 1024,
                "{} closed early at {size} bytes",
                f.display()
            );
        }
    }
    let count = duckdb(
        &format!(
            "SELECT count(*) FROM read_parquet('{}/*.parquet')",
            by_size.display()
        ),
        false,
    );
    assert_eq!(count, vec![vec!["20000".to_string()]]);
    // Names sort in creation order: time, instance id, sequence.
    let names: Vec<String> = files
        .iter()
        .map(|f| f.to_string_lossy().to_string())
        .collect();
    let seqs: Vec<u64> = names
        .iter()
        .map(|n| {
            n.trim_end_matches(".parquet")
                .rsplit('-')
                .next()
                .and_then(|s| s.parse().ok())
                .expect("sequence in name")
        })
        .collect();
    let mut sorted = seqs.clone();
    sorted.sort();
    assert_eq!(
        seqs, sorted,
        "file names do not sort in creation order: {names:?}"
    );
}

fn write_input(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").expect("write input");
}

fn file_source(path: &Path) -> String {
    format!(
        r#"
[sources.input]
type = "file"
path = "{}"
decode = {{ codec = "json", time_key = "ts", time_unit = "ms", tags = ["device_id"] }}
"#,
        path.display()
    )
}

/// Inferred schema: a field appearing midway opens a new file with the new column; an integer
/// field that turns fractional widens to DOUBLE in a new file; a string in a numeric column is
/// coerced when numeric and dead-lettered otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_evolution_inferred() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.jsonl");
    let lake = dir.path().join("lake");
    let dead = dir.path().join("dead.jsonl");
    let t0 = 1_772_323_200_000i64; // 2026-03-01T00:00:00Z in ms
    let mut lines = Vec::new();
    for i in 0..100 {
        lines.push(format!(
            r#"{{"ts":{},"device_id":"a","temp":20.5,"level":{i}}}"#,
            t0 + i
        ));
    }
    for i in 100..200 {
        // `humidity` appears.
        lines.push(format!(
            r#"{{"ts":{},"device_id":"a","temp":21.5,"level":{i},"humidity":40.0}}"#,
            t0 + i
        ));
    }
    for i in 200..300 {
        // `level` becomes fractional: widened to f64.
        lines.push(format!(
            r#"{{"ts":{},"device_id":"a","temp":22.5,"level":{i}.5}}"#,
            t0 + i
        ));
    }
    // A numeric string is coerced, a non-numeric one is dead-lettered.
    lines.push(format!(
        r#"{{"ts":{},"device_id":"a","temp":"23.5","level":1}}"#,
        t0 + 300
    ));
    lines.push(format!(
        r#"{{"ts":{},"device_id":"a","temp":"hot","level":1}}"#,
        t0 + 301
    ));
    write_input(&input, &lines);
    let toml = format!(
        r#"{}
[sinks.lake]
type = "parquet"
inputs = ["input"]
destination = "{}"
key = ""
batch = {{ max_records = 50 }}

[sinks.dead]
type = "file"
inputs = ["lake.dead_letter"]
path = "{}"
"#,
        file_source(&input),
        lake.display(),
        dead.display()
    );
    run_pipeline(&toml).await;

    let files = files_under(&lake);
    assert_eq!(files.len(), 3, "one file per schema: {files:?}");
    let schemas = duckdb(
        &format!(
            "SELECT file_name, string_agg(name || ':' || type, ',' ORDER BY name) FROM parquet_schema('{}/*.parquet') WHERE type IS NOT NULL GROUP BY file_name ORDER BY file_name",
            lake.display()
        ),
        false,
    );
    let schemas: Vec<&str> = schemas.iter().map(|r| r[1].as_str()).collect();
    assert_eq!(
        schemas,
        vec![
            "device_id:BYTE_ARRAY,level:INT64,temp:DOUBLE,time:INT64",
            "device_id:BYTE_ARRAY,humidity:DOUBLE,level:INT64,temp:DOUBLE,time:INT64",
            "device_id:BYTE_ARRAY,humidity:DOUBLE,level:DOUBLE,temp:DOUBLE,time:INT64",
        ]
    );
    let rows = duckdb(
        &format!(
            "SELECT count(*), count(humidity), sum(level), sum(temp) FROM read_parquet('{}/*.parquet', union_by_name = true)",
            lake.display()
        ),
        false,
    );
    let level_sum: f64 = (0..300).map(|i| i as f64).sum::<f64>() + 100.0 * 0.5 + 1.0;
    let temp_sum = 100.0 * 20.5 + 100.0 * 21.5 + 100.0 * 22.5 + 23.5;
    assert_eq!(rows[0][0], "301");
    assert_eq!(rows[0][1], "100");
    assert_eq!(rows[0][2].parse::<f64>().expect("f64"), level_sum);
    assert_eq!(rows[0][3].parse::<f64>().expect("f64"), temp_sum);

    let dead = std::fs::read_to_string(&dead).expect("dead letters");
    let dead: Vec<&str> = dead.lines().collect();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0].contains("\"hot\"") && dead[0].contains("does not fit column type f64"),
        "{}",
        dead[0]
    );
}

/// Declared schema with `on_mismatch = "dead_letter"`: undeclared fields are not written, an
/// integer in a float column is accepted, anything else mismatching is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_schema_dead_letters_mismatches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.jsonl");
    let lake = dir.path().join("lake");
    let dead = dir.path().join("dead.jsonl");
    let t0 = 1_772_323_200_000i64;
    let lines = vec![
        format!(r#"{{"ts":{t0},"device_id":"a","temp":20.5,"ok":true,"extra":1}}"#),
        format!(
            r#"{{"ts":{},"device_id":"a","temp":21,"ok":false}}"#,
            t0 + 1
        ),
        format!(
            r#"{{"ts":{},"device_id":"a","temp":"21.5","ok":true}}"#,
            t0 + 2
        ),
        format!(
            r#"{{"ts":{},"device_id":"a","temp":22.5,"ok":"yes"}}"#,
            t0 + 3
        ),
    ];
    write_input(&input, &lines);
    let toml = format!(
        r#"{}
[sinks.lake]
type = "parquet"
inputs = ["input"]
destination = "{}"
key = "device={{device_id}}/"
schema = {{ temp = "f64", ok = "bool" }}
on_mismatch = "dead_letter"
time_unit = "ns"

[sinks.dead]
type = "file"
inputs = ["lake.dead_letter"]
path = "{}"
"#,
        file_source(&input),
        lake.display(),
        dead.display()
    );
    run_pipeline(&toml).await;
    let rows = duckdb(
        &format!(
            "SELECT epoch_us(time), device_id, temp, ok FROM read_parquet('{}/**/*.parquet', hive_partitioning = true) ORDER BY time",
            lake.display()
        ),
        false,
    );
    assert_eq!(
        rows,
        vec![
            vec!["1772323200000000", "a", "20.5", "True"],
            vec!["1772323200001000", "a", "21.0", "False"],
        ]
        .into_iter()
        .map(|r| r.into_iter().map(String::from).collect::<Vec<_>>())
        .collect::<Vec<_>>()
    );
    let ns = duckdb(
        &format!(
            "SELECT type, logical_type FROM parquet_schema('{}/**/*.parquet') WHERE name = 'time'",
            lake.display()
        ),
        false,
    );
    assert!(ns[0][1].contains("NANOS"), "time unit: {ns:?}");
    let dead = std::fs::read_to_string(&dead).expect("dead letters");
    assert_eq!(dead.lines().count(), 2, "{dead}");
    assert!(dead.contains("on_mismatch = dead_letter"), "{dead}");
}

/// `format = "jsonl"` with gzip: the raw archive layout, every record once, readable by DuckDB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_gzip_archive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("raw");
    let toml = format!(
        r#"{}
[sinks.raw]
type = "parquet"
inputs = ["sim"]
destination = "{}"
format = "jsonl"
compression = "gzip"
key = "raw/{{device_id}}/{{%Y/%m/%d}}/"
max_records = 300
"#,
        sim(3_000, 5),
        raw.display()
    );
    run_pipeline(&toml).await;
    let files = files_under(&raw);
    assert!(
        files
            .iter()
            .all(|f| f.to_string_lossy().ends_with(".jsonl.gz")),
        "{files:?}"
    );
    assert!(files[0].starts_with("raw/dev-0001/2026/03/01"), "{files:?}");
    assert_eq!(
        files.len(),
        10,
        "5 devices × 600 records / 300 per file: {files:?}"
    );
    let rows = duckdb(
        &format!(
            "SELECT count(*), count(DISTINCT tags.device_id) FROM read_json('{}/raw/*/*/*/*/*.jsonl.gz', format = 'newline_delimited')",
            raw.display()
        ),
        false,
    );
    assert_eq!(rows, vec![vec!["3000".to_string(), "5".to_string()]]);
}

mod ack_probe {
    //! A source that acknowledges: for each of its batches it records the final status and the
    //! set of files visible in the lake at the moment the status arrived.

    use std::collections::BTreeSet;
    use std::path::PathBuf;
    use std::sync::Mutex;
    use std::time::Duration;

    use async_trait::async_trait;
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};
    use sluice_core::ack::{self, BatchStatus, Finalizers};
    use sluice_core::record::{Batch, Record, Value};
    use sluice_core::registry::{BuildContext, SourceConfig};
    use sluice_core::source::{Source, SourceContext};
    use sluice_core::BoxError;

    /// (batch number, status, visible files when the status arrived).
    pub static SEEN: Mutex<Vec<(u64, BatchStatus, BTreeSet<String>)>> = Mutex::new(Vec::new());

    #[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct ProbeConfig {
        /// Batches to send.
        pub batches: u64,
        /// Records per batch.
        pub size: u64,
        /// The lake directory to list when a status arrives.
        pub lake: PathBuf,
    }

    #[async_trait]
    impl SourceConfig for ProbeConfig {
        async fn build(&self, _cx: &BuildContext) -> Result<Box<dyn Source>, BoxError> {
            Ok(Box::new(self.clone()))
        }
    }

    #[async_trait]
    impl Source for ProbeConfig {
        fn can_acknowledge(&self) -> bool {
            true
        }

        async fn run(self: Box<Self>, cx: SourceContext) -> Result<(), BoxError> {
            let mut waiters = Vec::new();
            for b in 0..self.batches {
                let (f, status) = ack::batch();
                let records = (0..self.size)
                    .map(|i| {
                        let seq = (b * self.size + i) as i64;
                        let mut r = Record::new(1_772_323_200_000_000_000 + seq * 1_000_000);
                        r.set_tag("device_id", format!("d{}", b % 4).as_str());
                        r.set_field("seq", Value::I64(seq));
                        r.finalizers = Finalizers::one(f.clone());
                        r
                    })
                    .collect();
                f.finish(BatchStatus::Delivered);
                cx.out.send(Batch::new(records)).await?;
                let lake = self.lake.clone();
                waiters.push(tokio::spawn(async move {
                    let s = status.await;
                    let visible = super::files_under(&lake)
                        .into_iter()
                        .map(|p| p.to_string_lossy().to_string())
                        .filter(|n| n.ends_with(".parquet"))
                        .collect();
                    SEEN.lock().expect("lock").push((b, s, visible));
                }));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            drop(cx.out);
            for w in waiters {
                w.await?;
            }
            Ok(())
        }
    }
}

/// A source's batch is acknowledged only once every one of its records is in a complete,
/// visible file: at the moment each status arrives, the files then visible already hold the
/// whole batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_only_when_the_file_is_complete() {
    use sluice_core::ack::BatchStatus;
    let dir = tempfile::tempdir().expect("tempdir");
    let lake = dir.path().join("lake");
    std::fs::create_dir_all(&lake).expect("mkdir");
    let toml = format!(
        r#"
[sources.probe]
type = "probe"
batches = 200
size = 50
lake = "{0}"

[sinks.lake]
type = "parquet"
inputs = ["probe"]
destination = "{0}"
key = "device={{device_id}}/"
max_records = 700
max_age = "300ms"
batch = {{ max_records = 100, max_age = "20ms" }}
"#,
        lake.display()
    );
    let mut registry = sluice_core::registry::Registry::new();
    registry.source::<ack_probe::ProbeConfig>("probe");
    sluice_sinks::register(&mut registry);
    let config = sluice_core::config::parse_str(&toml, Path::new("ack.toml")).expect("parses");
    sluice_core::topology::run(
        config,
        &registry,
        &sluice_core::metrics::Metrics::new(),
        None,
    )
    .await
    .expect("runs");

    let seen = std::mem::take(&mut *ack_probe::SEEN.lock().expect("lock"));
    assert_eq!(seen.len(), 200);
    // seq → file (relative path) from an independent reader.
    let rows = duckdb(
        &format!(
            "SELECT seq, filename FROM read_parquet('{}/**/*.parquet', filename = true)",
            lake.display()
        ),
        false,
    );
    assert_eq!(rows.len(), 10_000);
    let prefix = format!("{}/", lake.display());
    let file_of: std::collections::HashMap<i64, String> = rows
        .into_iter()
        .map(|r| {
            (
                r[0].parse().expect("seq"),
                r[1].trim_start_matches(&prefix).to_string(),
            )
        })
        .collect();
    let mut acked_while_running = 0;
    for (b, status, visible) in &seen {
        assert_eq!(*status, BatchStatus::Delivered, "batch {b}");
        for seq in (b * 50)..(b * 50 + 50) {
            let file = &file_of[&(seq as i64)];
            assert!(
                visible.contains(file),
                "batch {b} acknowledged before {file} (holding seq {seq}) was complete"
            );
        }
        if visible.len() < files_under(&lake).len() {
            acked_while_running += 1;
        }
    }
    // Files closed by max_records / max_age during the run acknowledged their batches then,
    // not only at shutdown.
    assert!(acked_while_running > 0);
}

/// Issue 13 item 6: a partition value too long for a file name (a 300-character device id:
/// `ENAMETOOLONG` before) is hash-truncated: every directory name stays under 255 bytes, keeps
/// a readable prefix, and two ids that share their first 290 characters still land in distinct
/// directories; every record is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_partition_values_are_hash_truncated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.jsonl");
    let lake = dir.path().join("lake");
    let dead = dir.path().join("dead.jsonl");
    let t0 = 1_772_323_200_000i64;
    let long_a = format!("{}-a", "x".repeat(298));
    let long_b = format!("{}-b", "x".repeat(298));
    let mut lines = Vec::new();
    for i in 0..30 {
        let device = [long_a.as_str(), long_b.as_str(), "short"][i % 3];
        lines.push(format!(
            r#"{{"ts":{},"device_id":"{device}","temp":{i}.5}}"#,
            t0 + i as i64
        ));
    }
    write_input(&input, &lines);
    let toml = format!(
        r#"{}
[sinks.lake]
type = "parquet"
inputs = ["input"]
destination = "{}"
key = "device={{device_id}}/"

[sinks.dead]
type = "file"
inputs = ["lake.dead_letter"]
path = "{}"
"#,
        file_source(&input),
        lake.display(),
        dead.display()
    );
    run_pipeline(&toml).await;

    let dirs: std::collections::BTreeSet<String> = files_under(&lake)
        .iter()
        .filter_map(|f| f.parent().map(|p| p.to_string_lossy().to_string()))
        .collect();
    assert_eq!(dirs.len(), 3, "one directory per device: {dirs:?}");
    for d in &dirs {
        assert!(d.len() < 255, "directory name of {} bytes: {d}", d.len());
        assert!(d.starts_with("device="), "{d}");
    }
    assert!(dirs.contains("device=short"), "{dirs:?}");
    assert_eq!(
        dirs.iter()
            .filter(|d| d.starts_with("device=xxxxxxxxxx"))
            .count(),
        2,
        "readable prefix kept, distinct values stay distinct: {dirs:?}"
    );
    // The full value is still in the file's own `device_id` column.
    let rows = duckdb(
        &format!(
            "SELECT device_id, count(*) FROM read_parquet('{}/*/*.parquet', hive_partitioning = false) GROUP BY device_id ORDER BY device_id",
            lake.display()
        ),
        false,
    );
    assert_eq!(
        rows,
        vec![
            vec!["short".to_string(), "10".to_string()],
            vec![long_a.clone(), "10".to_string()],
            vec![long_b.clone(), "10".to_string()],
        ]
    );
    assert!(
        std::fs::read_to_string(&dead)
            .unwrap_or_default()
            .is_empty(),
        "nothing dead-lettered"
    );
}

/// Issue 13 item 6: a partition whose path the filesystem refuses (`ENAMETOOLONG`: here the
/// whole path exceeds PATH_MAX) is a poison record, not a transient error: its records are
/// dead-lettered with the reason (before: Errored, redelivered forever), the others written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_partition_path_is_dead_lettered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.jsonl");
    let dead = dir.path().join("dead.jsonl");
    // A destination ~3,950 bytes deep: room for `device=short/<file>`, none for a 120-byte id.
    let mut lake = dir.path().join("lake");
    while lake.as_os_str().len() + 251 < 3_950 {
        lake.push("d".repeat(250));
    }
    let rest = 3_950 - lake.as_os_str().len() - 1;
    lake.push("e".repeat(rest));
    std::fs::create_dir_all(&lake).expect("deep destination");
    let long = "y".repeat(120);
    let t0 = 1_772_323_200_000i64;
    let mut lines = Vec::new();
    for i in 0..10 {
        let device = if i % 2 == 0 { long.as_str() } else { "short" };
        lines.push(format!(
            r#"{{"ts":{},"device_id":"{device}","temp":{i}.5}}"#,
            t0 + i as i64
        ));
    }
    write_input(&input, &lines);
    let toml = format!(
        r#"{}
[sinks.lake]
type = "parquet"
inputs = ["input"]
destination = "{}"
key = "device={{device_id}}/"

[sinks.dead]
type = "file"
inputs = ["lake.dead_letter"]
path = "{}"
"#,
        file_source(&input),
        lake.display(),
        dead.display()
    );
    run_pipeline(&toml).await;

    let written = files_under(&lake);
    assert_eq!(written.len(), 1, "{written:?}");
    assert!(written[0].starts_with("device=short"), "{written:?}");
    let dead = std::fs::read_to_string(&dead).unwrap_or_default();
    let dead: Vec<&str> = dead.lines().collect();
    assert_eq!(dead.len(), 5, "the long device's records: {dead:?}");
    assert!(
        dead.iter()
            .all(|l| l.contains(&long) && l.contains("partition")),
        "{dead:?}"
    );
}

/// Issue 13 item 9: device-chosen field names cannot grow the inferred schema without bound.
/// Each record brings a new field; once a file's schema would exceed `max_columns`, further
/// new-column records are dead-lettered with the reason, and no file has more columns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_columns_dead_letters_schema_growth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.jsonl");
    let lake = dir.path().join("lake");
    let dead = dir.path().join("dead.jsonl");
    let t0 = 1_772_323_200_000i64;
    let mut lines = Vec::new();
    for i in 0..40 {
        lines.push(format!(
            r#"{{"ts":{},"device_id":"a","temp":1.5,"k{i}":{i}}}"#,
            t0 + i as i64
        ));
    }
    // Known columns only: always accepted.
    lines.push(format!(
        r#"{{"ts":{},"device_id":"a","temp":2.5,"k0":7}}"#,
        t0 + 40
    ));
    write_input(&input, &lines);
    let toml = format!(
        r#"{}
[sinks.lake]
type = "parquet"
inputs = ["input"]
destination = "{}"
key = ""
max_columns = 12
batch = {{ max_records = 5 }}

[sinks.dead]
type = "file"
inputs = ["lake.dead_letter"]
path = "{}"
"#,
        file_source(&input),
        lake.display(),
        dead.display()
    );
    run_pipeline(&toml).await;

    // device_id + temp + k0..k9 = 12 columns (the time column is not counted).
    let widths = duckdb(
        &format!(
            "SELECT file_name, count(*) FROM parquet_schema('{}/*.parquet') WHERE type IS NOT NULL GROUP BY file_name",
            lake.display()
        ),
        false,
    );
    assert!(!widths.is_empty());
    for w in &widths {
        assert!(w[1].parse::<u32>().expect("count") <= 13, "{widths:?}");
    }
    let rows = duckdb(
        &format!(
            "SELECT count(*), sum(temp) FROM read_parquet('{}/*.parquet', union_by_name = true)",
            lake.display()
        ),
        false,
    );
    assert_eq!(rows, vec![vec!["11".to_string(), "17.5".to_string()]]);
    let dead = std::fs::read_to_string(&dead).unwrap_or_default();
    let dead: Vec<&str> = dead.lines().collect();
    assert_eq!(dead.len(), 30, "{dead:?}");
    assert!(
        dead.iter().all(|l| l.contains("max_columns")),
        "{}",
        dead[0]
    );
}
