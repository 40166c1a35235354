//! `timestream` sink against moto (Timestream write API on 127.0.0.1:5000, started by
//! `scripts/services.sh start`; what it stored is read back from the launcher's endpoint
//! `127.0.0.1:5001/timestream/<db>/<table>`, see scripts/moto_server.py)
//! and, for rejected records, throttling and access errors, against a small HTTP server
//! speaking the Timestream JSON protocol, started inside the test.

mod http_server;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use http_server::{read_json_lines, run_pipeline, start, unique, Captured, Reply};
use serde_json::{json, Value as Json};

const MOTO: &str = "127.0.0.1:5000";
const MOTO_READ_BACK: &str = "127.0.0.1:5001";

fn aws_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Dummy credentials for moto and the canned server (never real AWS).
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::remove_var("AWS_PROFILE");
    });
}

fn require_moto() {
    for addr in [MOTO, MOTO_READ_BACK] {
        assert!(
            std::net::TcpStream::connect_timeout(&addr.parse().expect("address"), Duration::from_secs(2))
                .is_ok(),
            "moto (with its Timestream read-back endpoint) is not listening on {addr}: run `scripts/services.sh start`"
        );
    }
}

fn counts<T: Ord + Clone>(items: impl IntoIterator<Item = T>) -> BTreeMap<T, usize> {
    let mut m = BTreeMap::new();
    for i in items {
        *m.entry(i).or_insert(0) += 1;
    }
    m
}

/// (time in ms, measures as "name=value" sorted) of a record written by the `file` sink —
/// the same text form the sink sends (floats in shortest round-trip form).
fn expected_measures(record: &Json) -> (String, Vec<String>) {
    let time = sluice_core::json::parse_time(record["time"].as_str().expect("time"))
        .expect("RFC 3339 time");
    let mut measures: Vec<String> = record["fields"]
        .as_object()
        .expect("fields")
        .iter()
        .filter_map(|(k, v)| {
            let text = match v {
                Json::Number(n) if n.is_f64() => ryu::Buffer::new()
                    .format(n.as_f64().expect("f64"))
                    .to_string(),
                Json::Number(n) => n.to_string(),
                Json::Bool(b) => b.to_string(),
                Json::String(s) => s.clone(),
                _ => return None,
            };
            Some(format!("{k}={text}"))
        })
        .collect();
    measures.sort();
    ((time / 1_000_000).to_string(), measures)
}

/// (time, measures as "name=value" sorted) of a stored multi-measure record.
fn stored_measures(record: &Json) -> (String, Vec<String>) {
    let mut measures: Vec<String> = record["MeasureValues"]
        .as_array()
        .expect("MeasureValues")
        .iter()
        .map(|m| {
            format!(
                "{}={}",
                m["Name"].as_str().expect("Name"),
                m["Value"].as_str().expect("Value")
            )
        })
        .collect();
    measures.sort();
    (record["Time"].as_str().expect("Time").to_string(), measures)
}

fn pipeline(
    endpoint: &str,
    database: &str,
    dir: &std::path::Path,
    sim: &str,
    extra: &str,
) -> String {
    format!(
        r#"
[sources.sim]
type = "simulator"
rate = "unlimited"
start_time = "2026-01-01T00:00:00Z"
{sim}

[sinks.ts]
type = "timestream"
inputs = ["sim"]
endpoint_url = "{endpoint}"
region = "us-east-1"
database = "{database}"
table = "telemetry"
dimensions = ["device_id"]
retry = {{ initial_backoff = "20ms", max_backoff = "1s", max_retries = 6 }}
{extra}

[sinks.sent]
type = "file"
inputs = ["sim"]
path = "{dir}/sent.jsonl"
fsync = false

[sinks.dead]
type = "file"
inputs = ["ts.dead_letter"]
path = "{dir}/dead.jsonl"
fsync = false
"#,
        dir = dir.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_stores_50k_records_as_sent() {
    aws_env();
    require_moto();
    let database = unique("sluice");
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = pipeline(
        &format!("http://{MOTO}"),
        &database,
        dir.path(),
        "devices = 50\ncount = 50000\nseed = 11",
        "create_if_missing = true\nin_flight = 8",
    );
    let started = Instant::now();
    run_pipeline(&toml).await.expect("pipeline runs");
    let elapsed = started.elapsed();
    eprintln!(
        "timestream → moto: 50000 records in {elapsed:.2?} ({:.0} records/s end to end)",
        50_000.0 / elapsed.as_secs_f64()
    );
    let sent = read_json_lines(&dir.path().join("sent.jsonl"));
    assert_eq!(sent.len(), 50_000);
    assert!(read_json_lines(&dir.path().join("dead.jsonl")).is_empty());

    let stored: Vec<Json> = {
        let body = reqwest::get(format!(
            "http://{MOTO_READ_BACK}/timestream/{database}/telemetry"
        ))
        .await
        .expect("moto read-back")
        .bytes()
        .await
        .expect("moto read-back body");
        serde_json::from_slice(&body).expect("table created by create_if_missing, records as JSON")
    };
    assert_eq!(stored.len(), 50_000, "one multi-measure record per record");
    let client = aws_sdk_timestreamwrite::Client::from_conf(
        aws_sdk_timestreamwrite::Config::builder()
            .behavior_version_latest()
            .region(aws_sdk_timestreamwrite::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_timestreamwrite::config::Credentials::for_tests())
            .endpoint_url(format!("http://{MOTO}"))
            .http_client(aws_smithy_http_client::Builder::new().build_http())
            .build(),
    );
    let table = client
        .describe_table()
        .database_name(&database)
        .table_name("telemetry")
        .send()
        .await
        .expect("table created");
    let retention = table
        .table()
        .and_then(|t| t.retention_properties())
        .expect("retention");
    assert_eq!(retention.memory_store_retention_period_in_hours(), 24);
    assert_eq!(retention.magnetic_store_retention_period_in_days(), 365);
    // With 50 devices in a batch, requests mix devices: each record carries its device_id
    // dimension (shared dimensions go to CommonAttributes, checked with the canned server).
    let got = counts(stored.iter().map(|r| {
        let device = r["Dimensions"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["Name"] == "device_id"))
            .and_then(|d| d["Value"].as_str())
            .expect("device_id dimension on the record")
            .to_string();
        (device, stored_measures(r))
    }));
    let want = counts(sent.iter().map(|r| {
        let device = r["tags"]["device_id"]
            .as_str()
            .expect("device_id")
            .to_string();
        (device, expected_measures(r))
    }));
    assert_eq!(got.len(), want.len());
    assert!(got == want, "stored measures differ from the records sent");
    let types: BTreeMap<String, String> = stored[0]["MeasureValues"]
        .as_array()
        .expect("measures")
        .iter()
        .map(|m| {
            (
                m["Name"].as_str().expect("name").into(),
                m["Type"].as_str().expect("type").into(),
            )
        })
        .collect();
    assert_eq!(types.get("temp").map(String::as_str), Some("DOUBLE"));
    assert_eq!(types.get("seq").map(String::as_str), Some("BIGINT"));
    assert_eq!(
        types.get("device_status").map(String::as_str),
        Some("VARCHAR")
    );
}

fn target(req: &Captured) -> &str {
    req.header("x-amz-target")
        .and_then(|t| t.rsplit('.').next())
        .unwrap_or("")
}

fn aws_error(status: u16, kind: &str, extra: Json) -> Reply {
    let mut body = json!({"__type": format!("com.amazonaws.timestream.v20181101#{kind}"), "message": format!("canned {kind}")});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    Reply::new(status, body.to_string())
        .header("content-type", "application/x-amz-json-1.0")
        .header("x-amzn-errortype", kind)
}

fn ok(body: Json) -> Reply {
    Reply::new(200, body.to_string()).header("content-type", "application/x-amz-json-1.0")
}

fn describe_table() -> Reply {
    ok(json!({"Table": {"TableName": "telemetry", "DatabaseName": "db", "TableStatus": "ACTIVE"}}))
}

fn device_dimension(dimensions: &Json) -> Option<String> {
    dimensions
        .as_array()
        .and_then(|d| d.iter().find(|d| d["Name"] == "device_id"))
        .and_then(|d| d["Value"].as_str())
        .map(str::to_string)
}

/// (device, time) of each record of a WriteRecords request, with its `seq` measure. The
/// device is in `CommonAttributes` when the whole request shares it, else on each record.
fn records_of(req: &Captured) -> Vec<((String, String), i64)> {
    let body: Json = serde_json::from_slice(&req.body).expect("JSON request");
    let common = device_dimension(&body["CommonAttributes"]["Dimensions"]);
    body["Records"]
        .as_array()
        .expect("Records")
        .iter()
        .map(|r| {
            let own = device_dimension(&r["Dimensions"]);
            assert!(
                common.is_none() || own.is_none(),
                "a dimension is either common or per record"
            );
            let device = own.or_else(|| common.clone()).expect("device_id dimension");
            let seq = r["MeasureValues"]
                .as_array()
                .and_then(|m| m.iter().find(|m| m["Name"] == "seq"))
                .and_then(|m| m["Value"].as_str())
                .and_then(|v| v.parse().ok())
                .expect("seq measure");
            ((device, r["Time"].as_str().expect("Time").to_string()), seq)
        })
        .collect()
}

fn key_of(record: &Json) -> (String, String) {
    let time = sluice_core::json::parse_time(record["time"].as_str().expect("time")).expect("time");
    (
        record["tags"]["device_id"]
            .as_str()
            .expect("device_id")
            .to_string(),
        (time / 1_000_000).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_records_go_to_dead_letter_and_the_rest_is_delivered_after_throttling() {
    aws_env();
    let accepted: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let rejected: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let writes = Arc::new(AtomicUsize::new(0));
    let (acc, rej, w) = (accepted.clone(), rejected.clone(), writes.clone());
    let server = start(move |req| match target(req) {
        "DescribeTable" => describe_table(),
        "WriteRecords" => match w.fetch_add(1, Ordering::SeqCst) {
            0 => aws_error(400, "ThrottlingException", json!({})),
            1 => aws_error(500, "InternalServerException", json!({})),
            _ => {
                let records = records_of(req);
                let body: Json = serde_json::from_slice(&req.body).expect("JSON");
                assert_eq!(body["CommonAttributes"]["MeasureName"], "metrics");
                assert_eq!(body["CommonAttributes"]["MeasureValueType"], "MULTI");
                assert_eq!(body["CommonAttributes"]["TimeUnit"], "MILLISECONDS");
                assert!(records.len() <= 100, "at most 100 records per request");
                let mut refused = Vec::new();
                for (i, (key, seq)) in records.into_iter().enumerate() {
                    if seq % 7 == 3 {
                        refused.push(json!({"RecordIndex": i, "Reason": "A record with the same dimensions, time and measure name already exists", "ExistingVersion": 1}));
                        rej.lock().expect("lock").push(key);
                    } else {
                        acc.lock().expect("lock").push(key);
                    }
                }
                if refused.is_empty() {
                    ok(json!({"RecordsIngested": {"Total": 1, "MemoryStore": 1, "MagneticStore": 0}}))
                } else {
                    aws_error(400, "RejectedRecordsException", json!({"RejectedRecords": refused}))
                }
            }
        },
        other => Reply::new(400, format!("unexpected operation {other:?}")),
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = pipeline(
        &server.url(),
        "db",
        dir.path(),
        "devices = 2\ncount = 1400\nseed = 12",
        "in_flight = 2",
    );
    run_pipeline(&toml).await.expect("pipeline runs");

    let sent: Vec<_> = read_json_lines(&dir.path().join("sent.jsonl"))
        .iter()
        .map(key_of)
        .collect();
    assert_eq!(sent.len(), 1400);
    let accepted = accepted.lock().expect("lock").clone();
    let rejected = rejected.lock().expect("lock").clone();
    assert!(!rejected.is_empty());
    let mut all = accepted.clone();
    all.extend(rejected.iter().cloned());
    assert_eq!(
        counts(all),
        counts(sent.clone()),
        "every record answered exactly once"
    );
    let dead = read_json_lines(&dir.path().join("dead.jsonl"));
    assert_eq!(
        counts(dead.iter().map(key_of)),
        counts(rejected),
        "dead letter holds exactly the rejected records"
    );
    for d in &dead {
        let error = d["error"].as_str().expect("reason");
        assert!(
            error.contains("already exists") && error.contains("existing version 1"),
            "{error}"
        );
    }
    let common = server
        .requests()
        .iter()
        .filter(|r| target(r) == "WriteRecords")
        .filter_map(|r| serde_json::from_slice::<Json>(&r.body).ok())
        .filter(|b| device_dimension(&b["CommonAttributes"]["Dimensions"]).is_some())
        .count();
    assert!(
        common > 0,
        "requests of one device carry it in CommonAttributes"
    );
    // The throttled and failed attempts were retried: 2 extra requests.
    let write_requests = server
        .requests()
        .iter()
        .filter(|r| target(r) == "WriteRecords")
        .count();
    assert_eq!(write_requests, writes.load(Ordering::SeqCst));
    assert!(write_requests >= 1400 / 100 + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_denied_and_missing_table_fail_at_start() {
    aws_env();
    let server = start(|req| match target(req) {
        "DescribeTable" => aws_error(400, "AccessDeniedException", json!({})),
        _ => Reply::new(400, "unexpected"),
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let err = run_pipeline(&pipeline(&server.url(), "db", dir.path(), "count = 5", ""))
        .await
        .expect_err("access denied stops the pipeline");
    assert!(
        err.contains("AccessDeniedException") && err.contains("db.telemetry"),
        "{err}"
    );

    let server = start(|req| match target(req) {
        "DescribeTable" => aws_error(400, "ResourceNotFoundException", json!({})),
        _ => Reply::new(400, "unexpected"),
    })
    .await;
    let err = run_pipeline(&pipeline(&server.url(), "db", dir.path(), "count = 5", ""))
        .await
        .expect_err("missing table stops the pipeline");
    assert!(err.contains("create_if_missing"), "{err}");
    assert!(server
        .requests()
        .iter()
        .all(|r| target(r) != "WriteRecords"));
}

/// Asserts two multisets of keys are equal, printing sizes and a few differences only.
fn same(got: impl IntoIterator<Item = (String, String)>, want: Vec<(String, String)>, what: &str) {
    let (got, want) = (counts(got), counts(want));
    if got != want {
        let missing: Vec<_> = want
            .iter()
            .filter(|(k, n)| got.get(*k) != Some(n))
            .take(5)
            .collect();
        let extra: Vec<_> = got
            .iter()
            .filter(|(k, n)| want.get(*k) != Some(n))
            .take(5)
            .collect();
        panic!(
            "{what}: {} keys, expected {}; expected but not so (first 5): {missing:?}; unexpected (first 5): {extra:?}",
            got.len(),
            want.len()
        );
    }
}

/// A `ValidationException` carries no per-record detail: the sink splits the request in halves
/// until the bad record is alone, dead-letters only it and delivers the others (issue 13, 11a).
/// moto's Timestream validates nothing, so the canned server refuses every request that holds
/// a poison record (`seq % 97 == 5`) and stores the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_exception_is_bisected_down_to_the_bad_records() {
    aws_env();
    let accepted: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let poison: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let (acc, poi) = (accepted.clone(), poison.clone());
    let server = start(move |req| match target(req) {
        "DescribeTable" => describe_table(),
        "WriteRecords" => {
            let records = records_of(req);
            let bad: Vec<_> = records
                .iter()
                .filter(|(_, seq)| seq % 97 == 5)
                .map(|(k, _)| k.clone())
                .collect();
            if bad.is_empty() {
                acc.lock()
                    .expect("lock")
                    .extend(records.into_iter().map(|(k, _)| k));
                ok(json!({"RecordsIngested": {"Total": 1, "MemoryStore": 1, "MagneticStore": 0}}))
            } else {
                if records.len() == 1 {
                    poi.lock().expect("lock").extend(bad);
                }
                aws_error(400, "ValidationException", json!({}))
            }
        }
        other => Reply::new(400, format!("unexpected operation {other:?}")),
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = pipeline(
        &server.url(),
        "db",
        dir.path(),
        "devices = 3\ncount = 1200\nseed = 13",
        "in_flight = 2",
    );
    run_pipeline(&toml).await.expect("pipeline runs");

    let sent = read_json_lines(&dir.path().join("sent.jsonl"));
    assert_eq!(sent.len(), 1200);
    let bad_sent: Vec<_> = sent
        .iter()
        .filter(|r| r["fields"]["seq"].as_i64().expect("seq") % 97 == 5)
        .map(key_of)
        .collect();
    assert!(
        !bad_sent.is_empty(),
        "the simulator produced poison records"
    );
    let good_sent: Vec<_> = sent
        .iter()
        .filter(|r| r["fields"]["seq"].as_i64().expect("seq") % 97 != 5)
        .map(key_of)
        .collect();
    let dead = read_json_lines(&dir.path().join("dead.jsonl"));
    same(
        dead.iter().map(key_of),
        bad_sent.clone(),
        "only the records Timestream refuses are dead-lettered",
    );
    for d in &dead {
        let error = d["error"].as_str().expect("reason");
        assert!(error.contains("ValidationException"), "{error}");
    }
    same(
        accepted.lock().expect("lock").clone(),
        good_sent,
        "every other record of the refused requests is delivered, once",
    );
    same(
        poison.lock().expect("lock").clone(),
        bad_sent,
        "each poison record was isolated in a request of its own",
    );
}
