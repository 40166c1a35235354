//! Integration tests of the `kinesis` source against moto on 127.0.0.1:5000 (Kinesis and the
//! DynamoDB lease table; `scripts/services.sh start`). Every test creates its own stream and
//! lease table, so they run in parallel (and beside CI runs sharing moto).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use sluice_core::ack::BatchStatus;
use sluice_core::channel::{buffer, BufferConfig, Input, Output, Outputs, DEAD_LETTER};
use sluice_core::config::HumanDuration;
use sluice_core::metrics::{ComponentMetrics, Kind};
use sluice_core::record::Batch;
use sluice_core::registry::{BuildContext, SourceConfig};
use sluice_core::source::SourceContext;
use sluice_sources::kinesis::{self, KinesisConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const ENDPOINT: &str = "http://127.0.0.1:5000";

fn env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for (k, v) in [
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
        ] {
            if std::env::var_os(k).is_none() {
                std::env::set_var(k, v);
            }
        }
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    });
    if std::net::TcpStream::connect_timeout(
        &"127.0.0.1:5000".parse().expect("address"),
        Duration::from_secs(2),
    )
    .is_err()
    {
        panic!("moto (Kinesis, DynamoDB) is not running on 127.0.0.1:5000: run `scripts/services.sh start`");
    }
}

/// A test's stream, lease table and clients.
struct Fixture {
    stream: String,
    table: String,
    kinesis: aws_sdk_kinesis::Client,
    dynamodb: aws_sdk_dynamodb::Client,
}

fn config(stream: &str, table: &str) -> KinesisConfig {
    let mut c = KinesisConfig::new(stream, table);
    c.endpoint_url = Some(ENDPOINT.to_string());
    c.region = Some("us-east-1".to_string());
    c.lease_timeout = HumanDuration(Duration::from_secs(3));
    c.checkpoint_interval = HumanDuration(Duration::from_millis(200));
    c.poll_interval = HumanDuration(Duration::from_millis(200));
    c
}

/// A fresh stream of `shards` shards (and a lease table name nobody uses yet).
async fn fixture(test: &str, shards: i32) -> Fixture {
    env();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let stream = format!("sluice-{test}-{nanos}");
    let table = format!("sluice-leases-{test}-{nanos}");
    let (kinesis, dynamodb) = kinesis::clients(&config(&stream, &table))
        .await
        .expect("clients");
    kinesis
        .create_stream()
        .stream_name(&stream)
        .shard_count(shards)
        .send()
        .await
        .expect("CreateStream (is moto running? `scripts/services.sh start`)");
    Fixture {
        stream,
        table,
        kinesis,
        dynamodb,
    }
}

impl Fixture {
    /// Puts `{"seq":n}` for every n in `seqs` (partition key `k{n % keys}`), 500 per call;
    /// returns the highest sequence number written to each shard.
    async fn put(&self, seqs: std::ops::Range<u64>, keys: u64) -> HashMap<String, String> {
        let mut last: HashMap<String, String> = HashMap::new();
        let all: Vec<u64> = seqs.collect();
        for chunk in all.chunks(500) {
            let entries = chunk
                .iter()
                .map(|n| {
                    PutRecordsRequestEntry::builder()
                        .data(Blob::new(format!(
                            "{{\"seq\":{n},\"key\":\"k{}\"}}",
                            n % keys
                        )))
                        .partition_key(format!("k{}", n % keys))
                        .build()
                        .expect("entry")
                })
                .collect::<Vec<_>>();
            let out = self
                .kinesis
                .put_records()
                .stream_name(&self.stream)
                .set_records(Some(entries))
                .send()
                .await
                .expect("PutRecords");
            assert_eq!(out.failed_record_count, Some(0), "put failures");
            for r in out.records {
                let (Some(shard), Some(seq)) = (r.shard_id, r.sequence_number) else {
                    panic!("PutRecords entry without shard or sequence number");
                };
                let e = last.entry(shard).or_default();
                if e.is_empty() || (seq.len(), &seq) > (e.len(), &*e) {
                    *e = seq;
                }
            }
        }
        last
    }

    async fn put_raw(&self, bodies: &[&str]) {
        for b in bodies {
            self.kinesis
                .put_record()
                .stream_name(&self.stream)
                .data(Blob::new(b.as_bytes().to_vec()))
                .partition_key("k")
                .send()
                .await
                .expect("PutRecord");
        }
    }

    /// shard id → (checkpoint, owner) from the lease table.
    async fn leases(&self) -> BTreeMap<String, (String, Option<String>)> {
        let answer = self
            .dynamodb
            .scan()
            .table_name(&self.table)
            .consistent_read(true)
            .send()
            .await;
        let items = match answer {
            Ok(a) => a.items.unwrap_or_default(),
            // The source has not created the table yet.
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception()) =>
            {
                Vec::new()
            }
            Err(e) => panic!("Scan lease table: {e:?}"),
        };
        let s = |i: &HashMap<String, AttributeValue>, k: &str| {
            i.get(k).and_then(|v| v.as_s().ok()).cloned()
        };
        items
            .iter()
            .map(|i| {
                (
                    s(i, "leaseKey").expect("leaseKey"),
                    (s(i, "checkpoint").expect("checkpoint"), s(i, "leaseOwner")),
                )
            })
            .collect()
    }

    /// Waits (up to `secs`) until the lease table satisfies `ok`.
    async fn wait_leases(
        &self,
        secs: u64,
        what: &str,
        ok: impl Fn(&BTreeMap<String, (String, Option<String>)>) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let l = self.leases().await;
            if ok(&l) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: lease table {l:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// How a test's sink treats the batches it gets.
type Judge = Box<dyn FnMut(usize, &mut Batch) -> Option<BatchStatus> + Send>;

/// A source instance running in this process and a sink that records every `seq` it got (in
/// arrival order) and finalizes each batch as `judge` says (`None`: hold it in `held`).
struct Running {
    metrics: Arc<ComponentMetrics>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), String>>,
    seen: Arc<Mutex<Vec<u64>>>,
    held: Arc<Mutex<Vec<Batch>>>,
    dead: Arc<Mutex<Vec<Batch>>>,
    records: Arc<Mutex<Vec<sluice_core::record::Record>>>,
}

async fn start(config: KinesisConfig, judge: Judge) -> Running {
    let metrics = Arc::new(ComponentMetrics::new("kinesis", Kind::Source));
    let cap = BufferConfig {
        max_batches: 64,
        ..BufferConfig::default()
    };
    let (edge, input) = buffer(cap, Arc::new(ComponentMetrics::new("out", Kind::Sink)));
    let (dead_edge, mut dead_input) =
        buffer(cap, Arc::new(ComponentMetrics::new("dlq", Kind::Sink)));
    let out = Outputs::new(
        Output::new(vec![edge]),
        HashMap::from([(DEAD_LETTER.to_string(), Output::new(vec![dead_edge]))]),
        metrics.clone(),
    );
    let source = config
        .build(&BuildContext {
            name: "kinesis".to_string(),
            pipeline_id: "kinesis-tests".to_string(),
            state_dir: None,
        })
        .await
        .expect("source builds");
    let shutdown = CancellationToken::new();
    let cx = SourceContext {
        name: "kinesis".to_string(),
        out,
        shutdown: shutdown.clone(),
        metrics: metrics.clone(),
    };
    let task = tokio::spawn(async move { source.run(cx).await.map_err(|e| e.to_string()) });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let held = Arc::new(Mutex::new(Vec::new()));
    let records = Arc::new(Mutex::new(Vec::new()));
    let dead = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(sink(
        input,
        judge,
        seen.clone(),
        held.clone(),
        records.clone(),
    ));
    let dead2 = dead.clone();
    tokio::spawn(async move {
        while let Some(mut b) = dead_input.recv().await {
            let copy = Batch::new(
                b.records
                    .iter()
                    .map(|r| {
                        let mut c = sluice_core::record::Record::new(r.time);
                        c.payload = r.payload.clone();
                        c.meta = r.meta.clone();
                        c
                    })
                    .collect(),
            );
            b.finalize(BatchStatus::Delivered);
            dead2.lock().expect("lock").push(copy);
        }
    });
    Running {
        metrics,
        shutdown,
        task,
        seen,
        held,
        dead,
        records,
    }
}

async fn sink(
    mut input: Input,
    mut judge: Judge,
    seen: Arc<Mutex<Vec<u64>>>,
    held: Arc<Mutex<Vec<Batch>>>,
    records: Arc<Mutex<Vec<sluice_core::record::Record>>>,
) {
    let mut n = 0;
    while let Some(mut b) = input.recv().await {
        {
            let mut seen = seen.lock().expect("lock");
            let mut rs = records.lock().expect("lock");
            for r in &b.records {
                if let Some(s) = r.field("seq").and_then(|v| v.as_f64()) {
                    seen.push(s as u64);
                }
                let mut c = sluice_core::record::Record::new(r.time);
                c.tags = r.tags.clone();
                c.fields = r.fields.clone();
                rs.push(c);
            }
        }
        match judge(n, &mut b) {
            Some(status) => b.finalize(status),
            None => held.lock().expect("lock").push(b),
        }
        n += 1;
    }
}

fn deliver_all() -> Judge {
    Box::new(|_, _| Some(BatchStatus::Delivered))
}

impl Running {
    fn counter(&self, name: &'static str) -> i64 {
        self.metrics.counter(name).load(Ordering::Relaxed)
    }

    fn gauge(&self, name: &'static str) -> i64 {
        self.metrics.gauge(name).load(Ordering::Relaxed)
    }

    fn seen(&self) -> Vec<u64> {
        self.seen.lock().expect("lock").clone()
    }

    fn distinct(&self) -> std::collections::BTreeSet<u64> {
        self.seen().into_iter().collect()
    }

    /// Waits (up to `secs`) until `ok` holds for this instance.
    async fn wait(&self, secs: u64, what: &str, ok: impl Fn(&Running) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !ok(self) {
            assert!(
                Instant::now() < deadline,
                "{what}: {} records seen ({} distinct), leases_held {}",
                self.seen().len(),
                self.distinct().len(),
                self.gauge("leases_held")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Graceful stop: must end cleanly.
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("source stops within 30 s")
            .expect("source task")
            .expect("source ends without error");
    }

    /// A crash: the task is dropped where it stands (no final checkpoint, no lease release).
    fn crash(self) {
        self.task.abort();
    }
}

fn assert_all(seen: &std::collections::BTreeSet<u64>, n: u64) {
    let missing: Vec<u64> = (0..n).filter(|s| !seen.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "lost {} of {n} records, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_thousand_records_from_4_shards_then_resume_after_the_checkpoints() {
    let f = fixture("all", 4).await;
    let n: u64 = std::env::var("SLUICE_KINESIS_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let t0 = Instant::now();
    let last = f.put(0..n, 1000).await;
    eprintln!("put {n} records in {:?}", t0.elapsed());
    assert_eq!(last.len(), 4, "records in every shard");
    let t0 = Instant::now();
    let run = start(config(&f.stream, &f.table), deliver_all()).await;
    run.wait(300, "every record delivered", |r| {
        r.distinct().len() as u64 >= n
    })
    .await;
    eprintln!("read {n} records from 4 shards in {:?}", t0.elapsed());
    assert_all(&run.distinct(), n);
    assert_eq!(run.seen().len() as u64, n, "no duplicates without failures");
    // Each shard's checkpoint reaches its last record.
    f.wait_leases(30, "checkpoints at each shard's last record", |l| {
        last.iter()
            .all(|(shard, seq)| l.get(shard).is_some_and(|(c, _)| c == seq))
    })
    .await;
    assert_eq!(run.gauge("leases_held"), 4);
    assert!(run.counter("checkpoints") >= 4);
    // The iterator age of every shard is a gauge; caught up, it is 0.
    for shard in last.keys() {
        let labels = [("shard", shard.as_str())];
        let age = run.metrics.labeled_gauge("millis_behind_latest", &labels);
        assert_eq!(age.load(Ordering::Relaxed), 0, "{shard} caught up");
        assert!(
            run.metrics
                .remove_labeled_gauge("millis_behind_latest", &labels),
            "millis_behind_latest{{shard={shard}}} was registered by the reader"
        );
    }
    run.stop().await;
    // A graceful stop frees the leases.
    let l = f.leases().await;
    assert!(l.values().all(|(_, o)| o.is_none()), "released: {l:?}");

    // A new instance resumes after the checkpoints: only the new records arrive.
    let run = start(config(&f.stream, &f.table), deliver_all()).await;
    run.wait(60, "leases taken", |r| r.gauge("leases_held") == 4)
        .await;
    f.put(n..n + 100, 1000).await;
    run.wait(60, "the 100 new records", |r| r.seen().len() >= 100)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = run.seen();
    assert_eq!(seen.len(), 100, "nothing old read again");
    assert!(seen.iter().all(|s| (n..n + 100).contains(s)), "{seen:?}");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_checkpoint_never_passes_an_undelivered_batch() {
    let f = fixture("watermark", 1).await;
    let last = f.put(0..50, 1).await;
    let mut c = config(&f.stream, &f.table);
    c.max_records = 10;
    // The first batch is held (not delivered), every later one is delivered.
    let run = start(
        c,
        Box::new(|i, _| (i > 0).then_some(BatchStatus::Delivered)),
    )
    .await;
    run.wait(60, "all 50 read", |r| r.distinct().len() >= 50)
        .await;
    // Many checkpoint rounds later, nothing is checkpointed: the first batch is in flight.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let l = f.leases().await;
    assert_eq!(l.len(), 1);
    let (checkpoint, owner) = l.values().next().expect("lease").clone();
    assert_eq!(
        checkpoint, "TRIM_HORIZON",
        "moved past an undelivered batch"
    );
    assert!(owner.is_some());
    // Deliver it: the watermark jumps to the last record.
    for mut b in run.held.lock().expect("lock").drain(..) {
        b.finalize(BatchStatus::Delivered);
    }
    let want = last.values().next().expect("shard").clone();
    f.wait_leases(30, "checkpoint at the last record", |l| {
        !l.is_empty() && l.values().all(|(c, _)| *c == want)
    })
    .await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_errored_batch_is_read_again() {
    let f = fixture("errored", 1).await;
    let last = f.put(0..30, 1).await;
    let mut c = config(&f.stream, &f.table);
    c.max_records = 10;
    let run = start(
        c,
        Box::new(|i, _| {
            Some(if i == 0 {
                BatchStatus::Errored
            } else {
                BatchStatus::Delivered
            })
        }),
    )
    .await;
    // The first 10 arrive twice (once errored, once delivered).
    run.wait(60, "the errored batch read again, and the rest", |r| {
        r.seen().iter().filter(|s| **s < 10).count() >= 20 && r.distinct().len() >= 30
    })
    .await;
    assert_all(&run.distinct(), 30);
    assert!(run.counter("rereads") >= 1);
    let want = last.values().next().expect("shard").clone();
    f.wait_leases(30, "checkpoint at the last record", |l| {
        !l.is_empty() && l.values().all(|(c, _)| *c == want)
    })
    .await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_split_shard_is_read_to_its_end_before_its_children() {
    let f = fixture("split", 1).await;
    // One partition key: every record goes to the same shard, then to the same child.
    f.put(0..100, 1).await;
    let run = start(config(&f.stream, &f.table), deliver_all()).await;
    run.wait(60, "first 100", |r| r.distinct().len() >= 100)
        .await;
    let shards = f
        .kinesis
        .list_shards()
        .stream_name(&f.stream)
        .send()
        .await
        .expect("ListShards")
        .shards
        .unwrap_or_default();
    let parent = shards[0].clone();
    let range = parent.hash_key_range.expect("hash range");
    let mid = (range.starting_hash_key.parse::<u128>().expect("hash")
        + range.ending_hash_key.parse::<u128>().expect("hash"))
        / 2;
    f.kinesis
        .split_shard()
        .stream_name(&f.stream)
        .shard_to_split(&parent.shard_id)
        .new_starting_hash_key(mid.to_string())
        .send()
        .await
        .expect("SplitShard");
    f.put(100..200, 1).await;
    run.wait(60, "all 200 after the split", |r| r.distinct().len() >= 200)
        .await;
    let seen = run.seen();
    assert_eq!(
        seen,
        (0..200).collect::<Vec<_>>(),
        "one key: order kept across the split"
    );
    f.wait_leases(30, "parent finished, children leased", |l| {
        l.len() == 3
            && l.get(&parent.shard_id)
                .is_some_and(|(c, _)| c == "SHARD_END")
    })
    .await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn iot_rule_envelopes_give_tags_from_the_topic() {
    let f = fixture("iot", 1).await;
    f.put_raw(&[
        r#"{"topic":"dt/acme/p1/dev-7/telemetry","payload":{"ts":1764000000000,"temp":21.5}}"#,
        r#"{"payload":{"temp":1}}"#,
    ])
    .await;
    let mut c = config(&f.stream, &f.table);
    c.body_path = Some("payload".into());
    c.topic_path = Some("topic".into());
    c.decode = toml::from_str("topic_pattern = \"dt/{tenant}/{project}/{device_id}/telemetry\"")
        .expect("decode");
    let run = start(c, deliver_all()).await;
    run.wait(60, "the good record", |r| {
        !r.records.lock().expect("lock").is_empty()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while run.dead.lock().expect("lock").is_empty() {
        assert!(Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    {
        let rs = run.records.lock().expect("lock");
        assert_eq!(rs.len(), 1);
        let r = &rs[0];
        assert_eq!(r.tag("device_id"), Some("dev-7"));
        assert_eq!(r.tag("tenant"), Some("acme"));
        assert_eq!(r.time, 1_764_000_000_000_000_000);
        assert_eq!(r.field("temp").and_then(|v| v.as_f64()), Some(21.5));
        let dead = run.dead.lock().expect("lock");
        let e = dead[0].records[0].meta.error.as_deref().unwrap_or("");
        assert!(
            e.contains("`topic_path` \"topic\" is not in the body"),
            "{e}"
        );
    }
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_split_4_shards_and_one_takes_over_when_the_other_dies() {
    let f = fixture("pair", 4).await;
    f.put(0..2000, 1000).await;
    let mut ca = config(&f.stream, &f.table);
    ca.worker_id = Some("a".into());
    let mut cb = config(&f.stream, &f.table);
    cb.worker_id = Some("b".into());
    let a = start(ca, deliver_all()).await;
    a.wait(60, "a takes all 4", |r| r.gauge("leases_held") == 4)
        .await;
    let b = start(cb, deliver_all()).await;
    // b steals up to its share; a gives the stolen ones up.
    b.wait(60, "b holds 2", |r| r.gauge("leases_held") == 2)
        .await;
    a.wait(60, "a holds 2", |r| r.gauge("leases_held") == 2)
        .await;
    f.wait_leases(30, "2 + 2 owners", |l| {
        let owners: Vec<_> = l.values().filter_map(|(_, o)| o.clone()).collect();
        owners.iter().filter(|o| *o == "a").count() == 2
            && owners.iter().filter(|o| *o == "b").count() == 2
    })
    .await;
    f.put(2000..3000, 1000).await;
    let union = |a: &Running, b: &Running| {
        let mut s = a.distinct();
        s.extend(b.distinct());
        s
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while union(&a, &b).len() < 3000 {
        assert!(
            Instant::now() < deadline,
            "split reading: {} of 3000",
            union(&a, &b).len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        a.distinct().range(2000..3000).next().is_some()
            && b.distinct().range(2000..3000).next().is_some(),
        "both instances read new records"
    );
    assert_eq!(a.counter("leases_lost"), 2, "a noticed both steals");
    let a_seen = a.distinct();
    a.crash();
    // Written while a is dead: only b can read them, after a's leases expire.
    f.put(3000..5000, 1000).await;
    b.wait(60, "b takes over a's leases", |r| {
        r.gauge("leases_held") == 4
    })
    .await;
    b.wait(60, "everything delivered", |r| {
        let mut s = r.distinct();
        s.extend(a_seen.iter().copied());
        s.len() >= 5000
    })
    .await;
    let mut all = b.distinct();
    all.extend(a_seen.iter().copied());
    assert_all(&all, 5000);
    assert!(b.counter("leases_taken") >= 4, "2 stolen + 2 taken over");
    b.stop().await;
}

/// Reads one HTTP/1.1 message (head and a `Content-Length` body) from `r`; `None` at EOF.
async fn read_message(
    r: &mut tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
) -> Option<Vec<u8>> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line).await.ok()? == 0 {
            return None;
        }
        head.extend_from_slice(&line);
        if line == b"\r\n" {
            break;
        }
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(
        !text.contains("transfer-encoding: chunked"),
        "the test proxy only handles Content-Length bodies"
    );
    let len = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).await.ok()?;
    head.extend_from_slice(&body);
    Some(head)
}

/// A proxy in front of moto's Kinesis that answers the first `throttle` `GetRecords` calls
/// with `ProvisionedThroughputExceededException` (moto never throttles). Returns its URL.
async fn throttling_proxy(throttle: usize) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = refused.clone();
    tokio::spawn(async move {
        while let Ok((down, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(up) = tokio::net::TcpStream::connect("127.0.0.1:5000").await else {
                    return;
                };
                let (down_r, mut down_w) = down.into_split();
                let (up_r, mut up_w) = up.into_split();
                let mut down_r = tokio::io::BufReader::new(down_r);
                let mut up_r = tokio::io::BufReader::new(up_r);
                while let Some(request) = read_message(&mut down_r).await {
                    let lower = String::from_utf8_lossy(&request).to_ascii_lowercase();
                    let get_records = lower.contains("kinesis_20131202.getrecords");
                    if get_records && count.load(Ordering::SeqCst) < throttle {
                        count.fetch_add(1, Ordering::SeqCst);
                        let body = r#"{"__type":"ProvisionedThroughputExceededException","message":"Rate exceeded for shard"}"#;
                        let answer = format!(
                            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if down_w.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    if up_w.write_all(&request).await.is_err() {
                        return;
                    }
                    let Some(response) = read_message(&mut up_r).await else {
                        return;
                    };
                    if down_w.write_all(&response).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn throughput_exceeded_backs_off_and_loses_nothing() {
    let f = fixture("throttle", 1).await;
    f.put(0..300, 10).await;
    // More refusals in a row than the SDK's own 3 attempts: the source's backoff takes over.
    let (proxy, refused) = throttling_proxy(12).await;
    let mut c = config(&f.stream, &f.table);
    c.endpoint_url = Some(proxy);
    c.lease_endpoint_url = Some(ENDPOINT.to_string());
    c.max_records = 100;
    let run = start(c, deliver_all()).await;
    run.wait(120, "all 300 after the throttling", |r| {
        r.distinct().len() >= 300
    })
    .await;
    assert_all(&run.distinct(), 300);
    assert_eq!(refused.load(Ordering::SeqCst), 12, "every refusal was sent");
    assert!(
        run.counter("throttled") >= 1,
        "throttled {}",
        run.counter("throttled")
    );
    assert_eq!(run.seen().len(), 300, "throttling causes no duplicates");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn starting_position_latest_skips_the_backlog() {
    let f = fixture("latest", 2).await;
    f.put(0..100, 10).await;
    let mut c = config(&f.stream, &f.table);
    c.starting_position = kinesis::StartingPosition::Latest;
    let run = start(c, deliver_all()).await;
    run.wait(60, "both leases held", |r| r.gauge("leases_held") == 2)
        .await;
    // Let each reader get its LATEST iterator before the new records are put.
    f.wait_leases(30, "leases owned", |l| {
        !l.is_empty() && l.values().all(|(_, o)| o.is_some())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    f.put(100..150, 10).await;
    run.wait(60, "the 50 new records", |r| r.distinct().len() >= 50)
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = run.distinct();
    assert_eq!(
        seen,
        (100..150).collect(),
        "only records put after the start"
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_that_always_fails_is_dead_lettered_after_max_redeliveries() {
    let f = fixture("poison", 1).await;
    let last = f.put(0..20, 1).await;
    let mut c = config(&f.stream, &f.table);
    c.max_records = 10;
    c.max_redeliveries = 2;
    // The sink fails record 5 every time (its own status), and delivers the others.
    let run = start(
        c,
        Box::new(|_, b| {
            for r in &mut b.records {
                if r.field("seq").and_then(|v| v.as_f64()) == Some(5.0) {
                    r.finalize(BatchStatus::Errored);
                }
            }
            Some(BatchStatus::Delivered)
        }),
    )
    .await;
    let want = last.values().next().expect("shard").clone();
    // 1 + 2 failed deliveries, then the dead letter: backoffs of 1 + 2 + 4 s.
    f.wait_leases(90, "checkpoint past the poison record", |l| {
        !l.is_empty() && l.values().all(|(c, _)| *c == want)
    })
    .await;
    assert_eq!(run.counter("poisoned"), 1);
    {
        let dead = run.dead.lock().expect("lock");
        let records: Vec<_> = dead.iter().flat_map(|b| &b.records).collect();
        assert_eq!(records.len(), 1, "only the poison record: {records:?}");
        let e = records[0].meta.error.as_deref().unwrap_or("");
        assert!(e.contains("max_redeliveries = 2"), "{e}");
        assert_eq!(
            records[0].payload.as_deref(),
            Some(&br#"{"seq":5,"key":"k0"}"#[..])
        );
    }
    let seen = run.seen();
    assert_all(&run.distinct(), 20);
    assert_eq!(
        seen.iter().filter(|s| **s == 5).count(),
        3,
        "record 5 delivered 1 + max_redeliveries times before the dead letter: {seen:?}"
    );
    run.stop().await;
}
