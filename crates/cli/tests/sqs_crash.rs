//! The `sqs` source through the real binary against moto (`scripts/services.sh start`):
//!
//! * `many_messages_through_4_receivers_into_a_file`: N messages (default 5,000; set
//!   `SLUICE_SQS_MESSAGES=20000` for the issue's full count) flow sqs (4 receivers) → file sink;
//!   every sequence number must be in the file and the queue empty afterwards.
//! * `kill_9_midway_loses_nothing`: sqs → slow file sink, `sluice` killed with SIGKILL midway
//!   and started again; every message must be in the file at least once (the killed process's
//!   un-deleted messages come back after the 2 s `visibility_timeout`) and the queue empty.
//!
//! **Why the queue is fed while the pipeline runs, not filled up front:** moto 5.2 scans every
//! message of a queue several times per call (`ReceiveMessage` computes the queue's attributes
//! ~30 times, `DeleteMessage` scans for the receipt handle), so a call costs O(queue length):
//! measured here, a 10-message receive takes ~0.17 s with 200 messages queued and ~4 s with
//! 2,000, which makes draining a pre-filled 20,000-message queue take hours. A feeder
//! (boto3 from the services venv, `SendMessageBatch`, several threads) keeps at most
//! `SLUICE_SQS_BACKLOG` (default 100) messages on the queue, visible or in flight. Real SQS has
//! no such cost; the test measures Sluice's correctness, not moto's speed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ENDPOINT: &str = "http://127.0.0.1:5000";

/// boto3 helper: `create NAME`, `feed URL N BACKLOG THREADS`, `depth URL`, `delete URL`.
const HELPER: &str = r#"
import sys, threading, time, boto3
c = boto3.client("sqs", endpoint_url=sys.argv[1], region_name="us-east-1",
                 aws_access_key_id="test", aws_secret_access_key="test")
cmd, args = sys.argv[2], sys.argv[3:]

def depth(url):
    a = c.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return sum(int(a[k]) for k in ("ApproximateNumberOfMessages",
               "ApproximateNumberOfMessagesNotVisible", "ApproximateNumberOfMessagesDelayed"))

if cmd == "create":
    print(c.create_queue(QueueName=args[0])["QueueUrl"])
elif cmd == "depth":
    print(depth(args[0]))
elif cmd == "delete":
    c.delete_queue(QueueUrl=args[0])
elif cmd == "feed":
    url, n, backlog, threads = args[0], int(args[1]), int(args[2]), int(args[3])
    lock = threading.Lock()
    state = {"next": 0, "room": 0}
    t0 = time.time()
    def work():
        while True:
            with lock:
                if state["next"] >= n:
                    return
                if state["room"] < 10:
                    state["room"] = backlog - depth(url)
                first = None
                if state["room"] >= 10:
                    first = state["next"]
                    state["next"] = min(n, first + 10)
                    state["room"] -= 10
            if first is None:
                time.sleep(0.05)
                continue
            entries = [{"Id": str(i), "MessageBody": '{"seq":%d,"temp":21.5,"pad":"%s"}' % (i, "x" * 150)}
                       for i in range(first, min(n, first + 10))]
            while entries:
                out = c.send_message_batch(QueueUrl=url, Entries=entries)
                failed = {f["Id"] for f in out.get("Failed", [])}
                entries = [e for e in entries if e["Id"] in failed]
    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts: t.start()
    for t in ts: t.join()
    print("fed %d messages in %.1f s" % (n, time.time() - t0), file=sys.stderr)
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
        panic!("moto (SQS) is not listening on 127.0.0.1:5000: run `scripts/services.sh start`");
    }
}

fn helper(dir: &Path, args: &[&str]) -> Command {
    let script = dir.join("sqs_helper.py");
    if !script.exists() {
        std::fs::write(&script, HELPER).expect("write helper");
    }
    let mut cmd = Command::new(python());
    cmd.arg(script).arg(ENDPOINT).args(args);
    cmd
}

fn helper_output(dir: &Path, args: &[&str]) -> String {
    let out = helper(dir, args).output().expect("run the boto3 helper");
    assert!(
        out.status.success(),
        "helper {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn create_queue(dir: &Path, test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    helper_output(
        dir,
        &[
            "create",
            &format!("sluice-{test}-{}-{nanos}", std::process::id()),
        ],
    )
}

fn depth(dir: &Path, url: &str) -> i64 {
    let d = helper_output(dir, &["depth", url]);
    d.parse()
        .unwrap_or_else(|_| panic!("queue depth {d:?} is not a number"))
}

/// Starts the feeder in the background: `n` messages `{"seq":i,…}` (~190 bytes).
fn feed(dir: &Path, url: &str, n: u64) -> Child {
    let backlog = std::env::var("SLUICE_SQS_BACKLOG").unwrap_or("100".into());
    helper(dir, &["feed", url, &n.to_string(), &backlog, "3"])
        .spawn()
        .expect("start the feeder")
}

fn start(pipeline: &Path) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(pipeline)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("sluice: {line}");
        }
    });
    child
}

fn pipeline(dir: &Path, url: &str, out: &Path, visibility: &str, sink_extra: &str) -> PathBuf {
    let path = dir.join("sqs.toml");
    std::fs::write(
        &path,
        format!(
            r#"[pipeline]
id = "sqs-binary-test"

[sources.in]
type = "sqs"
queue_url = "{url}"
endpoint_url = "{ENDPOINT}"
region = "us-east-1"
receivers = 4
wait_time = "1s"
visibility_timeout = "{visibility}"

[sinks.out]
type = "file"
inputs = ["in"]
path = "{}"
{sink_extra}
"#,
            out.display()
        ),
    )
    .expect("write pipeline");
    path
}

/// Sequence numbers in the file sink's output, with how often each was written.
fn written(path: &Path) -> BTreeMap<u64, u32> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut seen = BTreeMap::new();
    for line in text.lines() {
        // A SIGKILL can cut a line; the next run's first line is then glued to it. Parse
        // every `{"time":…}` object on the line separately.
        let starts: Vec<usize> = line.match_indices("{\"time\":").map(|(i, _)| i).collect();
        for (k, start) in starts.iter().enumerate() {
            let end = starts.get(k + 1).copied().unwrap_or(line.len());
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line[*start..end]) else {
                continue;
            };
            if let Some(s) = v.pointer("/fields/seq").and_then(|s| s.as_u64()) {
                *seen.entry(s).or_insert(0) += 1;
            }
        }
    }
    seen
}

fn wait_for(path: &Path, distinct: usize, timeout: Duration) -> BTreeMap<u64, u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = written(path);
        if seen.len() >= distinct || Instant::now() > deadline {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the queue holds nothing (visible, in flight or delayed).
fn wait_empty(dir: &Path, url: &str, timeout: Duration) -> i64 {
    let deadline = Instant::now() + timeout;
    loop {
        let d = depth(dir, url);
        if d == 0 || Instant::now() > deadline {
            return d;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let exit = child.wait().expect("sluice exits");
    assert!(exit.success(), "graceful stop after SIGINT: {exit:?}");
}

fn assert_all_present(messages: u64, seen: &BTreeMap<u64, u32>) {
    let missing: Vec<u64> = (0..messages).filter(|s| !seen.contains_key(s)).collect();
    assert!(
        missing.is_empty(),
        "lost {} of {messages} messages, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

fn duplicates(seen: &BTreeMap<u64, u32>) -> u64 {
    seen.values().map(|n| (*n as u64).saturating_sub(1)).sum()
}

#[test]
fn many_messages_through_4_receivers_into_a_file() {
    require_moto();
    let messages: u64 = std::env::var("SLUICE_SQS_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let url = create_queue(dir.path(), "many");
    let out = dir.path().join("out.jsonl");
    let pipeline = pipeline(
        dir.path(),
        &url,
        &out,
        "30s",
        r#"batch = { max_records = 1000, max_age = "100ms" }"#,
    );
    let started = Instant::now();
    let mut feeder = feed(dir.path(), &url, messages);
    let sluice = start(&pipeline);
    let seen = wait_for(
        &out,
        messages as usize,
        Duration::from_secs(60 + messages / 20),
    );
    let elapsed = started.elapsed();
    let fed = feeder.wait().expect("feeder");
    assert!(fed.success(), "feeder failed");
    assert_all_present(messages, &seen);
    let left = wait_empty(dir.path(), &url, Duration::from_secs(30));
    stop(sluice);
    eprintln!(
        "sqs → file: {messages} messages through 4 receivers in {:.1} s ({:.0} msg/s, moto-bound), \
         {} duplicates, {left} left on the queue",
        elapsed.as_secs_f64(),
        messages as f64 / elapsed.as_secs_f64(),
        duplicates(&seen)
    );
    assert_eq!(left, 0, "messages left on the queue");
    assert_eq!(depth(dir.path(), &url), 0, "queue empty after shutdown");
    helper_output(dir.path(), &["delete", &url]);
}

#[test]
fn kill_9_midway_loses_nothing() {
    require_moto();
    const MESSAGES: u64 = 2_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let url = create_queue(dir.path(), "crash");
    let out = dir.path().join("out.jsonl");
    // A slow sink (at most 20 records per 250 ms write): batches wait in flight, so the kill
    // leaves many received-but-undeleted messages, and their visibility gets extended.
    let pipeline = pipeline(
        dir.path(),
        &url,
        &out,
        "2s",
        r#"write_delay = "250ms"
batch = { max_records = 20, max_age = "50ms" }"#,
    );
    let mut feeder = feed(dir.path(), &url, MESSAGES);
    let mut first = start(&pipeline);
    let before_kill = wait_for(&out, 600, Duration::from_secs(60));
    assert!(
        before_kill.len() >= 600,
        "the first run wrote {} records",
        before_kill.len()
    );
    first.kill().expect("SIGKILL sluice");
    let _ = first.wait();
    let at_kill = written(&out);
    assert!(
        (at_kill.len() as u64) < MESSAGES,
        "killed too late to test anything ({} written)",
        at_kill.len()
    );

    let second = start(&pipeline);
    let seen = wait_for(&out, MESSAGES as usize, Duration::from_secs(120));
    let fed = feeder.wait().expect("feeder");
    assert!(fed.success(), "feeder failed");
    let left = wait_empty(dir.path(), &url, Duration::from_secs(30));
    stop(second);
    eprintln!(
        "sqs crash test: {MESSAGES} messages, {} written before kill -9, {} distinct after \
         restart, {} duplicates, {left} left on the queue",
        at_kill.len(),
        seen.len(),
        duplicates(&seen)
    );
    assert_all_present(MESSAGES, &seen);
    assert_eq!(left, 0, "messages left on the queue");
    assert_eq!(depth(dir.path(), &url), 0, "queue empty after shutdown");
    helper_output(dir.path(), &["delete", &url]);
}
