//! A hung endpoint (issue 13, item 9c): sinks talking to a server that accepts connections but
//! never answers must time out, log a WARN naming the endpoint, count it in the `timeouts`
//! metric, report the batch `Errored` (or retry it) instead of hanging, and deliver once the
//! server answers again.
//!
//! Each test starts a private server of its own (moto from the services venv, see
//! `scripts/services.sh start moto`) on free ports and freezes it with SIGSTOP; the shared
//! services are never stopped.

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use sluice_core::ack::{self, BatchStatus, StatusReceiver};
use sluice_core::record::{Batch, Record, Value};
use sluice_core::testing::{status_within, SinkHarness};

/// Everything logged by this test binary, to check the WARN lines.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(Arc::default)
}

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Dummy credentials: the servers are private moto instances, never real AWS.
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::remove_var("AWS_PROFILE");
        let capture = Capture(logs().clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_ansi(false)
            .with_writer(move || capture.clone())
            .try_init();
    });
}

/// WARN lines logged so far that contain every one of `needles`.
fn warnings_with(needles: &[&str]) -> Vec<String> {
    let logs = logs().lock().unwrap_or_else(|p| p.into_inner());
    String::from_utf8_lossy(&logs)
        .lines()
        .filter(|l| l.contains(" WARN ") && needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

fn services_dir() -> PathBuf {
    std::env::var_os("SLUICE_SERVICES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/sluice-services"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
        .is_ok()
}

/// A moto server of this test only (scripts/moto_server.py: S3, Timestream, SQS on `port`,
/// Timestream read-back on `dump_port`). Killed on drop.
struct PrivateMoto {
    child: Child,
    port: u16,
    dump_port: u16,
}

impl PrivateMoto {
    fn start() -> Self {
        let python = services_dir().join("venv/bin/python");
        assert!(
            python.exists(),
            "moto's venv is missing at {}: run `scripts/services.sh start moto`",
            python.display()
        );
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/moto_server.py");
        let (port, dump_port) = (free_port(), free_port());
        let child = Command::new(python)
            .arg(script)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--dump-port", &dump_port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a private moto");
        let moto = PrivateMoto {
            child,
            port,
            dump_port,
        };
        let started = Instant::now();
        while !(listening(port) && listening(dump_port)) {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "private moto did not listen on {port}/{dump_port} within 60s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill {signal} {}", self.child.id());
    }

    /// SIGSTOP: the kernel still accepts connections, nothing answers.
    fn freeze(&self) {
        self.signal("-STOP");
    }

    fn thaw(&self) {
        self.signal("-CONT");
    }
}

impl Drop for PrivateMoto {
    fn drop(&mut self) {
        let _ = self.signal_quietly();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PrivateMoto {
    fn signal_quietly(&self) -> std::io::Result<std::process::ExitStatus> {
        Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status()
    }
}

fn records(device: &str, n: i64) -> Vec<Record> {
    (0..n)
        .map(|i| {
            let mut r = Record::new(1_767_225_600_000_000_000 + i * 1_000_000_000);
            r.set_tag("device_id", device);
            r.set_field("seq", Value::I64(i));
            r.set_field("temp", Value::F64(20.0 + i as f64 / 10.0));
            r
        })
        .collect()
}

fn tracked(records: Vec<Record>) -> (Batch, StatusReceiver) {
    let (f, status) = ack::batch();
    let mut batch = Batch::new(records);
    for r in &mut batch.records {
        r.finalizers.push(f.clone());
    }
    f.finish(BatchStatus::Delivered);
    (batch, status)
}

async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn s3_client(endpoint: &str) -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::Config::builder()
            .behavior_version_latest()
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_s3::config::Credentials::for_tests())
            .endpoint_url(endpoint)
            .force_path_style(true)
            .http_client(aws_smithy_http_client::Builder::new().build_http())
            .build(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_frozen_server_times_out_then_delivers() {
    init();
    let moto = PrivateMoto::start();
    let s3 = s3_client(&moto.url());
    s3.create_bucket()
        .bucket("frozen")
        .send()
        .await
        .expect("create bucket");
    let config: sluice_sinks::parquet::ParquetSinkConfig = toml::from_str(&format!(
        r#"
destination = "s3://frozen/out/"
format = "jsonl"
key = "{{device_id}}/"
max_age = "1s"
s3 = {{ endpoint_url = "{}", force_path_style = true, region = "us-east-1", timeout = "2s" }}
"#,
        moto.url()
    ))
    .expect("parquet config");
    let sink = SinkHarness::start(&config, "lake_frozen", "timeouts")
        .await
        .expect("sink builds while the server answers");

    moto.freeze();
    let (batch, status) = tracked(records("frozen-1", 50));
    sink.out.send(batch).await.expect("send");
    // 3 SDK attempts of 2s each plus backoff: well within 90s, where it used to hang for good.
    let got = status_within(status, Duration::from_secs(90)).await;
    assert_eq!(
        got,
        Some(BatchStatus::Errored),
        "a frozen S3 must make the batch Errored (redelivered), not hang"
    );
    let timeouts = sink.metrics.counter("timeouts").load(Ordering::Relaxed);
    assert!(timeouts >= 1, "timeouts counted: {timeouts}");
    let endpoint = format!("127.0.0.1:{}", moto.port);
    let warned = warnings_with(&["lake_frozen", &endpoint, "timed out"]);
    assert!(
        !warned.is_empty(),
        "a WARN line naming the sink and the endpoint {endpoint}"
    );

    moto.thaw();
    // The source redelivers the Errored records: this time they are written.
    let (batch, status) = tracked(records("frozen-1", 50));
    sink.out.send(batch).await.expect("send");
    assert_eq!(
        status_within(status, Duration::from_secs(60)).await,
        Some(BatchStatus::Delivered),
        "delivered once the server answers again"
    );
    sink.stop(Duration::from_secs(30))
        .await
        .expect("sink stops");
    let listed = s3
        .list_objects_v2()
        .bucket("frozen")
        .prefix("out/frozen-1/")
        .send()
        .await
        .expect("list");
    let mut seqs = std::collections::BTreeSet::new();
    for object in listed.contents() {
        let body = s3
            .get_object()
            .bucket("frozen")
            .key(object.key().expect("key"))
            .send()
            .await
            .expect("get")
            .body
            .collect()
            .await
            .expect("body")
            .into_bytes();
        for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let v: serde_json::Value = serde_json::from_slice(line).expect("JSON line");
            seqs.insert(v["fields"]["seq"].as_i64().expect("fields.seq"));
        }
    }
    // At least once: an upload that timed out may still land once moto reads its socket.
    assert_eq!(seqs, (0..50).collect(), "every record written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestream_frozen_server_times_out_is_retried_then_delivers() {
    init();
    let moto = PrivateMoto::start();
    let config: sluice_sinks::timestream::TimestreamConfig = toml::from_str(&format!(
        r#"
database = "frozen"
table = "telemetry"
endpoint_url = "{}"
region = "us-east-1"
create_if_missing = true
timeout = "1s"
batch = {{ max_records = 100, max_age = "50ms" }}
retry = {{ initial_backoff = "100ms", max_backoff = "1s", max_retries = 1000 }}
"#,
        moto.url()
    ))
    .expect("timestream config");
    let sink = SinkHarness::start(&config, "ts_frozen", "timeouts")
        .await
        .expect("sink builds while the server answers");

    moto.freeze();
    let (batch, mut status) = tracked(records("frozen-ts", 40));
    sink.out.send(batch).await.expect("send");
    let timeouts = sink.metrics.counter("timeouts");
    wait_for(
        "a Timestream timeout counted",
        Duration::from_secs(60),
        || timeouts.load(Ordering::Relaxed) >= 2,
    )
    .await;
    let endpoint = format!("127.0.0.1:{}", moto.port);
    assert!(
        !warnings_with(&["ts_frozen", &endpoint, "timed out"]).is_empty(),
        "a WARN line naming the sink and the endpoint {endpoint}"
    );
    assert!(
        status.try_status().is_none(),
        "still retrying (not given up) while the server is frozen"
    );

    moto.thaw();
    assert_eq!(
        status_within(status, Duration::from_secs(60)).await,
        Some(BatchStatus::Delivered),
        "the retried request is delivered once the server answers again"
    );
    sink.stop(Duration::from_secs(30))
        .await
        .expect("sink stops");
    let body = reqwest::get(format!(
        "http://127.0.0.1:{}/timestream/frozen/telemetry",
        moto.dump_port
    ))
    .await
    .expect("read-back")
    .bytes()
    .await
    .expect("read-back body");
    let stored: Vec<serde_json::Value> = serde_json::from_slice(&body).expect("records as JSON");
    let seqs: std::collections::BTreeSet<i64> = stored
        .iter()
        .filter_map(|r| {
            r["MeasureValues"]
                .as_array()?
                .iter()
                .find(|m| m["Name"] == "seq")?["Value"]
                .as_str()?
                .parse()
                .ok()
        })
        .collect();
    // At least once: an attempt that timed out may still be stored once moto reads it.
    assert_eq!(seqs, (0..40).collect(), "every record stored");
}
