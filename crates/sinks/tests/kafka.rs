//! Integration tests of the `kafka` sink and source against the real broker on 127.0.0.1:9092
//! (`scripts/services.sh start tansu`). Every test uses its own topics and consumer groups.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use sluice_core::ack::{self, BatchStatus};
use sluice_core::record::{Batch, Origin, Record, Value};
use sluice_core::testing::{status_within, SinkHarness, SourceHarness};
use sluice_sinks::kafka::{Compression, Format, KafkaSinkConfig};
use sluice_sinks::kafka_testing::{
    committed, consume, create_topic, produce, require_kafka, unique, BOOTSTRAP,
};
use sluice_sources::kafka::KafkaSourceConfig;

fn init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    require_kafka();
}

/// A source config for tests: fast group join, frequent commits.
fn source(topic: &str, group: &str) -> KafkaSourceConfig {
    let mut c = KafkaSourceConfig::new(BOOTSTRAP, &[topic], group);
    c.session_timeout = "6s".parse().expect("duration");
    c.commit_interval = "100ms".parse().expect("duration");
    c.retry_backoff = "200ms".parse().expect("duration");
    c
}

fn seq_of(r: &Record) -> i64 {
    match r.field("seq") {
        Some(Value::I64(i)) => *i,
        other => panic!("record without integer seq: {other:?}"),
    }
}

/// Messages `{"seq": i}` for `range`, unkeyed.
fn numbered(range: std::ops::Range<i64>) -> Vec<(Option<String>, Vec<u8>)> {
    range
        .map(|i| (None, format!("{{\"seq\":{i}}}").into_bytes()))
        .collect()
}

async fn round_trip(compression: Compression) {
    init();
    let topic = unique("rt");
    create_topic(&topic, 3).await;
    let mut sink = KafkaSinkConfig::new(BOOTSTRAP, &topic);
    sink.key = Some("{device_id}".into());
    sink.header_tags = vec!["tenant_id".into()];
    sink.compression = compression;
    let sink = SinkHarness::start(&sink, "bus", "kafka-tests")
        .await
        .expect("sink builds");
    let n = 600i64;
    let records: Vec<Record> = (0..n)
        .map(|i| {
            let mut r = Record::new(1_764_000_000_000_000_000 + i * 1_000_000);
            r.set_tag("device_id", format!("dev-{}", i % 10));
            r.set_tag("tenant_id", format!("tenant-{}", i % 2));
            r.set_field("seq", Value::I64(i));
            r.set_field("temp", Value::F64(20.0 + i as f64 / 100.0));
            r
        })
        .collect();
    let (f, status) = ack::batch();
    let mut batch = Batch::new(records);
    for r in &mut batch.records {
        r.finalizers.push(f.clone());
    }
    f.finish(BatchStatus::Delivered);
    sink.out.send(batch).await.expect("send to sink");
    assert_eq!(
        status_within(status, Duration::from_secs(30)).await,
        Some(BatchStatus::Delivered),
        "every record confirmed by the broker"
    );
    sink.stop(Duration::from_secs(15))
        .await
        .expect("sink stops");

    // Read back with the source: the key becomes `device_id`, the header `tenant_id`, and only
    // `seq`/`temp` come from the JSON body, so the tags prove the key and header mapping.
    let mut config = source(&topic, &unique("rt-group"));
    config.key_tag = Some("device_id".into());
    config.headers_as_tags = true;
    config.decode.fields = Some(vec!["seq".into(), "temp".into()]);
    let mut src = SourceHarness::start(&config, "bus_in", "kafka-tests")
        .await
        .expect("source builds");
    let got = src
        .take(n as usize, BatchStatus::Delivered, Duration::from_secs(30))
        .await;
    let seqs: BTreeSet<i64> = got.iter().map(seq_of).collect();
    assert_eq!(got.len(), n as usize, "each message once");
    assert_eq!(seqs.len(), n as usize);
    let mut partition_of_device: HashMap<String, BTreeSet<i32>> = HashMap::new();
    for r in &got {
        let i = seq_of(r);
        assert_eq!(r.tag("device_id"), Some(format!("dev-{}", i % 10).as_str()));
        assert_eq!(
            r.tag("tenant_id"),
            Some(format!("tenant-{}", i % 2).as_str())
        );
        assert_eq!(
            r.time,
            1_764_000_000_000_000_000 + i * 1_000_000,
            "ts round trip"
        );
        let Origin::Kafka { partition, .. } = &r.meta.origin else {
            panic!("no kafka origin: {:?}", r.meta.origin);
        };
        partition_of_device
            .entry(r.tag("device_id").unwrap_or_default().to_string())
            .or_default()
            .insert(*partition);
    }
    for (device, partitions) in &partition_of_device {
        assert_eq!(partitions.len(), 1, "{device} spread over {partitions:?}");
    }
    let used: BTreeSet<i32> = partition_of_device.values().flatten().copied().collect();
    assert!(used.len() > 1, "keys spread over partitions: {used:?}");
    src.stop(Duration::from_secs(20))
        .await
        .expect("source stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_snappy_keys_and_headers() {
    round_trip(Compression::Snappy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_lz4() {
    round_trip(Compression::Lz4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_zstd() {
    round_trip(Compression::Zstd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_dead_letters_what_cannot_be_written() {
    init();
    let topic = unique("dl");
    create_topic(&topic, 1).await;
    let mut config = KafkaSinkConfig::new(BOOTSTRAP, &topic);
    config.key = Some("{device_id}".into());
    // 64 KiB limit: a 100 KB message is refused by the producer as too large.
    config
        .librdkafka_options
        .insert("message.max.bytes".into(), "65536".into());
    let mut sink = SinkHarness::start(&config, "bus", "kafka-tests")
        .await
        .expect("sink builds");
    let mut ok = Record::new(1);
    ok.set_tag("device_id", "d1");
    ok.set_field("seq", Value::I64(1));
    let mut no_key = Record::new(2);
    no_key.set_field("seq", Value::I64(2));
    let mut huge = Record::new(3);
    huge.set_tag("device_id", "d3");
    huge.set_field("blob", Value::Str("x".repeat(100_000).into()));
    let (f, status) = ack::batch();
    let mut batch = Batch::new(vec![ok, no_key, huge]);
    for r in &mut batch.records {
        r.finalizers.push(f.clone());
    }
    f.finish(BatchStatus::Delivered);
    sink.out.send(batch).await.expect("send");
    let mut dead = Vec::new();
    while dead.len() < 2 {
        let mut b = tokio::time::timeout(Duration::from_secs(30), sink.dead.recv())
            .await
            .expect("dead letters within 30 s")
            .expect("dead-letter output open");
        b.finalize(BatchStatus::Delivered);
        dead.extend(b.records);
    }
    let reasons: Vec<String> = dead
        .iter()
        .map(|r| r.meta.error.as_deref().unwrap_or_default().to_string())
        .collect();
    assert!(
        reasons.iter().any(|e| e.contains("device_id")),
        "missing key tag named: {reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|e| e.to_lowercase().contains("too large")),
        "size error named: {reasons:?}"
    );
    assert_eq!(
        status_within(status, Duration::from_secs(10)).await,
        Some(BatchStatus::Rejected),
        "dead-lettered records are final (the source acknowledges them)"
    );
    sink.stop(Duration::from_secs(15))
        .await
        .expect("sink stops");
    let back = consume(&topic, 1, Duration::from_secs(3)).await;
    assert_eq!(back.len(), 1, "only the good record was written");
    assert_eq!(back[0].key.as_deref(), Some("d1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_format_for_bridges() {
    init();
    let topic = unique("env");
    create_topic(&topic, 1).await;
    let mut config = KafkaSinkConfig::new(BOOTSTRAP, &topic);
    config.format = Format::Envelope;
    config.key = Some("{tenant_id}/{project_id}".into());
    let sink = SinkHarness::start(&config, "bus", "kafka-tests")
        .await
        .expect("sink builds");
    let mut r = Record::new(1_764_000_000_123_000_000);
    r.set_tag("tenant_id", "t7");
    r.set_tag("project_id", "p3");
    r.payload = Some(bytes::Bytes::from_static(br#"{"temp":21.5}"#));
    r.meta.origin = Origin::Mqtt {
        topic: "mtic/msg/client/realtime/t7/p3".into(),
    };
    let (f, status) = ack::batch();
    r.finalizers.push(f);
    sink.out.send(Batch::new(vec![r])).await.expect("send");
    assert_eq!(
        status_within(status, Duration::from_secs(30)).await,
        Some(BatchStatus::Delivered)
    );
    sink.stop(Duration::from_secs(15))
        .await
        .expect("sink stops");
    let back = consume(&topic, 1, Duration::from_secs(3)).await;
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].key.as_deref(), Some("t7/p3"));
    let v: serde_json::Value = serde_json::from_slice(&back[0].payload).expect("json");
    assert_eq!(
        v,
        serde_json::json!({"tenant_id":"t7","project_id":"p3",
            "mqtt_topic":"mtic/msg/client/realtime/t7/p3","payload":{"temp":21.5},
            "timestamp":1_764_000_000_123i64})
    );
}

/// Watermark commits: deliveries completing out of order commit only the contiguous prefix;
/// an errored range blocks the commit until it has been read again and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_only_the_delivered_prefix() {
    init();
    let topic = unique("wm");
    let group = unique("wm-group");
    create_topic(&topic, 1).await;
    produce(&topic, numbered(0..100)).await;
    let mut config = source(&topic, &group);
    config.max_batch = 10;
    let mut src = SourceHarness::start(&config, "wm", "kafka-tests")
        .await
        .expect("source builds");
    let idle = Duration::from_secs(30);
    let offsets = |b: &Batch| -> (i64, i64) {
        let os: Vec<i64> = b
            .records
            .iter()
            .map(|r| match r.meta.origin {
                Origin::Kafka { offset, .. } => offset,
                _ => panic!("no kafka origin"),
            })
            .collect();
        (os[0], os[os.len() - 1] + 1)
    };
    let mut a = src.next_batch(idle).await.expect("batch a");
    let mut b = src.next_batch(idle).await.expect("batch b");
    let (a_start, a_end) = offsets(&a);
    let (b_start, b_end) = offsets(&b);
    assert_eq!((a_start, a_end), (0, b_start), "contiguous batches");
    b.finalize(BatchStatus::Delivered);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        committed(&group, &topic, 1).await,
        vec![None],
        "b finished first: nothing below it is done, nothing is committed"
    );
    a.finalize(BatchStatus::Delivered);
    wait_committed(&group, &topic, b_end).await;

    // Batch c fails downstream, d succeeds: the commit must stay at c's start.
    let mut c = src.next_batch(idle).await.expect("batch c");
    let (c_start, c_end) = offsets(&c);
    assert_eq!(c_start, b_end);
    let mut d = src.next_batch(idle).await.expect("batch d");
    d.finalize(BatchStatus::Delivered);
    c.finalize(BatchStatus::Errored);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(committed(&group, &topic, 1).await, vec![Some(c_start)]);

    // The source reads c's records again (and everything after), and then commits to the end.
    let mut seen: BTreeMap<i64, usize> = BTreeMap::new();
    while seen.len() < (100 - c_start) as usize {
        let mut batch = src.next_batch(idle).await.expect("re-read batches");
        for r in &batch.records {
            *seen.entry(seq_of(r)).or_default() += 1;
        }
        batch.finalize(BatchStatus::Delivered);
    }
    assert!(
        (c_start..c_end).all(|s| seen.contains_key(&s)),
        "the failed records came again"
    );
    // Keep delivering whatever else comes (the rest of the re-read) until the commit is at
    // the end of the partition.
    let mut last = Vec::new();
    for _ in 0..300 {
        while let Some(mut batch) = src.next_batch(Duration::from_millis(50)).await {
            batch.finalize(BatchStatus::Delivered);
        }
        last = committed(&group, &topic, 1).await;
        if last == vec![Some(100)] {
            break;
        }
    }
    assert_eq!(
        last,
        vec![Some(100)],
        "commit reaches the end once all is delivered"
    );
    assert!(src.gauge("seeks") >= 1, "the partition was sought back");
    src.stop(Duration::from_secs(20))
        .await
        .expect("source stops");
}

async fn wait_committed(group: &str, topic: &str, offset: i64) {
    let mut last = Vec::new();
    for _ in 0..100 {
        last = committed(group, topic, 1).await;
        if last == vec![Some(offset)] {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("committed offset did not reach {offset}: {last:?}");
}

/// Two members of one group split the partitions; when one leaves with records it never
/// delivered, the other takes its partitions over and reads those records again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_partitions_and_take_over() {
    init();
    let topic = unique("grp");
    let group = unique("grp-group");
    create_topic(&topic, 6).await;
    let n = 6000i64;
    produce(
        &topic,
        (0..n)
            .map(|i| {
                (
                    Some(format!("dev-{}", i % 60)),
                    format!("{{\"seq\":{i}}}").into_bytes(),
                )
            })
            .collect(),
    )
    .await;
    let mut config = source(&topic, &group);
    config.max_batch = 50;
    let mut a = SourceHarness::start(&config, "a", "kafka-tests")
        .await
        .expect("a builds");
    let mut b = SourceHarness::start(&config, "b", "kafka-tests")
        .await
        .expect("b builds");
    // Wait until the group has split the six partitions between both members.
    let mut split = false;
    for _ in 0..200 {
        let (pa, pb) = (
            a.gauge("assigned_partitions"),
            b.gauge("assigned_partitions"),
        );
        if pa > 0 && pb > 0 && pa + pb == 6 {
            split = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        split,
        "partitions not split: a={} b={}",
        a.gauge("assigned_partitions"),
        b.gauge("assigned_partitions")
    );
    let mut delivered: BTreeSet<i64> = BTreeSet::new();
    // b delivers a few batches, then holds one and goes away without delivering it.
    for _ in 0..3 {
        if let Some(mut batch) = b.next_batch(Duration::from_secs(10)).await {
            delivered.extend(batch.records.iter().map(seq_of));
            batch.finalize(BatchStatus::Delivered);
        }
    }
    let held = b.next_batch(Duration::from_secs(10)).await;
    let held_seqs: Vec<i64> = held
        .as_ref()
        .map(|h| h.records.iter().map(seq_of).collect())
        .unwrap_or_default();
    drop(held); // never delivered: Errored, not committed
    b.stop(Duration::from_secs(30)).await.expect("b stops");
    // a now owns all six partitions and reads everything not committed, including b's.
    let rest = a
        .take(usize::MAX, BatchStatus::Delivered, Duration::from_secs(10))
        .await;
    delivered.extend(rest.iter().map(seq_of));
    assert_eq!(
        a.gauge("assigned_partitions"),
        6,
        "a took over b's partitions"
    );
    let missing: Vec<i64> = (0..n).filter(|s| !delivered.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "lost {} records: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert!(
        held_seqs.iter().all(|s| delivered.contains(s)),
        "b's undelivered batch was read again by a"
    );
    // Every partition's commit reaches its end (a keeps delivering anything still coming).
    let mut offsets = Vec::new();
    for _ in 0..300 {
        while let Some(mut batch) = a.next_batch(Duration::from_millis(50)).await {
            batch.finalize(BatchStatus::Delivered);
        }
        offsets = committed(&group, &topic, 6).await;
        if offsets.iter().map(|o| o.unwrap_or(0)).sum::<i64>() == n {
            break;
        }
    }
    let total: i64 = offsets.iter().map(|o| o.unwrap_or(0)).sum();
    assert_eq!(total, n, "everything committed: {offsets:?}");
    a.stop(Duration::from_secs(20)).await.expect("a stops");
}

/// A Kafka-compatible broker of this test only (the tansu binary `scripts/services.sh`
/// builds), on a free port, so that it can be frozen without touching the shared one.
struct PrivateBroker {
    child: std::process::Child,
    bootstrap: String,
}

impl PrivateBroker {
    fn start() -> Self {
        let home = std::env::var("HOME").unwrap_or_default();
        let root = std::env::var("SLUICE_TANSU_ROOT")
            .unwrap_or_else(|_| format!("{home}/.cache/sluice/tansu"));
        let tansu = std::path::PathBuf::from(root).join("bin/tansu");
        assert!(
            tansu.exists(),
            "no tansu at {}: run `scripts/services.sh start tansu`",
            tansu.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let url = format!("tcp://127.0.0.1:{port}");
        let child = std::process::Command::new(tansu)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start a private tansu");
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "private tansu did not listen"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        PrivateBroker {
            child,
            bootstrap: format!("127.0.0.1:{port}"),
        }
    }

    fn signal(&self, signal: &str) {
        let _ = std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status();
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads every message of `topic` on `bootstrap`: (partition, key, payload) in offset order
/// per partition.
async fn read_all(bootstrap: &str, topic: &str, n: usize) -> Vec<(i32, Option<String>, Vec<u8>)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let (bootstrap, topic) = (bootstrap.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", unique("order-reader"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "6000")
            .create()
            .expect("consumer");
        consumer.subscribe(&[&topic]).expect("subscribe");
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut last = std::time::Instant::now();
        while std::time::Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    last = std::time::Instant::now();
                    out.push((
                        m.partition(),
                        m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                        m.payload().unwrap_or_default().to_vec(),
                    ));
                }
                Some(Err(e)) => panic!("consuming {topic}: {e}"),
                None if out.len() >= n && last.elapsed() > Duration::from_secs(3) => break,
                None => {}
            }
        }
        out
    })
    .await
    .expect("consumer thread")
}

/// Sends `batches` batches of 50 records (3 keys, `seq` counting up) to a kafka sink on a
/// private broker, freezing the broker for `freeze` a third of the way in. Returns each batch's
/// status and each key's `seq`s in the topic's order.
async fn ordered_run(
    message_timeout: &str,
    freeze: Duration,
) -> (
    Vec<Option<BatchStatus>>,
    BTreeMap<String, Vec<i64>>,
    i64,
    i64,
) {
    let broker = PrivateBroker::start();
    let topic = unique("order");
    {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &broker.bootstrap)
                .create()
                .expect("admin");
        for r in admin
            .create_topics(
                &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .expect("create topic")
        {
            r.expect("topic created");
        }
    }
    let mut config = KafkaSinkConfig::new(&broker.bootstrap, &topic);
    config.key = Some("{device_id}".into());
    config.in_flight_batches = 4;
    config.linger = "1ms".parse().expect("duration");
    config.message_timeout = message_timeout.parse().expect("duration");
    // Requests to the frozen broker time out after 1s and librdkafka retries them.
    for (k, v) in [
        ("request.timeout.ms", "1000"),
        ("socket.timeout.ms", "1000"),
        ("retry.backoff.ms", "50"),
        ("batch.num.messages", "20"),
    ] {
        config.librdkafka_options.insert(k.into(), v.into());
    }
    let sink = SinkHarness::start(&config, "ordered", "kafka-tests")
        .await
        .expect("sink builds");
    let (devices, batches, per_batch) = (3i64, 60i64, 50i64);
    let mut statuses = Vec::new();
    let mut seq = 0i64;
    for b in 0..batches {
        if b == batches / 3 {
            broker.signal("-STOP");
        }
        if b == batches / 3 + 10 {
            // Frozen while batches keep coming.
            tokio::time::sleep(freeze).await;
            broker.signal("-CONT");
        }
        let records: Vec<Record> = (0..per_batch)
            .map(|_| {
                let mut r = Record::new(1_764_000_000_000_000_000 + seq);
                r.set_tag("device_id", format!("dev-{}", seq % devices));
                r.set_field("seq", Value::I64(seq));
                seq += 1;
                r
            })
            .collect();
        let (f, status) = ack::batch();
        let mut batch = Batch::new(records);
        for r in &mut batch.records {
            r.finalizers.push(f.clone());
        }
        f.finish(BatchStatus::Delivered);
        sink.out.send(batch).await.expect("send to sink");
        statuses.push(status);
    }
    let mut finals = Vec::new();
    for status in statuses {
        finals.push(status_within(status, Duration::from_secs(120)).await);
    }
    let timeouts = sink
        .metrics
        .counter("timeouts")
        .load(std::sync::atomic::Ordering::Relaxed);
    sink.stop(Duration::from_secs(30))
        .await
        .expect("sink stops");
    let got = read_all(&broker.bootstrap, &topic, seq as usize).await;
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (_, key, payload) in &got {
        let v: serde_json::Value = serde_json::from_slice(payload).expect("JSON payload");
        per_key
            .entry(key.clone().expect("keyed"))
            .or_default()
            .push(v["seq"].as_i64().expect("seq"));
    }
    (finals, per_key, seq, timeouts)
}

/// The first pair of a key's `seq`s in the topic that is out of order or repeated.
fn first_inversion(seqs: &[i64]) -> Option<(usize, i64, i64)> {
    seqs.windows(2)
        .enumerate()
        .find(|(_, w)| w[1] <= w[0])
        .map(|(i, w)| (i, w[0], w[1]))
}

/// Per-key order (issue 13, 11b): many records of the same keys across many concurrent
/// batches, with the broker frozen mid-stream so that the producer's requests time out and
/// librdkafka retries them (idempotent producer), arrive in the order the sink received
/// them, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_keeps_its_order_across_batches_and_retries() {
    init();
    let (statuses, per_key, n, _) = ordered_run("60s", Duration::from_secs(3)).await;
    for (i, status) in statuses.iter().enumerate() {
        assert_eq!(*status, Some(BatchStatus::Delivered), "batch {i}");
    }
    assert_eq!(per_key.len(), 3);
    for (key, seqs) in &per_key {
        assert_eq!(
            first_inversion(seqs),
            None,
            "{key}: out of order or repeated"
        );
        let want: Vec<i64> = (0..n)
            .filter(|s| format!("dev-{}", s % 3) == *key)
            .collect();
        assert_eq!(seqs, &want, "{key}: every record once, in order");
    }
}

/// A record that still fails after `message_timeout` is not re-sent by the sink (a re-send
/// lands behind newer records of its key): its batch is `Errored`, for the source to
/// redeliver, and what the topic holds stays in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_record_is_not_resent_out_of_order() {
    init();
    let (statuses, per_key, _, timeouts) = ordered_run("2s", Duration::from_secs(6)).await;
    let errored = statuses
        .iter()
        .filter(|s| **s == Some(BatchStatus::Errored))
        .count();
    assert!(
        statuses.iter().all(Option::is_some),
        "every batch resolved: {statuses:?}"
    );
    for (key, seqs) in &per_key {
        assert_eq!(
            first_inversion(seqs),
            None,
            "{key}: {} messages, one out of order or repeated",
            seqs.len()
        );
    }
    assert!(
        errored > 0,
        "the freeze outlasted message_timeout: {statuses:?}"
    );
    assert!(timeouts > 0, "message timeouts counted in `timeouts`");
}
