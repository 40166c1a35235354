//! The parquet sink on S3, against moto on 127.0.0.1:5000 (`scripts/services.sh start`):
//! 100,000 simulator records → multipart uploads → read back with DuckDB over S3.

mod parquet_support;

use std::process::Command;

use parquet_support::*;

const ENDPOINT: &str = "http://127.0.0.1:5000";

fn require_moto() {
    assert!(
        std::net::TcpStream::connect("127.0.0.1:5000").is_ok(),
        "moto (S3) is not listening on 127.0.0.1:5000: run `scripts/services.sh start`"
    );
    // The SDK's standard credential chain reads these; moto accepts any. Set once, before any
    // test reads the environment.
    static ENV: std::sync::Once = std::sync::Once::new();
    ENV.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
        std::env::set_var("AWS_REGION", "us-east-1");
    });
}

/// Runs the AWS CLI of the services venv (an independent client) against moto.
fn aws(args: &[&str]) -> String {
    let out = Command::new(services_dir().join("venv/bin/aws"))
        .args([
            "--endpoint-url",
            ENDPOINT,
            "--region",
            "us-east-1",
            "--output",
            "json",
        ])
        .args(args)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .output()
        .expect("aws cli runs (installed by scripts/services.sh start)");
    assert!(
        out.status.success(),
        "aws {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn unique_bucket(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("sluice-{name}-{}-{nanos}", std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_round_trip_read_back_with_duckdb() {
    require_moto();
    let bucket = unique_bucket("roundtrip");
    aws(&["s3api", "create-bucket", "--bucket", &bucket]);
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("copy.jsonl");
    let toml = format!(
        r#"
[sources.sim]
type = "simulator"
devices = 20
rate = "unlimited"
count = 100000
seed = 11
start_time = "2026-03-01T00:00:00Z"
batch_size = 500

[sinks.lake]
type = "parquet"
inputs = ["sim"]
destination = "s3://{bucket}/lake"
key = "date={{%Y-%m-%d}}/hour={{%H}}/"
compression = "none"
row_group_size = 20000
cleanup_after = "2m"
max_age = "1m"
s3 = {{ endpoint_url = "{ENDPOINT}", force_path_style = true, region = "us-east-1", part_size = "5MiB", storage_class = "STANDARD_IA", sse = "AES256" }}

# The raw archive: one ~20 MB object, streamed as 5 MiB parts.
[sinks.raw]
type = "parquet"
inputs = ["sim"]
destination = "s3://{bucket}/raw/"
format = "jsonl"
key = ""
max_age = "1m"
s3 = {{ endpoint_url = "{ENDPOINT}", force_path_style = true, region = "us-east-1", part_size = "5MiB" }}

[sinks.copy]
type = "file"
inputs = ["sim"]
path = "{}"
fsync = false
"#,
        copy.display()
    );
    run_pipeline(&toml).await;
    // Every upload was completed: none is left open.
    let uploads = aws(&["s3api", "list-multipart-uploads", "--bucket", &bucket]);
    assert!(!uploads.contains("UploadId"), "{uploads}");

    let listing = aws(&[
        "s3api",
        "list-objects-v2",
        "--bucket",
        &bucket,
        "--prefix",
        "lake/",
    ]);
    let listing: serde_json::Value = serde_json::from_str(&listing).expect("json");
    let objects = listing["Contents"].as_array().expect("objects");
    assert!(
        objects.iter().all(|o| {
            let k = o["Key"].as_str().unwrap_or("");
            k.starts_with("lake/date=2026-03-01/hour=0") && k.ends_with(".parquet")
        }),
        "{objects:?}"
    );
    let key = objects[0]["Key"].as_str().expect("key");
    let head = aws(&["s3api", "head-object", "--bucket", &bucket, "--key", key]);
    assert!(
        head.contains("STANDARD_IA") && head.contains("AES256"),
        "{head}"
    );

    // The jsonl archive went up as a multipart upload (S3 ETags of multipart objects end in
    // -<parts>) and holds every record.
    let raw = aws(&[
        "s3api",
        "list-objects-v2",
        "--bucket",
        &bucket,
        "--prefix",
        "raw/",
    ]);
    let raw: serde_json::Value = serde_json::from_str(&raw).expect("json");
    let raw = raw["Contents"].as_array().expect("raw objects");
    assert_eq!(raw.len(), 1, "{raw:?}");
    let size = raw[0]["Size"].as_u64().expect("size");
    let parts = size.div_ceil(5 * 1024 * 1024);
    assert!(
        parts >= 3,
        "archive of {size} bytes should need several parts"
    );
    let etag = raw[0]["ETag"].as_str().expect("etag");
    assert!(
        etag.ends_with(&format!("-{parts}\"")),
        "{etag} for {size} bytes"
    );
    let raw_count = duckdb(
        &format!("SELECT count(*) FROM read_json('s3://{bucket}/raw/*.jsonl', format = 'newline_delimited')"),
        true,
    );
    assert_eq!(raw_count, vec![vec!["100000".to_string()]]);

    let expected = expected_from_jsonl(&copy);
    assert_eq!(expected.values().map(|s| s.count).sum::<u64>(), 100_000);
    let actual = actual_from_parquet(&format!("s3://{bucket}/lake/**/*.parquet"), true);
    assert_same(&expected, &actual);
}

/// Start-up aborts multipart uploads older than `cleanup_after` under the destination prefix
/// (and leaves other prefixes alone). moto reports every upload as initiated in 2010, so the
/// age threshold itself cannot be checked against it; the prefix scoping can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_start_up_aborts_stale_uploads() {
    require_moto();
    let bucket = unique_bucket("cleanup");
    aws(&["s3api", "create-bucket", "--bucket", &bucket]);
    for key in ["lake/a/stale.parquet", "other/keep.parquet"] {
        aws(&[
            "s3api",
            "create-multipart-upload",
            "--bucket",
            &bucket,
            "--key",
            key,
        ]);
    }
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let toml = format!(
        r#"
[sources.sim]
type = "simulator"
devices = 2
rate = "unlimited"
count = 10
start_time = "2026-03-01T00:00:00Z"

[sinks.lake]
type = "parquet"
inputs = ["sim"]
destination = "s3://{bucket}/lake/"
max_age = "1s"
cleanup_after = "2s"
s3 = {{ endpoint_url = "{ENDPOINT}", force_path_style = true, region = "us-east-1" }}
"#
    );
    run_pipeline(&toml).await;
    let uploads = aws(&["s3api", "list-multipart-uploads", "--bucket", &bucket]);
    assert!(!uploads.contains("stale.parquet"), "{uploads}");
    assert!(uploads.contains("other/keep.parquet"), "{uploads}");
    let count = duckdb(
        &format!("SELECT count(*) FROM read_parquet('s3://{bucket}/lake/**/*.parquet')"),
        true,
    );
    assert_eq!(count, vec![vec!["10".to_string()]]);
}

/// Issue 13 item 6 on S3: partition values that would make an object key longer than S3's
/// 1,024 bytes (three 400-character tags) are hash-truncated: every key stays within the
/// limit, distinct values stay in distinct partitions, and every record is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_long_partition_values_keep_keys_under_1024_bytes() {
    require_moto();
    let bucket = unique_bucket("longkeys");
    aws(&["s3api", "create-bucket", "--bucket", &bucket]);
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.jsonl");
    let t0 = 1_772_323_200_000i64;
    let mut lines = Vec::new();
    for i in 0..40 {
        let v = |c: char| format!("{}{}", c.to_string().repeat(400), i % 4);
        lines.push(format!(
            r#"{{"ts":{},"tenant":"{}","site":"{}","device_id":"{}","temp":1.5}}"#,
            t0 + i,
            v('t'),
            v('s'),
            v('d')
        ));
    }
    std::fs::write(&input, lines.join("\n") + "\n").expect("write input");
    let toml = format!(
        r#"
[sources.input]
type = "file"
path = "{}"
decode = {{ codec = "json", time_key = "ts", time_unit = "ms", tags = ["tenant", "site", "device_id"] }}

[sinks.lake]
type = "parquet"
inputs = ["input"]
destination = "s3://{bucket}/lake/"
key = "tenant={{tenant}}/site={{site}}/device={{device_id}}/"
s3 = {{ endpoint_url = "{ENDPOINT}", force_path_style = true, region = "us-east-1" }}
"#,
        input.display()
    );
    run_pipeline(&toml).await;
    let listing = aws(&["s3api", "list-objects-v2", "--bucket", &bucket]);
    let listing: serde_json::Value = serde_json::from_str(&listing).expect("json");
    let keys: Vec<&str> = listing["Contents"]
        .as_array()
        .map(|a| a.iter().filter_map(|o| o["Key"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(keys.len(), 4, "one object per partition: {keys:?}");
    for k in &keys {
        assert!(k.len() <= 1024, "key of {} bytes: {k}", k.len());
        assert!(
            k.starts_with("lake/tenant=tttt"),
            "readable prefix kept: {k}"
        );
        assert!(k.split('/').all(|s| s.len() < 255), "{k}");
    }
    let count = duckdb(
        &format!(
            "SELECT count(*), count(DISTINCT device_id) FROM read_parquet('s3://{bucket}/lake/**/*.parquet', hive_partitioning = false)"
        ),
        true,
    );
    assert_eq!(count, vec![vec!["40".to_string(), "4".to_string()]]);
}
