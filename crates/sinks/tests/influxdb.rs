//! `influxdb` sink against VictoriaMetrics (a real `/api/v2/write` server, started by
//! `scripts/services.sh start`) and, for the error paths, against a small HTTP server started
//! inside each test with canned answers (429 + Retry-After, 503, 400 partial writes, 413, 401).

mod http_server;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_server::{read_json_lines, run_pipeline, start, unique, Captured, Reply};
use sluice_sinks::line_protocol::parse_line;

const VM: &str = "127.0.0.1:8428";

fn require_victoriametrics() {
    assert!(
        std::net::TcpStream::connect_timeout(&VM.parse().expect("address"), Duration::from_secs(2))
            .is_ok(),
        "VictoriaMetrics is not listening on {VM}: run `scripts/services.sh start`"
    );
}

/// (device_id, event time in ns) of a record written by the `file` sink.
fn key_of(record: &serde_json::Value) -> (String, i64) {
    let device = record["tags"]["device_id"]
        .as_str()
        .expect("device_id tag")
        .to_string();
    let time = sluice_core::json::parse_time(record["time"].as_str().expect("time"))
        .expect("RFC 3339 time");
    (device, time)
}

/// (device_id, timestamp) of every line in `lines` (precision ns).
fn keys_of_lines(lines: &[String]) -> Vec<(String, i64)> {
    lines
        .iter()
        .map(|l| {
            let line = parse_line(l).unwrap_or_else(|e| panic!("sink wrote a bad line {l:?}: {e}"));
            let device = line
                .tags
                .iter()
                .find(|(k, _)| k == "device_id")
                .map(|(_, v)| v.clone())
                .expect("device_id tag on every line");
            (device, line.time.expect("timestamp on every line"))
        })
        .collect()
}

/// Every point VictoriaMetrics returns for `measurement`: (device, field, time in ms) -> value,
/// and how many there were.
async fn export_points(
    http: &reqwest::Client,
    measurement: &str,
) -> (HashMap<(String, String, i64), f64>, usize) {
    http.get(format!("http://{VM}/internal/force_flush"))
        .send()
        .await
        .expect("force_flush");
    let export = http
        .post(format!("http://{VM}/api/v1/export"))
        .form(&[("match[]", format!("{{__name__=~\"{measurement}_.*\"}}"))])
        .send()
        .await
        .expect("export")
        .text()
        .await
        .expect("export body");
    // (device, field, time in ms) -> value, as VictoriaMetrics stored it.
    let mut stored: HashMap<(String, String, i64), f64> = HashMap::new();
    let mut points = 0;
    for line in export.lines() {
        let series: serde_json::Value = serde_json::from_str(line).expect("export JSON");
        let name = series["metric"]["__name__"].as_str().expect("name");
        let field = name
            .strip_prefix(&format!("{measurement}_"))
            .expect("measurement prefix")
            .to_string();
        let device = series["metric"]["device_id"]
            .as_str()
            .expect("device_id tag stored")
            .to_string();
        let values = series["values"].as_array().expect("values");
        let times = series["timestamps"].as_array().expect("timestamps");
        assert_eq!(values.len(), times.len());
        for (v, t) in values.iter().zip(times) {
            points += 1;
            stored.insert(
                (device.clone(), field.clone(), t.as_i64().expect("ms")),
                v.as_f64().expect("number"),
            );
        }
    }

    (stored, points)
}

fn counts<T: Ord + Clone>(items: &[T]) -> BTreeMap<T, usize> {
    let mut m = BTreeMap::new();
    for i in items {
        *m.entry(i.clone()).or_insert(0) += 1;
    }
    m
}

fn pipeline(url: &str, dir: &std::path::Path, sim: &str, sink_extra: &str) -> String {
    format!(
        r#"
[sources.sim]
type = "simulator"
rate = "unlimited"
start_time = "2026-01-01T00:00:00Z"
{sim}

[sinks.influx]
type = "influxdb"
inputs = ["sim"]
url = "{url}"
org = "sluice"
bucket = "telemetry"
token = "secret-token"
retry = {{ initial_backoff = "20ms", max_backoff = "2s", max_retries = 6 }}
{sink_extra}

[sinks.sent]
type = "file"
inputs = ["sim"]
path = "{dir}/sent.jsonl"
fsync = false

[sinks.dead]
type = "file"
inputs = ["influx.dead_letter"]
path = "{dir}/dead.jsonl"
fsync = false
"#,
        dir = dir.display()
    )
}

/// Health endpoints every canned server answers like VictoriaMetrics does.
fn health(req: &Captured) -> Option<Reply> {
    if req.target.starts_with("/health") {
        return Some(Reply::new(200, "OK"));
    }
    if req.target.starts_with("/api/v2/buckets") {
        return Some(Reply::new(404, "not found"));
    }
    None
}

fn body_lines(req: &Captured) -> Vec<String> {
    req.text().lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn victoriametrics_reads_back_50k_records() {
    require_victoriametrics();
    let measurement = unique("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = pipeline(
        &format!("http://{VM}"),
        dir.path(),
        "devices = 50\ncount = 50000\nseed = 8",
        &format!("measurement = \"{measurement}\""),
    );
    let started = Instant::now();
    run_pipeline(&toml).await.expect("pipeline runs");
    let elapsed = started.elapsed();
    eprintln!(
        "influxdb → VictoriaMetrics: 50000 records in {elapsed:.2?} ({:.0} records/s end to end)",
        50_000.0 / elapsed.as_secs_f64()
    );

    let sent = read_json_lines(&dir.path().join("sent.jsonl"));
    assert_eq!(sent.len(), 50_000);
    assert!(read_json_lines(&dir.path().join("dead.jsonl")).is_empty());

    // Points the sent records make (numbers, booleans, strings stored as 0).
    let wanted: usize = sent
        .iter()
        .map(|r| {
            r["fields"]
                .as_object()
                .expect("fields")
                .values()
                .filter(|v| v.is_number() || v.is_boolean() || v.is_string())
                .count()
        })
        .sum();
    // VictoriaMetrics makes new series searchable asynchronously: on a busy machine a flush
    // right after the write can miss some. Read until every point is there (or 60 s).
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (stored, points) = loop {
        let (stored, points) = export_points(&http, &measurement).await;
        if points >= wanted || Instant::now() > deadline {
            break (stored, points);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    let mut expected_points = 0;
    for record in &sent {
        let (device, time) = key_of(record);
        for (field, value) in record["fields"].as_object().expect("fields") {
            let want = match value {
                serde_json::Value::Number(n) => n.as_f64().expect("number"),
                serde_json::Value::Bool(b) => f64::from(u8::from(*b)),
                // VictoriaMetrics stores string fields as 0 (see SERVICES.md).
                serde_json::Value::String(_) => 0.0,
                _ => continue,
            };
            expected_points += 1;
            let key = (device.clone(), field.clone(), time / 1_000_000);
            let got = stored
                .get(&key)
                .unwrap_or_else(|| panic!("no stored value for {key:?}"));
            assert!(
                (got - want).abs() <= 1e-9 * want.abs().max(1.0),
                "{key:?}: stored {got}, sent {want}"
            );
        }
    }
    assert_eq!(points, expected_points, "every field of every record, once");
    assert!(expected_points >= 50_000 * 4);
}

/// Records the lines of every write the handler accepted.
#[derive(Clone, Default)]
struct Accepted(Arc<Mutex<Vec<String>>>);

impl Accepted {
    fn add(&self, lines: impl IntoIterator<Item = String>) {
        self.0.lock().expect("lock").extend(lines);
    }
    fn lines(&self) -> Vec<String> {
        self.0.lock().expect("lock").clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_429_with_retry_after_and_503_then_delivers_each_record_once() {
    let accepted = Accepted::default();
    let writes = Arc::new(AtomicUsize::new(0));
    let (acc, w) = (accepted.clone(), writes.clone());
    let server = start(move |req| {
        if let Some(r) = health(req) {
            return r;
        }
        match w.fetch_add(1, Ordering::SeqCst) {
            0 => Reply::new(429, r#"{"code":"too many requests"}"#).header("Retry-After", "1"),
            1 | 2 => Reply::new(503, "unavailable"),
            _ => {
                acc.add(body_lines(req));
                Reply::new(204, "")
            }
        }
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = pipeline(
        &server.url(),
        dir.path(),
        "devices = 10\ncount = 2000\nseed = 3",
        "in_flight = 1\nbatch = { max_records = 500 }",
    );
    run_pipeline(&toml).await.expect("pipeline runs");

    let sent: Vec<_> = read_json_lines(&dir.path().join("sent.jsonl"))
        .iter()
        .map(key_of)
        .collect();
    assert_eq!(sent.len(), 2000);
    let got = keys_of_lines(&accepted.lines());
    assert_eq!(
        counts(&got),
        counts(&sent),
        "each record written exactly once"
    );
    assert!(read_json_lines(&dir.path().join("dead.jsonl")).is_empty());

    let writes: Vec<Captured> = server
        .requests()
        .into_iter()
        .filter(|r| r.target.starts_with("/api/v2/write"))
        .collect();
    assert_eq!(writes.len(), 4 + 3, "4 batches + 3 retries");
    let waited = writes[1].at - writes[0].at;
    assert!(
        waited >= Duration::from_millis(990),
        "Retry-After: 1 respected, waited {waited:?}"
    );
    // The retried request is the same request.
    assert_eq!(writes[0].body, writes[3].body);
    let first = &writes[0];
    assert_eq!(first.header("authorization"), Some("Token secret-token"));
    assert_eq!(first.header("content-encoding"), Some("gzip"));
    assert!(first.target.contains("bucket=telemetry") && first.target.contains("org=sluice"));
    assert!(first.target.contains("precision=ns"));
}

/// The device whose lines the canned servers refuse.
const POISON: &str = "device_id=dev-0003";

fn check_dead_letter(dir: &std::path::Path, sent: &[(String, i64)], reason: &str) {
    let dead = read_json_lines(&dir.join("dead.jsonl"));
    let dead_keys: Vec<_> = dead.iter().map(key_of).collect();
    let want: Vec<_> = sent
        .iter()
        .filter(|(d, _)| d == "dev-0003")
        .cloned()
        .collect();
    assert!(!want.is_empty());
    assert_eq!(
        counts(&dead_keys),
        counts(&want),
        "dead letter holds exactly the refused records"
    );
    for d in &dead {
        let error = d["error"]
            .as_str()
            .expect("dead-lettered records carry the reason");
        assert!(
            error.contains(reason),
            "reason {error:?} should contain {reason:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_write_400_dead_letters_offending_lines_and_keeps_the_rest() {
    // InfluxDB 3 answer: the good lines are written, the bad ones listed by line number.
    let accepted = Accepted::default();
    let acc = accepted.clone();
    let server = start(move |req| {
        if let Some(r) = health(req) {
            return r;
        }
        let lines = body_lines(req);
        let mut data = Vec::new();
        let mut good = Vec::new();
        for (i, l) in lines.iter().enumerate() {
            if l.contains(POISON) {
                data.push(serde_json::json!({"original_line": l, "line_number": i + 1, "error_message": "schema conflict: temp is integer"}));
            } else {
                good.push(l.clone());
            }
        }
        acc.add(good);
        if data.is_empty() {
            Reply::new(204, "")
        } else {
            Reply::new(
                400,
                serde_json::json!({"error": "partial write of line protocol occurred", "data": data}).to_string(),
            )
        }
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = pipeline(
        &server.url(),
        dir.path(),
        "devices = 10\ncount = 3000\nseed = 4",
        "batch = { max_records = 700 }",
    );
    run_pipeline(&toml).await.expect("pipeline runs");

    let sent: Vec<_> = read_json_lines(&dir.path().join("sent.jsonl"))
        .iter()
        .map(key_of)
        .collect();
    let good: Vec<_> = sent
        .iter()
        .filter(|(d, _)| d != "dev-0003")
        .cloned()
        .collect();
    assert_eq!(
        counts(&keys_of_lines(&accepted.lines())),
        counts(&good),
        "good lines written once, not resent after a partial write"
    );
    check_dead_letter(dir.path(), &sent, "schema conflict: temp is integer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oss_400_names_one_line_per_answer_and_nothing_is_written_until_clean() {
    // InfluxDB 2 OSS answer: the first bad line quoted in the message; nothing written.
    let accepted = Accepted::default();
    let acc = accepted.clone();
    let server = start(move |req| {
        if let Some(r) = health(req) {
            return r;
        }
        let lines = body_lines(req);
        match lines.iter().find(|l| l.contains(POISON)) {
            Some(bad) => Reply::new(
                400,
                serde_json::json!({"code": "invalid", "message": format!("unable to parse '{bad}': bad timestamp")}).to_string(),
            ),
            None => {
                acc.add(lines);
                Reply::new(204, "")
            }
        }
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = pipeline(
        &server.url(),
        dir.path(),
        "devices = 10\ncount = 600\nseed = 5",
        "batch = { max_records = 200 }",
    );
    run_pipeline(&toml).await.expect("pipeline runs");
    let sent: Vec<_> = read_json_lines(&dir.path().join("sent.jsonl"))
        .iter()
        .map(key_of)
        .collect();
    let good: Vec<_> = sent
        .iter()
        .filter(|(d, _)| d != "dev-0003")
        .cloned()
        .collect();
    assert_eq!(counts(&keys_of_lines(&accepted.lines())), counts(&good));
    check_dead_letter(dir.path(), &sent, "bad timestamp");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_without_line_numbers_is_narrowed_down_by_halving() {
    let accepted = Accepted::default();
    let acc = accepted.clone();
    let server = start(move |req| {
        if let Some(r) = health(req) {
            return r;
        }
        let lines = body_lines(req);
        if lines.iter().any(|l| l.contains(POISON)) {
            return Reply::new(400, r#"{"code":"invalid","message":"field type conflict"}"#);
        }
        acc.add(lines);
        Reply::new(204, "")
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = pipeline(
        &server.url(),
        dir.path(),
        "devices = 5\ncount = 100\nseed = 6",
        "batch = { max_records = 100 }",
    );
    run_pipeline(&toml).await.expect("pipeline runs");
    let sent: Vec<_> = read_json_lines(&dir.path().join("sent.jsonl"))
        .iter()
        .map(key_of)
        .collect();
    let good: Vec<_> = sent
        .iter()
        .filter(|(d, _)| d != "dev-0003")
        .cloned()
        .collect();
    assert_eq!(counts(&keys_of_lines(&accepted.lines())), counts(&good));
    check_dead_letter(dir.path(), &sent, "field type conflict");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_413_splits_the_request() {
    let accepted = Accepted::default();
    let acc = accepted.clone();
    let server = start(move |req| {
        if let Some(r) = health(req) {
            return r;
        }
        let lines = body_lines(req);
        if lines.len() > 60 {
            return Reply::new(413, "request entity too large");
        }
        acc.add(lines);
        Reply::new(204, "")
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = pipeline(
        &server.url(),
        dir.path(),
        "devices = 5\ncount = 1000\nseed = 7",
        "batch = { max_records = 250 }\ngzip = false",
    );
    run_pipeline(&toml).await.expect("pipeline runs");
    let sent: Vec<_> = read_json_lines(&dir.path().join("sent.jsonl"))
        .iter()
        .map(key_of)
        .collect();
    assert_eq!(counts(&keys_of_lines(&accepted.lines())), counts(&sent));
    assert!(read_json_lines(&dir.path().join("dead.jsonl")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_fails_loudly_at_start_and_on_write() {
    // At start-up: the token check answers 401.
    let server = start(|req| {
        if req.target.starts_with("/health") {
            Reply::new(200, "OK")
        } else {
            Reply::new(
                401,
                r#"{"code":"unauthorized","message":"unauthorized access"}"#,
            )
        }
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = pipeline(&server.url(), dir.path(), "count = 10", "");
    let err = run_pipeline(&toml)
        .await
        .expect_err("a refused token stops the pipeline");
    assert!(err.contains("401") && err.contains("token"), "{err}");
    assert!(
        server
            .requests()
            .iter()
            .all(|r| !r.target.starts_with("/api/v2/write")),
        "nothing written"
    );

    // On write: a token revoked after start.
    let server = start(|req| {
        health(req).unwrap_or_else(|| {
            Reply::new(
                403,
                r#"{"code":"forbidden","message":"insufficient permissions for write"}"#,
            )
        })
    })
    .await;
    let toml = pipeline(&server.url(), dir.path(), "count = 10", "");
    let err = run_pipeline(&toml)
        .await
        .expect_err("403 on write stops the pipeline");
    assert!(
        err.contains("403") && err.contains("insufficient permissions"),
        "{err}"
    );
}

/// 404 (bucket not found) and a proxy's 404/405 are operational faults, not bad records: they
/// are retried, and when the retries run out the sink stops with an error saying what to fix.
/// Nothing goes to `dead_letter` (a dead letter nobody reads would acknowledge lost data).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bucket_not_found_404_and_proxy_405_are_retried_then_stop_the_sink() {
    // The bucket appears after two refused writes: retried, delivered, nothing dead-lettered.
    let accepted = Accepted::default();
    let writes = Arc::new(AtomicUsize::new(0));
    let (acc, w) = (accepted.clone(), writes.clone());
    let server = start(move |req| {
        if let Some(r) = health(req) {
            return r;
        }
        match w.fetch_add(1, Ordering::SeqCst) {
            0 | 1 => Reply::new(
                404,
                r#"{"code":"not found","message":"bucket \"telemetry\" not found"}"#,
            ),
            _ => {
                acc.add(body_lines(req));
                Reply::new(204, "")
            }
        }
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = pipeline(
        &server.url(),
        dir.path(),
        "count = 20",
        "in_flight = 1\nbatch = { max_records = 100 }",
    );
    run_pipeline(&toml).await.expect("pipeline runs");
    assert!(read_json_lines(&dir.path().join("dead.jsonl")).is_empty());
    assert_eq!(accepted.lines().len(), 20, "written once the bucket exists");

    // The bucket never appears, or a proxy answers 405: retries, then the sink stops.
    for (status, body, expected) in [
        (
            404,
            r#"{"code":"not found","message":"bucket \"telemetry\" not found"}"#,
            "not found",
        ),
        (405, "<html>405 Not Allowed</html>", "405"),
    ] {
        let server =
            start(move |req| health(req).unwrap_or_else(|| Reply::new(status, body))).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let toml = pipeline(&server.url(), dir.path(), "count = 10", "");
        let err = run_pipeline(&toml)
            .await
            .expect_err("a missing bucket stops the pipeline after the retries");
        assert!(
            err.contains(&status.to_string()) && err.contains(expected) && err.contains("bucket"),
            "{err}"
        );
        let writes = server
            .requests()
            .iter()
            .filter(|r| r.target.starts_with("/api/v2/write"))
            .count();
        assert_eq!(writes, 1 + 6, "the first try and max_retries = 6 retries");
        assert!(
            read_json_lines(&dir.path().join("dead.jsonl")).is_empty(),
            "{status}: nothing dead-lettered"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_down_at_start_names_the_url() {
    // A port nobody listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("http://127.0.0.1:{port}");
    let toml = pipeline(&url, dir.path(), "count = 10", "");
    let err = run_pipeline(&toml).await.expect_err("unreachable server");
    assert!(
        err.contains("cannot reach InfluxDB") && err.contains(&url),
        "{err}"
    );
}

/// (bucket, lines) of one accepted write.
type BucketWrite = (String, Vec<String>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templated_bucket_keeps_tenants_apart_and_dead_letters_records_without_the_tag() {
    let accepted: Arc<Mutex<Vec<BucketWrite>>> = Arc::default();
    let acc = accepted.clone();
    let server = start(move |req| {
        if let Some(r) = health(req) {
            return r;
        }
        let bucket = req
            .target
            .split(['?', '&'])
            .find_map(|p| p.strip_prefix("bucket="))
            .expect("bucket parameter")
            .to_string();
        acc.lock().expect("lock").push((bucket, body_lines(req)));
        Reply::new(204, "")
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = pipeline(
        &server.url(),
        dir.path(),
        "devices = 4\ncount = 400\nseed = 9",
        "bucket = \"tenant-{device_id}\"\nin_flight = 3",
    )
    .replace("bucket = \"telemetry\"\n", "");
    run_pipeline(&toml).await.expect("pipeline runs");
    let sent: Vec<_> = read_json_lines(&dir.path().join("sent.jsonl"))
        .iter()
        .map(key_of)
        .collect();
    let mut written = Vec::new();
    for (bucket, lines) in accepted.lock().expect("lock").iter() {
        for (device, time) in keys_of_lines(lines) {
            assert_eq!(
                bucket,
                &format!("tenant-{device}"),
                "a line in another tenant's bucket"
            );
            written.push((device, time));
        }
    }
    assert_eq!(counts(&written), counts(&sent));

    // A bucket template naming a tag the records lack: every record to dead_letter.
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = pipeline(
        &server.url(),
        dir.path(),
        "devices = 2\ncount = 20",
        "bucket = \"tenant-{tenant}\"",
    )
    .replace("bucket = \"telemetry\"\n", "");
    run_pipeline(&toml).await.expect("pipeline runs");
    let dead = read_json_lines(&dir.path().join("dead.jsonl"));
    assert_eq!(dead.len(), 20);
    assert!(dead.iter().all(|d| d["error"]
        .as_str()
        .is_some_and(|e| e.contains("needs tag `tenant`"))));
}

/// A hung endpoint (issue 13, 9c): a private VictoriaMetrics frozen with SIGSTOP accepts
/// connections but never answers. Each request times out after `timeout`, is counted in
/// `timeouts` and retried; once the server is thawed (SIGCONT) the records are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_server_times_out_is_retried_then_delivers() {
    use sluice_core::ack::{self, BatchStatus};
    use sluice_core::record::{Batch, Record, Value};
    use sluice_core::testing::{status_within, SinkHarness};

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let data = tempfile::tempdir().expect("tempdir");
    let mut vm = std::process::Command::new("victoria-metrics")
        .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
        .arg(format!("-storageDataPath={}", data.path().display()))
        .args(["-retentionPeriod=100y", "-search.latencyOffset=0s"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("victoria-metrics (scripts/services.sh start victoriametrics installs it)");
    let pid = vm.id().to_string();
    let signal = |sig: &str| {
        let _ = std::process::Command::new("kill")
            .args([sig, &pid])
            .status();
    };
    // Killed (and thawed first) even when an assertion fails.
    struct Reap(String);
    impl Drop for Reap {
        fn drop(&mut self) {
            for sig in ["-CONT", "-KILL"] {
                let _ = std::process::Command::new("kill")
                    .args([sig, &self.0])
                    .status();
            }
        }
    }
    let _reap = Reap(pid.clone());
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "private VictoriaMetrics did not listen"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let url = format!("http://127.0.0.1:{port}");
    let config: sluice_sinks::influxdb::InfluxDbConfig = toml::from_str(&format!(
        r#"
url = "{url}"
org = "o"
bucket = "b"
measurement = "frozen"
timeout = "1s"
retry = {{ initial_backoff = "100ms", max_backoff = "1s", max_retries = 1000 }}
"#
    ))
    .expect("config");
    let sink = SinkHarness::start(&config, "influx_frozen", "timeouts")
        .await
        .expect("sink builds while the server answers");

    signal("-STOP");
    let records: Vec<Record> = (0..30)
        .map(|i| {
            let mut r = Record::new(1_767_225_600_000_000_000 + i * 1_000_000_000);
            r.set_tag("device_id", "frozen-1");
            r.set_field("seq", Value::I64(i));
            r
        })
        .collect();
    let (f, mut status) = ack::batch();
    let mut batch = Batch::new(records);
    for r in &mut batch.records {
        r.finalizers.push(f.clone());
    }
    f.finish(BatchStatus::Delivered);
    sink.out.send(batch).await.expect("send");
    let timeouts = sink.metrics.counter("timeouts");
    let started = Instant::now();
    while timeouts.load(Ordering::Relaxed) < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "timeouts counted: {}",
            timeouts.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(status.try_status(), None, "still retrying while frozen");

    signal("-CONT");
    assert_eq!(
        status_within(status, Duration::from_secs(60)).await,
        Some(BatchStatus::Delivered)
    );
    sink.stop(Duration::from_secs(30))
        .await
        .expect("sink stops");
    let http = reqwest::Client::new();
    http.get(format!("{url}/internal/force_flush"))
        .send()
        .await
        .expect("force_flush");
    let export = http
        .post(format!("{url}/api/v1/export"))
        .form(&[("match[]", "frozen_seq")])
        .send()
        .await
        .expect("export")
        .text()
        .await
        .expect("export body");
    let mut seqs: Vec<i64> = Vec::new();
    for line in export.lines() {
        let series: serde_json::Value = serde_json::from_str(line).expect("export JSON");
        for v in series["values"].as_array().expect("values") {
            seqs.push(v.as_f64().expect("number") as i64);
        }
    }
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs, (0..30).collect::<Vec<_>>(), "every record written");
    let _ = vm.kill();
    let _ = vm.wait();
}
