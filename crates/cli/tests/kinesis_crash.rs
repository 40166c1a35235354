//! The `kinesis` source through the real binary against moto (`scripts/services.sh start`):
//!
//! * `kill_9_midway_resumes_from_the_checkpoints`: 20,000 records in 4 shards flow kinesis →
//!   slow file sink; `sluice` is killed with SIGKILL midway and started again (a new worker id:
//!   it takes the dead process's leases once `lease_timeout` passed). Every record must be in
//!   the file, and the restart must resume from the checkpoints (fewer duplicates than records
//!   written before the kill; reading from the start again would duplicate all of them).
//! * `two_processes_split_the_shards_and_one_takes_over_after_kill_9`: two processes share the
//!   lease table and hold 2 shards each; one is killed, records keep coming, and the other
//!   takes over the dead one's leases: every record is in one of the two files.
//!
//! Records are put with boto3 (the services venv), so the CLI tests need no AWS SDK.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_all_present, duplicates, wait_for, written, Sluice};

const ENDPOINT: &str = "http://127.0.0.1:5000";

/// boto3 helper: `create STREAM SHARDS`, `put STREAM FROM TO` (`{"seq":n}` with partition key
/// `k{n % 1000}`, 500 per PutRecords), `leases TABLE` (JSON {shard: [checkpoint, owner]}).
const HELPER: &str = r#"
import sys, json, time, boto3
kw = dict(endpoint_url=sys.argv[1], region_name="us-east-1",
          aws_access_key_id="test", aws_secret_access_key="test")
cmd, args = sys.argv[2], sys.argv[3:]
if cmd == "create":
    k = boto3.client("kinesis", **kw)
    k.create_stream(StreamName=args[0], ShardCount=int(args[1]))
    while k.describe_stream_summary(StreamName=args[0])["StreamDescriptionSummary"]["StreamStatus"] != "ACTIVE":
        time.sleep(0.1)
elif cmd == "put":
    k = boto3.client("kinesis", **kw)
    n, end = int(args[1]), int(args[2])
    while n < end:
        batch = range(n, min(n + 500, end))
        out = k.put_records(StreamName=args[0], Records=[
            {"Data": json.dumps({"seq": i, "device": "d%d" % (i % 1000)}).encode(),
             "PartitionKey": "k%d" % (i % 1000)} for i in batch])
        assert out["FailedRecordCount"] == 0, out
        n = batch[-1] + 1
elif cmd == "leases":
    d = boto3.client("dynamodb", **kw)
    try:
        items = d.scan(TableName=args[0], ConsistentRead=True)["Items"]
    except d.exceptions.ResourceNotFoundException:
        items = []
    print(json.dumps({i["leaseKey"]["S"]: [i["checkpoint"]["S"], i.get("leaseOwner", {}).get("S")] for i in items}))
"#;

fn python() -> PathBuf {
    let dir = std::env::var("SLUICE_SERVICES_DIR").unwrap_or("/tmp/sluice-services".into());
    let py = Path::new(&dir).join("venv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: run `scripts/services.sh start` (its venv has boto3)",
        py.display()
    );
    py
}

fn require_moto() {
    if std::net::TcpStream::connect_timeout(
        &"127.0.0.1:5000".parse().expect("address"),
        Duration::from_secs(2),
    )
    .is_err()
    {
        panic!("moto (Kinesis, DynamoDB) is not listening on 127.0.0.1:5000: run `scripts/services.sh start`");
    }
}

fn helper(dir: &Path, args: &[&str]) -> String {
    let script = dir.join("kinesis_helper.py");
    if !script.exists() {
        std::fs::write(&script, HELPER).expect("write helper");
    }
    let out = Command::new(python())
        .arg(script)
        .arg(ENDPOINT)
        .args(args)
        .output()
        .expect("run the boto3 helper");
    assert!(
        out.status.success(),
        "helper {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A fresh stream and lease-table name for `test`.
fn stream(dir: &Path, test: &str, shards: u32) -> (String, String) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = format!("sluice-{test}-{}-{nanos}", std::process::id());
    helper(dir, &["create", &name, &shards.to_string()]);
    let table = format!("{name}-leases");
    (name, table)
}

fn put(dir: &Path, stream: &str, from: u64, to: u64) {
    helper(dir, &["put", stream, &from.to_string(), &to.to_string()]);
}

/// shard → (checkpoint, owner).
fn leases(dir: &Path, table: &str) -> BTreeMap<String, (String, Option<String>)> {
    let text = helper(dir, &["leases", table]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("leases {text:?}: {e}"))
}

fn pipeline(
    dir: &Path,
    name: &str,
    stream: &str,
    table: &str,
    out: &Path,
    worker: &str,
) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"[pipeline]
id = "kinesis-binary-test-{name}"

[sources.in]
type = "kinesis"
stream_name = "{stream}"
lease_table = "{table}"
endpoint_url = "{ENDPOINT}"
region = "us-east-1"
max_records = 500
poll_interval = "200ms"
lease_timeout = "3s"
checkpoint_interval = "200ms"
{worker}

[sinks.out]
type = "file"
inputs = ["in"]
path = "{}"
write_delay = "50ms"
batch = {{ max_records = 200, max_age = "50ms" }}
"#,
            out.display()
        ),
    )
    .expect("write pipeline");
    path
}

fn start(pipeline: &Path) -> Sluice {
    Sluice::start(
        pipeline,
        &[
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
            ("RUST_LOG", "warn"),
        ],
        None,
    )
}

fn stop(s: Sluice) {
    let status = s.interrupt(Duration::from_secs(60));
    assert!(status.success(), "sluice exited with {status}");
}

#[test]
fn kill_9_midway_resumes_from_the_checkpoints() {
    require_moto();
    const RECORDS: u64 = 20_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let (stream, table) = stream(dir.path(), "crash", 4);
    put(dir.path(), &stream, 0, RECORDS);
    let out = dir.path().join("out.jsonl");
    let pipeline = pipeline(dir.path(), "crash", &stream, &table, &out, "");
    let first = start(&pipeline);
    let before = wait_for(&out, 5_000, Duration::from_secs(120));
    assert!(
        before.len() >= 5_000,
        "the first run wrote {}",
        before.len()
    );
    first.kill();
    let at_kill = written(&out);
    assert!(
        (at_kill.len() as u64) < RECORDS,
        "killed too late to test anything ({} written)",
        at_kill.len()
    );
    let checkpoints = leases(dir.path(), &table);
    assert_eq!(checkpoints.len(), 4, "{checkpoints:?}");

    let t0 = Instant::now();
    let second = start(&pipeline);
    let seen = wait_for(&out, RECORDS as usize, Duration::from_secs(180));
    let took = t0.elapsed();
    stop(second);
    eprintln!(
        "kinesis crash test: {RECORDS} records, {} written before kill -9, {} distinct after \
         restart ({took:?}, including the 3 s lease timeout), {} duplicates; checkpoints at kill: {checkpoints:?}",
        at_kill.len(),
        seen.len(),
        duplicates(&seen)
    );
    assert_all_present(RECORDS, &seen);
    assert!(
        duplicates(&seen) < at_kill.len() as u64,
        "the restart read again from the start, not from the checkpoints: {} duplicates, {} \
         written before the kill",
        duplicates(&seen),
        at_kill.len()
    );
    // The graceful stop freed every lease and left each shard checkpointed.
    let end = leases(dir.path(), &table);
    assert!(
        end.values()
            .all(|(c, o)| o.is_none() && c.parse::<u64>().is_ok()),
        "{end:?}"
    );
}

#[test]
fn two_processes_split_the_shards_and_one_takes_over_after_kill_9() {
    require_moto();
    let dir = tempfile::tempdir().expect("tempdir");
    let (stream, table) = stream(dir.path(), "pair", 4);
    put(dir.path(), &stream, 0, 4_000);
    let (out_a, out_b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    let tag = std::process::id();
    let (wa, wb) = (format!("a-{tag}"), format!("b-{tag}"));
    let a = start(&pipeline(
        dir.path(),
        "a",
        &stream,
        &table,
        &out_a,
        &format!("worker_id = \"{wa}\""),
    ));
    wait_for(&out_a, 1, Duration::from_secs(60));
    let b = start(&pipeline(
        dir.path(),
        "b",
        &stream,
        &table,
        &out_b,
        &format!("worker_id = \"{wb}\""),
    ));
    let owners = |l: &BTreeMap<String, (String, Option<String>)>, w: &str| {
        l.values().filter(|(_, o)| o.as_deref() == Some(w)).count()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let l = leases(dir.path(), &table);
        if owners(&l, &wa) == 2 && owners(&l, &wb) == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no 2 + 2 split: {l:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    a.kill();
    put(dir.path(), &stream, 4_000, 8_000);
    let deadline = Instant::now() + Duration::from_secs(120);
    let seen = loop {
        let mut seen = written(&out_a);
        for (k, n) in written(&out_b) {
            *seen.entry(k).or_insert(0) += n;
        }
        if seen.len() >= 8_000 || Instant::now() > deadline {
            break seen;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let l = leases(dir.path(), &table);
    stop(b);
    eprintln!(
        "kinesis two-process test: 8000 records, {} by a (killed), {} by b, {} duplicates",
        written(&out_a).len(),
        written(&out_b).len(),
        duplicates(&seen)
    );
    assert_all_present(8_000, &seen);
    assert_eq!(
        owners(&l, &wb),
        4,
        "b holds every lease after a died: {l:?}"
    );
    assert!(!written(&out_a).is_empty() && !written(&out_b).is_empty());
}
