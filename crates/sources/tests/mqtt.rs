//! Integration tests of the `mqtt` source against a real mosquitto: the shared one on
//! 127.0.0.1:1883 (`scripts/services.sh start`) and private ones on other ports (TLS, restarts).
//! Every test uses its own topics and client ids, so they run in parallel.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sluice_core::ack::BatchStatus;
use sluice_core::channel::{buffer, BufferConfig, Input, Output, Outputs, DEAD_LETTER};
use sluice_core::metrics::{ComponentMetrics, Kind};
use sluice_core::record::{Origin, Record, Value};
use sluice_core::registry::{BuildContext, SourceConfig};
use sluice_core::source::SourceContext;
use sluice_mqtt::testing::{self, Mosquitto, BROKER};
use sluice_mqtt::Protocol;
use sluice_sources::mqtt::{MqttSourceConfig, TlsConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A source running in this process, with its default and dead-letter outputs readable.
struct Running {
    input: Input,
    dead: Input,
    metrics: Arc<ComponentMetrics>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), String>>,
}

async fn start(config: &MqttSourceConfig, name: &str) -> Running {
    start_with_buffer(config, name, 64).await
}

/// [`start`] with an output buffer of `max_batches` batches.
async fn start_with_buffer(config: &MqttSourceConfig, name: &str, max_batches: usize) -> Running {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let metrics = Arc::new(ComponentMetrics::new(name, Kind::Source));
    let cap = BufferConfig {
        max_batches,
        ..BufferConfig::default()
    };
    let (edge, input) = buffer(cap, Arc::new(ComponentMetrics::new("out", Kind::Sink)));
    let (dead_edge, dead) = buffer(cap, Arc::new(ComponentMetrics::new("dlq", Kind::Sink)));
    let out = Outputs::new(
        Output::new(vec![edge]),
        HashMap::from([(DEAD_LETTER.to_string(), Output::new(vec![dead_edge]))]),
        metrics.clone(),
    );
    let source = config
        .build(&BuildContext {
            name: name.to_string(),
            pipeline_id: "mqtt-tests".to_string(),
            state_dir: None,
        })
        .await
        .expect("source builds");
    let shutdown = CancellationToken::new();
    let cx = SourceContext {
        name: name.to_string(),
        out,
        shutdown: shutdown.clone(),
        metrics: metrics.clone(),
    };
    let task = tokio::spawn(async move { source.run(cx).await.map_err(|e| e.to_string()) });
    Running {
        input,
        dead,
        metrics,
        shutdown,
        task,
    }
}

impl Running {
    fn gauge(&self, name: &'static str) -> i64 {
        self.metrics.gauge(name).load(Ordering::Relaxed)
    }

    /// Waits for the SUBACK: messages published after this reach the source.
    async fn subscribed(&self) {
        for _ in 0..200 {
            if self.gauge("subscribed") == 1 {
                return;
            }
            if self.task.is_finished() {
                panic!("source stopped before subscribing");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("source did not subscribe within 10 s");
    }

    /// Takes `n` records from the default output, finishing each batch with `status`.
    async fn take(&mut self, n: usize, status: Option<BatchStatus>) -> Vec<Record> {
        take(&mut self.input, n, status, Duration::from_secs(30)).await
    }

    /// Records that arrive within `wait` (finished as delivered).
    async fn idle(&mut self, wait: Duration) -> usize {
        let mut n = 0;
        while let Ok(Some(mut b)) = tokio::time::timeout(wait, self.input.recv()).await {
            n += b.len();
            b.finalize(BatchStatus::Delivered);
        }
        n
    }

    /// Graceful shutdown; returns the source's result.
    async fn stop(self) -> Result<(), String> {
        self.shutdown.cancel();
        drop(self.input);
        drop(self.dead);
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("source stops within 15 s")
            .expect("source task")
    }
}

async fn take(
    input: &mut Input,
    n: usize,
    status: Option<BatchStatus>,
    wait: Duration,
) -> Vec<Record> {
    let mut out = Vec::new();
    while out.len() < n {
        let batch = tokio::time::timeout(wait, input.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} records arrived", out.len()));
        let Some(mut batch) = batch else {
            panic!("output closed after {} of {n} records", out.len())
        };
        match status {
            Some(s) => batch.finalize(s),
            // Dropping the finalizers without a status: the sink "failed".
            None => {
                for r in &mut batch.records {
                    r.finalizers = Default::default();
                }
            }
        }
        out.extend(batch.records);
    }
    out
}

fn seq(r: &Record) -> i64 {
    match r.field("seq") {
        Some(Value::I64(s)) => *s,
        other => panic!("record without integer seq: {other:?}"),
    }
}

fn json_messages(
    topic: impl Fn(i64) -> String,
    range: std::ops::Range<i64>,
) -> Vec<(String, Bytes)> {
    range
        .map(|i| {
            (
                topic(i),
                Bytes::from(format!(
                    r#"{{"ts":{},"seq":{i},"temp":{}.5}}"#,
                    1_764_000_000_000i64 + i,
                    20 + i % 10
                )),
            )
        })
        .collect()
}

fn config(url: &str, topics: &[&str], protocol: Protocol, qos: u8) -> MqttSourceConfig {
    let mut c = MqttSourceConfig::new(url, topics);
    c.connection.protocol = protocol;
    c.connection.client_id = Some(testing::unique("src"));
    c.qos = qos;
    c
}

/// Publishes 200 JSON messages over 5 device topics and checks every record: values, event
/// time, the device id from the topic, the MQTT origin. With QoS 1/2 a second instance with
/// the same client id then gets nothing: every message was acknowledged after delivery.
async fn round_trip(protocol: Protocol, qos: u8) {
    testing::require_broker();
    let prefix = testing::unique("rt");
    let mut c = config(BROKER, &[], protocol, qos);
    c.decode.topic_pattern = Some(format!("{prefix}/devices/{{device_id}}/data"));
    let mut src = start(&c, "rt").await;
    src.subscribed().await;
    let n = 200;
    let topic = |i: i64| format!("{prefix}/devices/dev-{}/data", i % 5);
    testing::publish(BROKER, qos, json_messages(topic, 0..n)).await;
    let records = src.take(n as usize, Some(BatchStatus::Delivered)).await;
    let mut seen = BTreeSet::new();
    for r in &records {
        let s = seq(r);
        assert!(seen.insert(s), "duplicate seq {s} at QoS {qos}");
        assert_eq!(r.tag("device_id"), Some(format!("dev-{}", s % 5).as_str()));
        assert_eq!(r.time, (1_764_000_000_000 + s) * 1_000_000);
        assert_eq!(
            r.field("temp"),
            Some(&Value::F64((20 + s % 10) as f64 + 0.5))
        );
        match &r.meta.origin {
            Origin::Mqtt { topic: t } => assert_eq!(&**t, topic(s)),
            other => panic!("origin {other:?}"),
        }
        assert_eq!(r.meta.source.as_deref(), Some("rt"));
    }
    assert_eq!(seen.len(), n as usize);
    assert_eq!(src.metrics.counter("messages").load(Ordering::Relaxed), n);
    assert_eq!(src.gauge("connected"), 1);
    assert!(src.metrics.bytes.load(Ordering::Relaxed) > 0);
    if qos > 0 {
        // Acks are queued once the statuses resolve: give them a moment to leave.
        for _ in 0..100 {
            if src.gauge("inflight") == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(src.gauge("inflight"), 0, "every message acknowledged");
    }
    src.stop().await.expect("clean stop");
    if qos > 0 {
        let mut again = start(&c, "rt").await;
        again.subscribed().await;
        assert_eq!(
            again.idle(Duration::from_millis(800)).await,
            0,
            "acknowledged messages must not be redelivered"
        );
        again.stop().await.expect("clean stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_v311_qos0() {
    round_trip(Protocol::V311, 0).await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_v311_qos1() {
    round_trip(Protocol::V311, 1).await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_v311_qos2() {
    round_trip(Protocol::V311, 2).await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_v5_qos0() {
    round_trip(Protocol::V5, 0).await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_v5_qos1() {
    round_trip(Protocol::V5, 1).await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_v5_qos2() {
    round_trip(Protocol::V5, 2).await;
}

/// `#` filters from the tenant/project pattern: tenant and project ids become tags whatever
/// the depth below them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_level_wildcard_with_tenant_pattern() {
    testing::require_broker();
    let prefix = testing::unique("mtic");
    let mut c = config(BROKER, &[], Protocol::V5, 1);
    c.decode.topic_pattern = Some(format!(
        "{prefix}/mtic/msg/client/realtime/{{tenant_id}}/{{project_id}}/#"
    ));
    let mut src = start(&c, "tenants").await;
    src.subscribed().await;
    let topics = [("t1", "p1", "a"), ("t1", "p2", "a/b/c"), ("t2", "p9", "x")];
    let msgs: Vec<(String, Bytes)> = topics
        .iter()
        .enumerate()
        .map(|(i, (t, p, rest))| {
            (
                format!("{prefix}/mtic/msg/client/realtime/{t}/{p}/{rest}"),
                Bytes::from(format!(r#"{{"seq":{i}}}"#)),
            )
        })
        .collect();
    testing::publish(BROKER, 1, msgs).await;
    let records = src.take(3, Some(BatchStatus::Delivered)).await;
    let got: BTreeMap<i64, (String, String)> = records
        .iter()
        .map(|r| {
            (
                seq(r),
                (
                    r.tag("tenant_id").unwrap_or("?").to_string(),
                    r.tag("project_id").unwrap_or("?").to_string(),
                ),
            )
        })
        .collect();
    for (i, (t, p, _)) in topics.iter().enumerate() {
        assert_eq!(got.get(&(i as i64)), Some(&(t.to_string(), p.to_string())));
    }
    src.stop().await.expect("clean stop");
}

/// A batch that fails downstream is not acknowledged: the source reconnects and the broker
/// sends the same messages again, which are then delivered and acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_batch_is_redelivered() {
    testing::require_broker();
    let prefix = testing::unique("redeliver");
    for protocol in [Protocol::V311, Protocol::V5] {
        let topic = format!("{prefix}/{protocol:?}");
        let c = config(BROKER, &[&topic], protocol, 1);
        let mut src = start(&c, "redeliver").await;
        src.subscribed().await;
        testing::publish(BROKER, 1, json_messages(|_| topic.clone(), 0..50)).await;
        // Fail every record until each message was seen once…
        let mut failed = BTreeSet::new();
        while failed.len() < 50 {
            failed.extend(src.take(1, None).await.iter().map(seq));
        }
        // …then deliver: each must come back.
        let mut delivered = BTreeSet::new();
        while delivered.len() < 50 {
            delivered.extend(
                src.take(1, Some(BatchStatus::Delivered))
                    .await
                    .iter()
                    .map(seq),
            );
        }
        assert_eq!(
            delivered,
            (0..50).collect(),
            "{protocol:?}: all 50 redelivered"
        );
        // Records delivered after the failed batch on the same connection were not
        // acknowledged either (acks keep order): they come again too. Absorb them.
        src.idle(Duration::from_millis(800)).await;
        assert!(src.metrics.counter("reconnects").load(Ordering::Relaxed) >= 1);
        src.stop().await.expect("clean stop");
        let mut later = start(&c, "redeliver").await;
        later.subscribed().await;
        assert_eq!(later.idle(Duration::from_millis(800)).await, 0);
        later.stop().await.expect("clean stop");
    }
}

/// A source that dies with records in flight (task aborted: no acks, no goodbye) loses
/// nothing: the next instance with the same client id gets every unacknowledged message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_delivery_redelivers() {
    testing::require_broker();
    let topic = testing::unique("crash");
    let c = config(BROKER, &[&topic], Protocol::V311, 1);
    // Room for all 100 even if each arrives in a batch of its own (a busy machine makes
    // smaller batches): with 64 batches the source blocked at ~87 records out.
    let src = start_with_buffer(&c, "crash", 128).await;
    src.subscribed().await;
    testing::publish(BROKER, 1, json_messages(|_| topic.clone(), 0..100)).await;
    // The records sit undelivered in the output buffer when the source dies.
    for _ in 0..500 {
        if src.metrics.records_out.load(Ordering::Relaxed) >= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(src.metrics.records_out.load(Ordering::Relaxed), 100);
    src.task.abort();
    let _ = src.task.await;
    drop(src.input);
    let mut next = start(&c, "crash").await;
    let records = next.take(100, Some(BatchStatus::Delivered)).await;
    let seqs: BTreeSet<i64> = records.iter().map(seq).collect();
    assert_eq!(
        seqs,
        (0..100).collect(),
        "every message redelivered after the crash"
    );
    next.stop().await.expect("clean stop");
}

/// Malformed JSON, binary garbage, an empty payload and a payload over `max_payload` are
/// counted and dead-lettered with the topic and the error; good messages around them pass;
/// dead-lettered messages are acknowledged (not redelivered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_are_dead_lettered() {
    testing::require_broker();
    let topic = testing::unique("bad");
    let c = config(BROKER, &[&topic], Protocol::V311, 1);
    let mut src = start(&c, "bad").await;
    src.subscribed().await;
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(1024 * 1024));
    let payloads: Vec<Bytes> = vec![
        Bytes::from_static(br#"{"seq":1}"#),
        Bytes::from_static(b"{\"seq\": 2, oops"),
        Bytes::from_static(&[0xff, 0x00, 0xfe, 0x9c, 0x01]),
        Bytes::new(),
        Bytes::from(big),
        Bytes::from_static(br#"{"seq":3}"#),
    ];
    testing::publish(
        BROKER,
        1,
        payloads.into_iter().map(|p| (topic.clone(), p)).collect(),
    )
    .await;
    let good = src.take(2, Some(BatchStatus::Delivered)).await;
    assert_eq!(
        good.iter().map(seq).collect::<BTreeSet<_>>(),
        BTreeSet::from([1, 3])
    );
    let dead = take(
        &mut src.dead,
        4,
        Some(BatchStatus::Delivered),
        Duration::from_secs(30),
    )
    .await;
    let errors: Vec<String> = dead
        .iter()
        .map(|r| r.meta.error.as_deref().unwrap_or("").to_string())
        .collect();
    assert!(
        errors.iter().filter(|e| e.contains("invalid JSON")).count() == 3,
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("exceeds max_payload")),
        "{errors:?}"
    );
    for r in &dead {
        assert!(matches!(&r.meta.origin, Origin::Mqtt { topic: t } if **t == *topic));
        assert!(r.payload.is_some(), "dead letters keep the payload");
    }
    assert_eq!(src.metrics.errors.load(Ordering::Relaxed), 4);
    assert_eq!(src.metrics.dead_lettered.load(Ordering::Relaxed), 4);
    src.stop().await.expect("clean stop");
    let mut again = start(&c, "bad").await;
    again.subscribed().await;
    assert_eq!(again.idle(Duration::from_millis(800)).await, 0);
    assert_eq!(
        tokio::time::timeout(Duration::from_millis(200), again.dead.recv())
            .await
            .ok()
            .flatten()
            .map(|b| b.len()),
        None,
        "dead-lettered messages were acknowledged"
    );
    again.stop().await.expect("clean stop");
}

/// Two instances in one shared-subscription group split a stream: together they receive
/// every message exactly once, and each gets a share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_group_splits_the_stream() {
    testing::require_broker();
    let topic = testing::unique("shared");
    let group = testing::unique("g");
    let mut a_cfg = config(BROKER, &[&topic], Protocol::V5, 1);
    a_cfg.shared_group = Some(group.clone());
    let mut b_cfg = a_cfg.clone();
    b_cfg.connection.client_id = Some(testing::unique("src-b"));
    b_cfg.connection.protocol = Protocol::V311;
    let mut a = start(&a_cfg, "a").await;
    let mut b = start(&b_cfg, "b").await;
    a.subscribed().await;
    b.subscribed().await;
    let n = 1000;
    testing::publish(BROKER, 1, json_messages(|_| topic.clone(), 0..n)).await;
    let mut all = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (mut from_a, mut from_b) = (0, 0);
    while all.len() < n as usize && tokio::time::Instant::now() < deadline {
        tokio::select! {
            Some(mut batch) = a.input.recv() => { from_a += batch.len(); batch.finalize(BatchStatus::Delivered); all.extend(batch.records); }
            Some(mut batch) = b.input.recv() => { from_b += batch.len(); batch.finalize(BatchStatus::Delivered); all.extend(batch.records); }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    let seqs: BTreeSet<i64> = all.iter().map(seq).collect();
    assert_eq!(all.len(), n as usize, "no duplicates, nothing missing");
    assert_eq!(seqs.len(), n as usize);
    assert!(from_a > 0 && from_b > 0, "split: a={from_a} b={from_b}");
    a.stop().await.expect("stop a");
    b.stop().await.expect("stop b");
}

/// The broker stops and starts (persistence on) in the middle of a stream: the source
/// reconnects with backoff and receives everything, including what was published while it
/// was disconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_loses_nothing() {
    let mut broker = Mosquitto::start("");
    let url = broker.url();
    let topic = testing::unique("restart");
    let mut c = config(&url, &[&topic], Protocol::V311, 1);
    c.connection.reconnect_max = "1s".parse().expect("duration");
    let mut src = start(&c, "restart").await;
    src.subscribed().await;
    testing::publish(&url, 1, json_messages(|_| topic.clone(), 0..500)).await;
    let mut got = src.take(500, Some(BatchStatus::Delivered)).await;
    // Let the acks reach the broker before it stops, then restart it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.stop();
    for _ in 0..100 {
        if src.gauge("connected") == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(src.gauge("connected"), 0, "disconnect noticed");
    broker.restart();
    // Published while the source is (probably still) away: queued in its persistent session.
    testing::publish(&url, 1, json_messages(|_| topic.clone(), 500..1000)).await;
    got.extend(src.take(500, Some(BatchStatus::Delivered)).await);
    let seqs: BTreeSet<i64> = got.iter().map(seq).collect();
    assert_eq!(seqs, (0..1000).collect(), "nothing lost across the restart");
    assert!(src.metrics.counter("reconnects").load(Ordering::Relaxed) >= 1);
    assert_eq!(src.gauge("connected"), 1);
    src.stop().await.expect("clean stop");
}

/// Generates a CA, a server certificate and a client certificate with `openssl`, runs
/// mosquitto with `require_certificate true`, and connects with the client certificate; a
/// certificate from another CA is refused with an error that says TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    let dir = std::env::temp_dir().join(testing::unique("sluice-tls"));
    std::fs::create_dir_all(&dir).expect("tls dir");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let run = |args: &[&str]| testing::openssl(&dir, args);
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=sluice test CA",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
            "-subj",
            "/CN=sluice-client",
        ],
    ]
    .concat());
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "client.pem",
        "-days",
        "2",
        "-extfile",
        "client.ext",
    ]);
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "rogue.key",
            "-out",
            "rogue.pem",
            "-days",
            "2",
            "-subj",
            "/CN=rogue",
        ],
    ]
    .concat());
    let p = |f: &str| dir.join(f).display().to_string();
    let broker = Mosquitto::start(&format!(
        "listener {{port}} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        p("ca.pem"),
        p("server.pem"),
        p("server.key")
    ));
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    let topic = testing::unique("tls");
    let mut c = config(&url, &[&topic], Protocol::V311, 1);
    c.connection.tls = Some(TlsConfig {
        ca_file: Some(dir.join("ca.pem")),
        cert_file: Some(dir.join("client.pem")),
        key_file: Some(dir.join("client.key")),
        ..TlsConfig::default()
    });
    let mut src = start(&c, "tls").await;
    src.subscribed().await;
    // Publish through the same TLS listener with a second sluice source's options: reuse
    // the mosquitto_pub CLI, which speaks TLS with client certificates.
    let out = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-q",
            "1",
            "-t",
            &topic,
        ])
        .args([
            "--cafile",
            &p("ca.pem"),
            "--cert",
            &p("client.pem"),
            "--key",
            &p("client.key"),
        ])
        .args(["-m", r#"{"seq":7}"#])
        .output()
        .expect("mosquitto_pub (scripts/services.sh start installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = src.take(1, Some(BatchStatus::Delivered)).await;
    assert_eq!(seq(&got[0]), 7);
    src.stop().await.expect("clean stop");

    let mut rogue = c.clone();
    rogue.connection.client_id = Some(testing::unique("rogue"));
    rogue.connection.tls = Some(TlsConfig {
        ca_file: Some(dir.join("ca.pem")),
        cert_file: Some(dir.join("rogue.pem")),
        key_file: Some(dir.join("rogue.key")),
        ..TlsConfig::default()
    });
    let refused = start(&rogue, "rogue").await;
    let result = tokio::time::timeout(Duration::from_secs(15), refused.task)
        .await
        .expect("a refused certificate fails the source promptly")
        .expect("task");
    let err = result.expect_err("wrong client certificate must be refused");
    assert!(err.contains("TLS"), "clear error: {err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// InfluxDB line protocol over MQTT (what Telegraf's MQTT output publishes): several lines per
/// message become several records; a bad line is dead-lettered alone and the message is still
/// acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line_protocol_payloads() {
    testing::require_broker();
    let topic = testing::unique("lp");
    let mut c = config(BROKER, &[&topic], Protocol::V5, 1);
    c.decode.codec = sluice_core::decode::Codec::LineProtocol;
    c.decode.time_unit = sluice_core::decode::TimeUnit::Ns;
    let mut src = start(&c, "lp").await;
    src.subscribed().await;
    let payload = "weather,site=a temp=21.5,seq=1i 1764000000000000001\n\
                   weather,site=b temp=19.0,seq=2i 1764000000000000002\n\
                   not line protocol\n";
    testing::publish(BROKER, 1, vec![(topic.clone(), Bytes::from(payload))]).await;
    let good = src.take(2, Some(BatchStatus::Delivered)).await;
    assert_eq!(good.iter().map(seq).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(good[0].tag("measurement"), Some("weather"));
    assert_eq!(good[1].tag("site"), Some("b"));
    assert_eq!(good[0].time, 1_764_000_000_000_000_001);
    let dead = take(
        &mut src.dead,
        1,
        Some(BatchStatus::Delivered),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(dead[0].payload.as_deref(), Some(&b"not line protocol"[..]));
    src.stop().await.expect("clean stop");
    let mut again = start(&c, "lp").await;
    again.subscribed().await;
    assert_eq!(
        again.idle(Duration::from_millis(800)).await,
        0,
        "message was acknowledged"
    );
    again.stop().await.expect("clean stop");
}

/// Issue 13, 0b: a persistent session with a 100,000-message QoS 1 backlog queued while the
/// source was down. Every message arrives, every acknowledgement reaches the broker (none is
/// dropped because the client's request queue was full), so the next two starts get back at
/// most the in-flight window, not tens of thousands of duplicates.
async fn backlog_acks_every_message(protocol: Protocol, default_backlog: i64) {
    testing::require_broker();
    let topic = testing::unique("backlog");
    let mut c = config(BROKER, &[&topic], protocol, 1);
    c.max_inflight = 2000;
    let window = c.max_inflight as usize;
    // Establish the persistent session, then go away.
    let src = start(&c, "backlog").await;
    src.subscribed().await;
    src.stop().await.expect("clean stop");
    let n: i64 = std::env::var("SLUICE_MQTT_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_backlog);
    testing::publish(BROKER, 1, json_messages(|_| topic.clone(), 0..n)).await;

    let mut first = start(&c, "backlog").await;
    let mut seen = BTreeSet::new();
    let mut received = 0usize;
    while (seen.len() as i64) < n {
        let batch = tokio::time::timeout(Duration::from_secs(60), first.input.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} distinct records arrived", seen.len()));
        let Some(mut batch) = batch else {
            panic!("output closed after {} records", seen.len())
        };
        received += batch.len();
        seen.extend(batch.records.iter().map(seq));
        batch.finalize(BatchStatus::Delivered);
    }
    let dropped = first
        .metrics
        .counter("acks_dropped")
        .load(Ordering::Relaxed);
    first.stop().await.expect("clean stop");
    assert_eq!(
        dropped, 0,
        "acknowledgements of delivered messages were dropped"
    );
    let dup_first = received - n as usize;
    // Two restarts: each gets back at most what was in flight when the previous one stopped.
    let mut redelivered = Vec::new();
    for _ in 0..2 {
        let mut next = start(&c, "backlog").await;
        // Not `subscribed()`: a broker sends a resumed session's queue before the SUBACK.
        for _ in 0..200 {
            if next.gauge("connected") == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        redelivered.push(next.idle(Duration::from_secs(5)).await);
        next.stop().await.expect("clean stop");
    }
    assert!(
        dup_first <= window && redelivered.iter().all(|&r| r <= window),
        "duplicates beyond the in-flight window ({window}): {dup_first} during the backlog, \
         {redelivered:?} on the two restarts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_acks_every_message_v5() {
    // Smaller than the v3.1.1 case: with v5, acks go through rumqttc's request queue, which
    // it drains one per poll while reading ten packets per poll; mosquitto 2.0.11 does not
    // hold rumqttc's v5 connections to their Receive Maximum, so a deep backlog drains at
    // only ~1-2k msg/s here (see the module docs of the mqtt source).
    backlog_acks_every_message(Protocol::V5, 10_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_acks_every_message_v311() {
    backlog_acks_every_message(Protocol::V311, 100_000).await;
}

/// Issue 13, item 6: a record whose delivery fails every time (a poison record) is read
/// `1 + max_redeliveries` times, then dead-lettered with the reason and the count; the
/// records behind it are delivered, and everything (the poison included) is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_record_is_dead_lettered_after_max_redeliveries() {
    testing::require_broker();
    let prefix = testing::unique("poison");
    for protocol in [Protocol::V311, Protocol::V5] {
        let topic = format!("{prefix}/{protocol:?}");
        let mut c = config(BROKER, &[&topic], protocol, 1);
        c.max_redeliveries = 3;
        let mut src = start(&c, "poison").await;
        src.subscribed().await;
        // seq 0 is the poison: the "sink" fails it every time; 1..=20 queue behind it.
        testing::publish(BROKER, 1, json_messages(|_| topic.clone(), 0..21)).await;
        let (mut delivered, mut attempts, mut dead) = (BTreeSet::new(), 0, Vec::new());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        while dead.is_empty() || delivered.len() < 20 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{protocol:?}: poison read {attempts} times, dead-lettered {}, {} of 20 delivered",
                dead.len(),
                delivered.len()
            );
            tokio::select! {
                b = src.input.recv() => {
                    let mut b = b.expect("output open");
                    for r in &mut b.records {
                        if seq(r) == 0 {
                            attempts += 1;
                            r.finalize(BatchStatus::Errored);
                        } else {
                            delivered.insert(seq(r));
                            r.finalize(BatchStatus::Delivered);
                        }
                    }
                }
                d = src.dead.recv() => {
                    let mut d = d.expect("dead_letter open");
                    d.finalize(BatchStatus::Delivered);
                    dead.extend(d.records);
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        assert_eq!(
            attempts, 4,
            "{protocol:?}: read once + max_redeliveries (3) times"
        );
        assert_eq!(dead.len(), 1, "{protocol:?}: dead-lettered once");
        let error = dead[0].meta.error.as_deref().unwrap_or_default();
        assert!(
            error.contains("failed 4 times") && error.contains("max_redeliveries = 3"),
            "{protocol:?}: reason and count in the error: {error}"
        );
        let payload = dead[0].payload.clone().unwrap_or_default();
        assert!(
            payload.starts_with(br#"{"ts":"#) && payload.windows(7).any(|w| w == br#""seq":0"#),
            "the dead letter carries the payload: {payload:?}"
        );
        assert_eq!(
            delivered,
            (1..=20).collect(),
            "{protocol:?}: the rest delivered"
        );
        assert_eq!(src.metrics.counter("poisoned").load(Ordering::Relaxed), 1);
        // Duplicates of the good records (redelivered with the poison) are fine.
        src.idle(Duration::from_millis(800)).await;
        for _ in 0..250 {
            if src.gauge("inflight") == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(src.gauge("inflight"), 0, "{protocol:?}: all acknowledged");
        src.stop().await.expect("clean stop");
        // Acknowledged means the broker does not send any of it (the poison either) again.
        let mut later = start(&c, "poison").await;
        later.subscribed().await;
        assert_eq!(later.idle(Duration::from_secs(2)).await, 0, "{protocol:?}");
        assert!(
            tokio::time::timeout(Duration::from_millis(200), later.dead.recv())
                .await
                .is_err(),
            "{protocol:?}: no dead letter again"
        );
        later.stop().await.expect("clean stop");
    }
}

/// Issue 13, item 9d: a QoS 0 stream into a slow pipeline. The source stops reading when its
/// window is full (TCP pushes back on the broker), yet keeps its connection: no keep-alive
/// failure (the broker's PINGRESP waits behind unread messages), no reconnect, and the
/// messages it holds stay within its window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_into_a_slow_sink_keeps_the_connection_and_stays_bounded() {
    testing::require_broker();
    for protocol in [Protocol::V311, Protocol::V5] {
        let topic = testing::unique("qos0-slow");
        let mut c = config(BROKER, &[&topic], protocol, 0);
        // As short as each client allows (v5: 5 s), for several keep-alive periods below.
        let keep_alive = if protocol == Protocol::V5 { 5 } else { 1 };
        c.connection.keep_alive =
            sluice_core::config::HumanDuration(Duration::from_secs(keep_alive));
        c.max_inflight = 200;
        c.batch_size = 50;
        let mut src = start(&c, "qos0-slow").await;
        src.subscribed().await;
        let n = 40_000i64;
        // Published in one go, far faster than the "sink" below takes them (~2,500/s).
        let publisher = tokio::spawn(testing::publish(
            BROKER,
            0,
            json_messages(|_| topic.clone(), 0..n),
        ));
        let (mut got, mut held_max) = (0usize, 0i64);
        let until = tokio::time::Instant::now() + Duration::from_secs(8 * keep_alive);
        while tokio::time::Instant::now() < until {
            let Ok(Some(mut b)) =
                tokio::time::timeout(Duration::from_secs(5), src.input.recv()).await
            else {
                break;
            };
            got += b.len();
            b.finalize(BatchStatus::Delivered);
            // Read from the broker but not yet handed downstream.
            let read = src.metrics.counter("messages").load(Ordering::Relaxed);
            let out = src.metrics.records_out.load(Ordering::Relaxed) as i64;
            held_max = held_max.max(read - out);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(got > 1_000, "{protocol:?}: only {got} records arrived");
        assert_eq!(
            src.metrics.counter("reconnects").load(Ordering::Relaxed),
            0,
            "{protocol:?}: the source kept its connection under backpressure"
        );
        assert_eq!(src.gauge("connected"), 1, "{protocol:?}");
        assert!(
            held_max <= 200 + 64,
            "{protocol:?}: the source held {held_max} messages (window 200)"
        );
        src.stop().await.expect("clean stop");
        publisher.abort();
    }
}

/// Issue 12, item 5: a QoS 1 window held downstream for several keep-alive periods (a stage
/// that holds acknowledgements: every finalizer kept, nothing acknowledged). The poller cannot
/// read (window full) yet keeps the connection: v3.1.1 writes PINGREQs itself, v5 polls the
/// client just enough for its keep-alive. Nothing is redelivered, and once the held records are
/// delivered the rest flows on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_qos1_window_held_downstream_keeps_the_connection() {
    testing::require_broker();
    for protocol in [Protocol::V311, Protocol::V5] {
        let topic = testing::unique("held-window");
        let mut c = config(BROKER, &[&topic], protocol, 1);
        // As short as each client allows (v5: 5 s); the hold below lasts 3 keep-alives.
        let keep_alive = if protocol == Protocol::V5 { 5 } else { 1 };
        c.connection.keep_alive =
            sluice_core::config::HumanDuration(Duration::from_secs(keep_alive));
        c.max_inflight = 20;
        let mut src = start(&c, "held-window").await;
        src.subscribed().await;
        testing::publish(BROKER, 1, json_messages(|_| topic.clone(), 0..60)).await;
        // Take the whole window and hold every record (no status: nothing acknowledged).
        let mut held = Vec::new();
        let mut taken = 0;
        while taken < 20 {
            let b = tokio::time::timeout(Duration::from_secs(30), src.input.recv())
                .await
                .expect("the first window arrives")
                .expect("input open");
            taken += b.len();
            held.push(b);
        }
        // QoS 0 messages are not bound by the window the broker is told (v5 Receive Maximum):
        // they arrive anyway and the poller stops reading with them pending.
        testing::publish(BROKER, 0, json_messages(|_| topic.clone(), 60..80)).await;
        tokio::time::sleep(Duration::from_secs(3 * keep_alive)).await;
        assert_eq!(
            src.metrics.counter("reconnects").load(Ordering::Relaxed),
            0,
            "{protocol:?}: the connection survived a full window held for 3 keep-alives"
        );
        assert_eq!(src.gauge("connected"), 1, "{protocol:?}");
        let mut seen: BTreeSet<i64> = held
            .iter()
            .flat_map(|b| b.records.iter().map(seq))
            .collect();
        for mut b in held {
            b.finalize(BatchStatus::Delivered);
        }
        // The other 60 follow, and nothing comes twice (no reconnect, no redelivery).
        let mut count = seen.len();
        while seen.len() < 80 {
            let got = src.take(1, Some(BatchStatus::Delivered)).await;
            count += got.len();
            seen.extend(got.iter().map(seq));
        }
        assert_eq!(seen, (0..80).collect(), "{protocol:?}");
        count += src.idle(Duration::from_millis(800)).await;
        assert_eq!(count, 80, "{protocol:?}: no duplicates");
        assert_eq!(
            src.metrics.counter("reconnects").load(Ordering::Relaxed),
            0,
            "{protocol:?}"
        );
        src.stop().await.expect("clean stop");
    }
}
