//! `dynamodb` sink against moto (DynamoDB on 127.0.0.1:5000, started by
//! `scripts/services.sh start`), read back with the AWS SDK (Scan / GetItem); throttling,
//! 5xx and validation errors against a small HTTP server speaking the DynamoDB JSON protocol,
//! started inside the test (moto produces none of them on demand).

mod http_server;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use http_server::{read_json_lines, registry, start, unique, Captured, Reply};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{json, Value as Json};
use sluice_core::metrics::{Kind, Metrics};

const MOTO: &str = "127.0.0.1:5000";
const SEVEN_DAYS_S: i64 = 7 * 86_400;

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
    assert!(
        std::net::TcpStream::connect_timeout(
            &MOTO.parse().expect("address"),
            Duration::from_secs(2)
        )
        .is_ok(),
        "moto is not listening on {MOTO}: run `scripts/services.sh start moto`"
    );
}

fn client() -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::Config::builder()
            .behavior_version_latest()
            .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_dynamodb::config::Credentials::for_tests())
            .endpoint_url(format!("http://{MOTO}"))
            .http_client(aws_smithy_http_client::Builder::new().build_http())
            .build(),
    )
}

/// Runs the pipeline to completion; returns its metrics.
async fn run(toml: &str) -> Metrics {
    let config = sluice_core::config::parse_str(toml, Path::new("test.toml"))
        .unwrap_or_else(|e| panic!("pipeline parses: {e:?}"));
    let metrics = Metrics::new();
    sluice_core::topology::run(config, &registry(), &metrics, None)
        .await
        .expect("pipeline runs");
    metrics
}

fn counter(metrics: &Metrics, name: &'static str) -> i64 {
    metrics
        .component("state", Kind::Sink)
        .counter(name)
        .load(Ordering::Relaxed)
}

fn write_lines(path: &Path, lines: &[Json]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).expect("write input");
}

/// file source (JSON lines, `device_id` and `site` as tags) → dynamodb; dead letters → file.
fn pipeline(endpoint: &str, table: &str, dir: &Path, extra: &str) -> String {
    format!(
        r#"
[sources.in]
type = "file"
path = "{dir}/in.jsonl"
batch_size = 512
decode = {{ tags = ["device_id", "site"] }}

[sinks.state]
type = "dynamodb"
inputs = ["in"]
endpoint_url = "{endpoint}"
region = "us-east-1"
table = "{table}"
ttl = "7d"
retry = {{ initial_backoff = "20ms", max_backoff = "500ms", max_retries = 6 }}
{extra}

[sinks.dead]
type = "file"
inputs = ["state.dead_letter"]
path = "{dir}/dead.jsonl"
fsync = false
"#,
        dir = dir.display()
    )
}

/// An item's attributes as comparable text: `S:…`, `BOOL:…`, numbers as `N:` + the f64 in
/// shortest form (DynamoDB may normalize number text).
fn normalize(item: &std::collections::HashMap<String, AttributeValue>) -> BTreeMap<String, String> {
    item.iter()
        .map(|(k, v)| {
            let text = match v {
                AttributeValue::S(s) => format!("S:{s}"),
                AttributeValue::Bool(b) => format!("BOOL:{b}"),
                AttributeValue::N(n) => format!(
                    "N:{}",
                    ryu::Buffer::new().format(n.parse::<f64>().expect("number"))
                ),
                other => format!("{other:?}"),
            };
            (k.clone(), text)
        })
        .collect()
}

/// What the sink must have stored for this input line (the JSON of one reading).
fn expected_item(line: &Json) -> BTreeMap<String, String> {
    let ms = line["ts"].as_i64().expect("ts");
    let mut m = BTreeMap::new();
    for (k, v) in line.as_object().expect("object") {
        let text = match v {
            Json::String(s) => format!("S:{s}"),
            Json::Bool(b) => format!("BOOL:{b}"),
            Json::Number(n) => format!(
                "N:{}",
                ryu::Buffer::new().format(n.as_f64().expect("number"))
            ),
            other => panic!("unexpected {other}"),
        };
        if k != "ts" {
            m.insert(k.clone(), text);
        }
    }
    m.insert(
        "event_time".into(),
        format!("N:{}", ryu::Buffer::new().format(ms as f64)),
    );
    m.insert(
        "ttl".into(),
        format!(
            "N:{}",
            ryu::Buffer::new().format((ms.div_euclid(1000) + SEVEN_DAYS_S) as f64)
        ),
    );
    m
}

async fn scan_all(table: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let client = client();
    let mut items = BTreeMap::new();
    let mut start = None;
    loop {
        let page = client
            .scan()
            .table_name(table)
            .set_exclusive_start_key(start)
            .send()
            .await
            .expect("scan");
        for item in page.items() {
            let n = normalize(item);
            let key = n.get("device_id").expect("device_id").clone();
            items.insert(key.trim_start_matches("S:").to_string(), n);
        }
        start = page.last_evaluated_key().cloned();
        if start.is_none() {
            break;
        }
    }
    items
}

async fn get_item(table: &str, device: &str) -> Option<BTreeMap<String, String>> {
    client()
        .get_item()
        .table_name(table)
        .key("device_id", AttributeValue::S(device.into()))
        .consistent_read(true)
        .send()
        .await
        .expect("get_item")
        .item()
        .map(normalize)
}

fn reading(device: usize, i: i64) -> Json {
    json!({
        "ts": 1_767_225_600_000i64 + i * 1_000 + device as i64,
        "device_id": format!("dev-{device:03}"),
        "site": format!("site-{}", device % 7),
        "temp": 20.25 + (i as f64) * 0.1 + (device as f64) * 0.001,
        "seq": i,
        "ok": i % 2 == 0,
        "status": format!("s{i}"),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_updates_in_random_order_leave_each_devices_newest_reading() {
    aws_env();
    require_moto();
    let table = unique("state");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut lines: Vec<Json> = (0..100)
        .flat_map(|d| (0..100).map(move |i| reading(d, i)))
        .collect();
    let newest: BTreeMap<String, Json> = (0..100)
        .map(|d| (format!("dev-{d:03}"), reading(d, 99)))
        .collect();
    lines.shuffle(&mut StdRng::seed_from_u64(14));
    write_lines(&dir.path().join("in.jsonl"), &lines);
    // Batches of at most 1,000: the 10,000 updates reach the sink in at least 10 batches, so
    // older readings arrive after newer ones were written and must be refused by DynamoDB.
    let toml = pipeline(
        &format!("http://{MOTO}"),
        &table,
        dir.path(),
        "create_table = true\nin_flight = 16\nbatch = { max_records = 1000, max_bytes = \"10MiB\", max_age = \"1s\" }",
    );
    let started = Instant::now();
    let metrics = run(&toml).await;
    let elapsed = started.elapsed();
    let snap = metrics.component("state", Kind::Sink).snapshot();
    let (superseded, coalesced) = (
        counter(&metrics, "superseded"),
        counter(&metrics, "coalesced"),
    );
    eprintln!(
        "dynamodb → moto: 10000 records in {elapsed:.2?} ({:.0} records/s end to end); {} UpdateItem written, {superseded} superseded, {coalesced} coalesced in batches",
        10_000.0 / elapsed.as_secs_f64(),
        10_000 - superseded - coalesced
    );
    assert!(read_json_lines(&dir.path().join("dead.jsonl")).is_empty());
    assert_eq!(snap.records_out, 10_000, "every record delivered");
    assert_eq!(snap.errors, 0);

    let stored = scan_all(&table).await;
    assert_eq!(stored.len(), 100, "one item per device");
    for (device, line) in &newest {
        let want = expected_item(line);
        assert_eq!(stored.get(device), Some(&want), "item of {device}");
    }
    assert!(
        superseded > 0 && coalesced > 0,
        "random order over several batches: some older readings are refused by the condition ({superseded}) and some dropped within a batch ({coalesced})"
    );
    // GetItem (strongly consistent) agrees with the scan.
    assert_eq!(
        get_item(&table, "dev-042").await.as_ref(),
        stored.get("dev-042")
    );
    let ttl = client()
        .describe_time_to_live()
        .table_name(&table)
        .send()
        .await
        .expect("describe TTL");
    assert_eq!(
        ttl.time_to_live_description()
            .and_then(|d| d.attribute_name()),
        Some("ttl"),
        "create_table enables TTL on the ttl attribute"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_or_redelivered_message_does_not_overwrite_newer_state() {
    aws_env();
    require_moto();
    let table = unique("state");
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = "create_table = true\nbatch = { max_records = 1, max_bytes = \"1MiB\", max_age = \"100ms\" }";
    let toml = pipeline(&format!("http://{MOTO}"), &table, dir.path(), extra);
    let first = [reading(1, 50), reading(2, 10)];
    write_lines(&dir.path().join("in.jsonl"), &first);
    run(&toml).await;
    assert_eq!(
        get_item(&table, "dev-001").await,
        Some(expected_item(&first[0]))
    );

    // Redelivery of the same message with other content (same event time), an older one, and
    // a newer one for another device; one record per batch, so each meets the condition.
    let mut same_time = reading(1, 50);
    same_time["status"] = json!("redelivered");
    let second = [same_time, reading(1, 49), reading(2, 11)];
    write_lines(&dir.path().join("in.jsonl"), &second);
    let metrics = run(&toml).await;
    assert_eq!(
        get_item(&table, "dev-001").await,
        Some(expected_item(&first[0])),
        "neither the redelivered nor the older message overwrote dev-001"
    );
    assert_eq!(
        get_item(&table, "dev-002").await,
        Some(expected_item(&second[2])),
        "the newer message for dev-002 was written"
    );
    let snap = metrics.component("state", Kind::Sink).snapshot();
    assert_eq!(
        snap.records_out, 3,
        "superseded messages count as delivered"
    );
    assert_eq!(counter(&metrics, "superseded"), 2);
    assert_eq!(counter(&metrics, "coalesced"), 0);
    assert!(read_json_lines(&dir.path().join("dead.jsonl")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_without_the_key_tag_are_dead_lettered_and_the_rest_delivered() {
    aws_env();
    require_moto();
    let table = unique("state");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut no_key = reading(5, 1);
    no_key.as_object_mut().expect("object").remove("device_id");
    let mut empty_key = reading(6, 1);
    empty_key["device_id"] = json!("");
    let mut empty_field_name = reading(7, 1);
    empty_field_name[""] = json!(5);
    let lines = [
        reading(3, 1),
        no_key,
        reading(4, 1),
        empty_key,
        empty_field_name,
    ];
    write_lines(&dir.path().join("in.jsonl"), &lines);
    let toml = pipeline(
        &format!("http://{MOTO}"),
        &table,
        dir.path(),
        "create_table = true",
    );
    let metrics = run(&toml).await;
    let dead = read_json_lines(&dir.path().join("dead.jsonl"));
    assert_eq!(dead.len(), 3, "{dead:?}");
    for d in &dead[..2] {
        let error = d["error"].as_str().expect("reason");
        assert!(
            error.contains("`device_id`") && error.contains("dynamodb"),
            "reason names the key: {error}"
        );
        assert_eq!(d["fields"]["seq"], 1);
    }
    assert_eq!(dead[2]["tags"]["device_id"], "dev-007");
    let error = dead[2]["error"].as_str().expect("reason");
    assert!(error.contains("empty name"), "{error}");
    let stored = scan_all(&table).await;
    assert_eq!(stored.keys().collect::<Vec<_>>(), ["dev-003", "dev-004"]);
    assert_eq!(stored["dev-003"], expected_item(&lines[0]));
    assert_eq!(stored["dev-004"], expected_item(&lines[2]));
    let snap = metrics.component("state", Kind::Sink).snapshot();
    assert_eq!((snap.records_out, snap.errors), (2, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_stops_the_pipeline_at_start_with_a_hint() {
    aws_env();
    require_moto();
    let dir = tempfile::tempdir().expect("tempdir");
    write_lines(&dir.path().join("in.jsonl"), &[reading(1, 1)]);
    let toml = pipeline(&format!("http://{MOTO}"), &unique("absent"), dir.path(), "");
    let config = sluice_core::config::parse_str(&toml, Path::new("test.toml")).expect("parses");
    let err = sluice_core::topology::run(config, &registry(), &Metrics::new(), None)
        .await
        .expect_err("no table");
    let err = err.to_string();
    assert!(err.contains("create_table = true"), "{err}");
}

fn target(req: &Captured) -> &str {
    req.header("x-amz-target")
        .and_then(|t| t.rsplit('.').next())
        .unwrap_or("")
}

fn aws_error(status: u16, kind: &str) -> Reply {
    let body = json!({"__type": format!("com.amazonaws.dynamodb.v20120810#{kind}"), "message": format!("canned {kind}")});
    Reply::new(status, body.to_string()).header("content-type", "application/x-amz-json-1.0")
}

fn ok(body: Json) -> Reply {
    Reply::new(200, body.to_string()).header("content-type", "application/x-amz-json-1.0")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_5xx_are_retried_and_a_validation_error_dead_letters_one_record() {
    aws_env();
    let written: Arc<Mutex<Vec<Json>>> = Arc::default();
    let updates = Arc::new(AtomicUsize::new(0));
    let (w, u) = (written.clone(), updates.clone());
    let server = start(move |req| match target(req) {
        "DescribeTable" => ok(json!({"Table": {"TableName": "t", "TableStatus": "ACTIVE"}})),
        "UpdateItem" => {
            let body: Json = serde_json::from_slice(&req.body).expect("JSON request");
            match u.fetch_add(1, Ordering::SeqCst) {
                0 => aws_error(400, "ProvisionedThroughputExceededException"),
                1 => aws_error(400, "ThrottlingException"),
                2 => aws_error(500, "InternalServerError"),
                _ if body["Key"]["device_id"]["S"] == "dev-002" => {
                    aws_error(400, "ValidationException")
                }
                _ => {
                    w.lock().expect("lock").push(body);
                    ok(json!({}))
                }
            }
        }
        other => aws_error(400, &format!("Unexpected{other}")),
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let lines = [reading(1, 7), reading(2, 7), reading(3, 7)];
    write_lines(&dir.path().join("in.jsonl"), &lines);
    let toml = pipeline(&server.url(), "t", dir.path(), "in_flight = 1");
    let metrics = run(&toml).await;

    let dead = read_json_lines(&dir.path().join("dead.jsonl"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["tags"]["device_id"], "dev-002");
    let reason = dead[0]["error"].as_str().expect("reason");
    assert!(reason.contains("ValidationException"), "{reason}");
    let written = written.lock().expect("lock").clone();
    let mut devices: Vec<&str> = written
        .iter()
        .map(|b| b["Key"]["device_id"]["S"].as_str().expect("key"))
        .collect();
    devices.sort();
    assert_eq!(devices, ["dev-001", "dev-003"]);
    let body = &written[0];
    assert_eq!(
        body["ConditionExpression"],
        "attribute_not_exists(#t) OR #t < :t"
    );
    assert_eq!(body["ExpressionAttributeNames"]["#t"], "event_time");
    let device = body["Key"]["device_id"]["S"].as_str().expect("key");
    let line = lines
        .iter()
        .find(|l| l["device_id"] == device)
        .expect("line");
    assert_eq!(
        body["ExpressionAttributeValues"][":t"]["N"],
        line["ts"].as_i64().expect("ts").to_string()
    );
    assert!(
        updates.load(Ordering::SeqCst) >= 6,
        "3 failed attempts + 3 records"
    );
    assert_eq!(counter(&metrics, "retries"), 3);
    let snap = metrics.component("state", Kind::Sink).snapshot();
    assert_eq!((snap.records_out, snap.errors), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_used_up_leave_records_errored_and_a_vanished_table_stops_the_sink() {
    aws_env();
    let dir = tempfile::tempdir().expect("tempdir");
    let lines = [reading(1, 1), reading(2, 1), reading(1, 2)];
    write_lines(&dir.path().join("in.jsonl"), &lines);

    // Always 503: after max_retries every record is Errored (the source would redeliver them),
    // nothing is dead-lettered, and the pipeline keeps running to the end of its input.
    let server = start(|req| match target(req) {
        "DescribeTable" => ok(json!({"Table": {"TableName": "t", "TableStatus": "ACTIVE"}})),
        _ => aws_error(503, "ServiceUnavailable"),
    })
    .await;
    let toml =
        pipeline(&server.url(), "t", dir.path(), "").replace("max_retries = 6", "max_retries = 2");
    let metrics = run(&toml).await;
    let updates = server
        .requests()
        .iter()
        .filter(|r| target(r) == "UpdateItem")
        .count();
    assert_eq!(
        updates,
        2 * 3,
        "dev-001 coalesced to one key: 2 keys × 3 attempts"
    );
    let snap = metrics.component("state", Kind::Sink).snapshot();
    assert_eq!((snap.records_out, snap.errors), (0, 3));
    assert!(read_json_lines(&dir.path().join("dead.jsonl")).is_empty());

    // The table disappears while running: the sink stops with an error naming the table.
    let server = start(|req| match target(req) {
        "DescribeTable" => ok(json!({"Table": {"TableName": "t", "TableStatus": "ACTIVE"}})),
        _ => aws_error(400, "ResourceNotFoundException"),
    })
    .await;
    let toml = pipeline(&server.url(), "t", dir.path(), "");
    let config = sluice_core::config::parse_str(&toml, Path::new("test.toml")).expect("parses");
    let err = sluice_core::topology::run(config, &registry(), &Metrics::new(), None)
        .await
        .expect_err("the sink stops")
        .to_string();
    assert!(
        err.contains("table `t`") && err.contains("is gone"),
        "{err}"
    );
}
