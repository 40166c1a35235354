//! Integration tests of the `sqs` source against moto on 127.0.0.1:5000
//! (`scripts/services.sh start`). Every test creates its own queue, so they run in parallel.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{QueueAttributeName, SendMessageBatchRequestEntry};
use aws_sdk_sqs::Client;
use futures::stream::{self, StreamExt};
use sluice_core::ack::BatchStatus;
use sluice_core::channel::{buffer, BufferConfig, Input, Output, Outputs, DEAD_LETTER};
use sluice_core::config::HumanDuration;
use sluice_core::metrics::{ComponentMetrics, Kind};
use sluice_core::record::{Batch, Origin};
use sluice_core::registry::{BuildContext, SourceConfig};
use sluice_core::source::SourceContext;
use sluice_sources::sqs::{self, OnRejected, SqsConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Messages of the round-trip test.
const MESSAGES: i64 = 500;
const ENDPOINT: &str = "http://127.0.0.1:5000";

/// moto takes any credentials; the source reads them from the standard chain (environment).
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
        panic!("moto (SQS) is not running on 127.0.0.1:5000: run `scripts/services.sh start`");
    }
}

/// A client (dummy credentials from the environment) and a fresh queue.
async fn queue(test: &str) -> (Client, String) {
    env();
    let client = sqs::client(Some("us-east-1"), Some(ENDPOINT))
        .await
        .expect("sqs client");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let url = client
        .create_queue()
        .queue_name(format!("sluice-{test}-{nanos}"))
        .attributes(QueueAttributeName::VisibilityTimeout, "30")
        .send()
        .await
        .expect("create queue (is moto running? `scripts/services.sh start`)")
        .queue_url
        .expect("queue url");
    (client, url)
}

/// Sends `bodies` with SendMessageBatch, 10 per call, 20 calls at a time.
async fn send(client: &Client, url: &str, bodies: &[String]) {
    let calls = bodies.chunks(10).map(|chunk| {
        let entries = chunk
            .iter()
            .enumerate()
            .map(|(i, b)| {
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(b)
                    .build()
                    .expect("entry")
            })
            .collect::<Vec<_>>();
        client
            .send_message_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
    });
    let results: Vec<_> = stream::iter(calls).buffer_unordered(20).collect().await;
    for r in results {
        let out = r.expect("SendMessageBatch");
        assert!(out.failed.is_empty(), "send failures: {:?}", out.failed);
    }
}

/// Messages left on the queue, visible or in flight.
async fn depth(client: &Client, url: &str) -> i64 {
    let attrs = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .expect("GetQueueAttributes")
        .attributes
        .unwrap_or_default();
    attrs
        .values()
        .map(|v| v.parse::<i64>().expect("number"))
        .sum()
}

/// Asserts the queue is empty: no depth, and a receive that returns nothing.
async fn assert_empty(client: &Client, url: &str) {
    // Deletes run after delivery, concurrently with the test: give the last ones time.
    let mut d = depth(client, url).await;
    for _ in 0..150 {
        if d == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        d = depth(client, url).await;
    }
    assert_eq!(d, 0, "queue depth");
    let left = client
        .receive_message()
        .queue_url(url)
        .max_number_of_messages(10)
        .wait_time_seconds(1)
        .send()
        .await
        .expect("ReceiveMessage")
        .messages
        .unwrap_or_default();
    assert!(left.is_empty(), "messages left on the queue: {left:?}");
}

/// A source running in this process, with its default and dead-letter outputs readable.
struct Running {
    input: Input,
    dead: Input,
    metrics: Arc<ComponentMetrics>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), String>>,
}

async fn start(url: &str, receivers: usize, tweak: impl FnOnce(&mut SqsConfig)) -> Running {
    let mut config = SqsConfig::new(url);
    config.endpoint_url = Some(ENDPOINT.to_string());
    config.region = Some("us-east-1".to_string());
    config.receivers = receivers;
    config.wait_time = HumanDuration(Duration::from_secs(1));
    tweak(&mut config);
    let metrics = Arc::new(ComponentMetrics::new("sqs", Kind::Source));
    let cap = BufferConfig {
        max_batches: 64,
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
            name: "sqs".to_string(),
            pipeline_id: "sqs-tests".to_string(),
            state_dir: None,
        })
        .await
        .expect("source builds");
    let shutdown = CancellationToken::new();
    let cx = SourceContext {
        name: "sqs".to_string(),
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
    fn counter(&self, name: &'static str) -> i64 {
        self.metrics.counter(name).load(Ordering::Relaxed)
    }

    /// Waits until `n` messages were deleted.
    async fn deleted(&self, n: i64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.counter("deleted") < n {
            assert!(
                Instant::now() < deadline,
                "deleted {} of {n}",
                self.counter("deleted")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the source and checks it ends cleanly with nothing in flight.
    async fn stop(self) {
        self.shutdown.cancel();
        drop(self.input);
        drop(self.dead);
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("source stops within 10 s")
            .expect("source task")
            .expect("source ends without error");
    }
}

async fn next(input: &mut Input) -> Batch {
    tokio::time::timeout(Duration::from_secs(10), input.recv())
        .await
        .expect("a batch within 10 s")
        .expect("output open")
}

fn numbers(batch: &Batch) -> Vec<i64> {
    batch
        .records
        .iter()
        .map(|r| {
            assert!(matches!(r.meta.origin, Origin::Sqs { .. }), "origin");
            r.field("n").and_then(|v| v.as_f64()).expect("field n") as i64
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_trip_through_4_receivers() {
    // moto answers a ReceiveMessage of 10 in ~0.3 s on the shared CI box (measured with boto3),
    // so 2,000 messages would not fit the test budget; 500 still take ~50 long polls.
    let (client, url) = queue("round-trip").await;
    let bodies: Vec<String> = (0..MESSAGES).map(|n| format!("{{\"n\":{n}}}")).collect();
    send(&client, &url, &bodies).await;
    let mut run = start(&url, 4, |_| {}).await;
    // The depth poller reads the queue at start: most of the messages are still waiting.
    let deadline = Instant::now() + Duration::from_secs(5);
    while run.metrics.gauge("queue_depth").load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "queue_depth never polled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(45);
    while seen.len() < MESSAGES as usize {
        assert!(
            Instant::now() < deadline,
            "received {} of {MESSAGES}",
            seen.len()
        );
        let mut batch = next(&mut run.input).await;
        assert!(batch.len() <= 10, "one batch per ReceiveMessage");
        seen.extend(numbers(&batch));
        batch.finalize(BatchStatus::Delivered);
    }
    assert_eq!(seen, (0..MESSAGES).collect::<BTreeSet<_>>());
    run.deleted(MESSAGES).await;
    // SQS is at-least-once: a standard queue (and moto under concurrent receives) may hand
    // out a message twice. Duplicates are allowed, but few.
    let duplicates = run.counter("received") - MESSAGES;
    assert!((0..=10).contains(&duplicates), "{duplicates} duplicates");
    assert_eq!(run.counter("delete_failures"), 0);
    let metrics = run.metrics.clone();
    run.stop().await;
    assert_eq!(metrics.gauge("in_flight").load(Ordering::Relaxed), 0);
    assert_empty(&client, &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errored_batch_is_received_again_at_once_then_with_backoff() {
    let (client, url) = queue("errored").await;
    send(&client, &url, &["{\"n\":7}".to_string()]).await;
    let mut run = start(&url, 1, |_| {}).await;
    let mut first = next(&mut run.input).await;
    assert_eq!(numbers(&first), vec![7]);
    let failed_at = Instant::now();
    first.finalize(BatchStatus::Errored);
    // The queue's visibility timeout is 30 s: only the fast retry (visibility 0) brings it back
    // within the 10 s `next` allows.
    let mut again = next(&mut run.input).await;
    assert_eq!(numbers(&again), vec![7]);
    assert!(failed_at.elapsed() < Duration::from_secs(10));
    assert_eq!(
        run.counter("deleted"),
        0,
        "an errored message is not deleted"
    );
    // A second failure backs off: (2-1)² = 1 s before the queue shows it again.
    let failed_again_at = Instant::now();
    again.finalize(BatchStatus::Errored);
    let mut third = next(&mut run.input).await;
    assert_eq!(numbers(&third), vec![7]);
    assert!(
        failed_again_at.elapsed() >= Duration::from_millis(900),
        "retried after {:?}, expected a 1 s backoff",
        failed_again_at.elapsed()
    );
    third.finalize(BatchStatus::Delivered);
    run.deleted(1).await;
    assert_eq!(run.counter("received"), 3);
    run.stop().await;
    assert_empty(&client, &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_body_goes_to_dead_letter_and_is_deleted() {
    let (client, url) = queue("malformed").await;
    send(&client, &url, &["{not json".to_string()]).await;
    let mut run = start(&url, 1, |c| c.on_rejected = OnRejected::Delete).await;
    let mut dead = next(&mut run.dead).await;
    assert_eq!(dead.len(), 1);
    let record = &dead.records[0];
    assert!(record.meta.error.is_some(), "the decode error is attached");
    assert_eq!(
        record.payload.as_deref(),
        Some(&b"{not json"[..]),
        "the raw body is kept"
    );
    // The decoder marks a dead letter Rejected; the dead-letter sink wrote it, so with
    // `on_rejected = "delete"` the message is done.
    dead.finalize(BatchStatus::Delivered);
    run.deleted(1).await;
    assert_eq!(run.metrics.gauge("in_flight").load(Ordering::Relaxed), 0);
    run.stop().await;
    assert_empty(&client, &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_message_is_left_to_the_redrive_policy() {
    let (client, dlq_url) = queue("redrive-dlq").await;
    let dlq_arn = client
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("GetQueueAttributes")
        .attributes
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .expect("dlq arn");
    let (_, url) = queue("redrive").await;
    client
        .set_queue_attributes()
        .queue_url(&url)
        .attributes(
            QueueAttributeName::RedrivePolicy,
            format!("{{\"deadLetterTargetArn\":\"{dlq_arn}\",\"maxReceiveCount\":\"2\"}}"),
        )
        .send()
        .await
        .expect("SetQueueAttributes");
    send(&client, &url, &["poison".to_string()]).await;
    // Default on_rejected = "leave"; a 1 s visibility brings the message back quickly.
    let mut run = start(&url, 1, |c| {
        c.visibility_timeout = HumanDuration(Duration::from_secs(1))
    })
    .await;
    for _ in 0..2 {
        let mut dead = next(&mut run.dead).await;
        assert_eq!(dead.len(), 1);
        dead.finalize(BatchStatus::Delivered); // the decoder marked it Rejected
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while depth(&client, &dlq_url).await < 1 {
        assert!(
            Instant::now() < deadline,
            "the message never reached the DLQ"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        run.counter("deleted"),
        0,
        "a rejected message is left, not deleted"
    );
    run.stop().await;
    assert_empty(&client, &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_batch_gets_its_visibility_extended() {
    let (client, url) = queue("extend").await;
    send(&client, &url, &["{\"n\":1}".to_string()]).await;
    let mut run = start(&url, 1, |c| {
        c.visibility_timeout = HumanDuration(Duration::from_secs(3))
    })
    .await;
    let mut batch = next(&mut run.input).await;
    // A slow sink: hold the batch for twice the visibility timeout. Without extension the
    // queue would hand the message out again meanwhile.
    let redelivered = tokio::time::timeout(Duration::from_secs(7), run.input.recv()).await;
    assert!(
        redelivered.is_err(),
        "redelivered while in flight: {redelivered:?}"
    );
    assert!(run.counter("visibility_extensions") >= 1);
    assert_eq!(run.counter("received"), 1);
    batch.finalize(BatchStatus::Delivered);
    run.deleted(1).await;
    run.stop().await;
    assert_empty(&client, &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_pending_batches_then_deletes() {
    let (client, url) = queue("shutdown").await;
    send(&client, &url, &["{\"n\":3}".to_string()]).await;
    let mut run = start(&url, 2, |_| {}).await;
    let mut batch = next(&mut run.input).await;
    run.shutdown.cancel();
    // The receivers stop and drop the outputs, but `run` waits for the batch in flight.
    let end = tokio::time::timeout(Duration::from_secs(3), run.input.recv()).await;
    assert!(
        matches!(end, Ok(None)),
        "outputs closed after shutdown: {end:?}"
    );
    assert!(!run.task.is_finished(), "run returned with a batch pending");
    batch.finalize(BatchStatus::Delivered);
    let result = tokio::time::timeout(Duration::from_secs(10), &mut run.task)
        .await
        .expect("source stops once the batch resolved")
        .expect("source task");
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(run.counter("deleted"), 1, "deleted before run returned");
    assert_empty(&client, &url).await;
}

/// An AWS IoT rule envelope with message attributes: `body_path` / `topic_path` pick the device
/// JSON and the topic, `decode.topic_pattern` turns the topic into tags, and the attributes the
/// source asked for (`attributes_as_tags`) become tags too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iot_rule_envelope_and_attributes_become_tags() {
    use aws_sdk_sqs::types::MessageAttributeValue;
    let (client, url) = queue("envelope").await;
    let attribute = |t: &str, v: &str| {
        MessageAttributeValue::builder()
            .data_type(t)
            .string_value(v)
            .build()
            .expect("attribute")
    };
    let entry = |id: &str, body: &str| {
        SendMessageBatchRequestEntry::builder()
            .id(id)
            .message_body(body)
            .message_attributes("site", attribute("String", "berlin"))
            .message_attributes("rssi", attribute("Number", "-70"))
            .message_attributes("ignored", attribute("String", "x"))
    };
    let entries = vec![
        entry(
            "good",
            r#"{"topic":"dt/acme/p1/dev-7/telemetry","payload":{"ts":1764000000000,"temp":21.5,"humidity":40.2,"voltage":3.31,"device_status":"online"}}"#,
        )
        .build()
        .expect("entry"),
        entry("no-topic", r#"{"payload":{"temp":1}}"#)
            .build()
            .expect("entry"),
    ];
    let sent = client
        .send_message_batch()
        .queue_url(&url)
        .set_entries(Some(entries))
        .send()
        .await
        .expect("SendMessageBatch");
    assert!(sent.failed.is_empty(), "{:?}", sent.failed);

    let mut run = start(&url, 1, |c| {
        c.on_rejected = OnRejected::Delete;
        c.body_path = Some("payload".into());
        c.topic_path = Some("topic".into());
        c.attributes_as_tags = sqs::AttributeTags::Names(vec!["site".into(), "rssi".into()]);
        c.decode.topic_pattern = Some("dt/{tenant}/{project}/{device_id}/telemetry".into());
        c.decode.tags = vec!["device_status".into()];
    })
    .await;
    // moto may hand the two messages out in one answer or in two.
    let mut good = None;
    let mut dead = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while good.is_none() || dead.is_none() {
        assert!(Instant::now() < deadline, "good {good:?}, dead {dead:?}");
        tokio::select! {
            Some(mut b) = run.input.recv() => {
                if let Some(r) = b.records.first() {
                    // A clone holds the batch's finalizer too: resolve it, keep the data.
                    let mut r = r.clone();
                    r.finalize(BatchStatus::Delivered);
                    good = Some(r);
                }
                b.finalize(BatchStatus::Delivered);
            }
            Some(mut b) = run.dead.recv() => {
                if let Some(r) = b.records.first() {
                    // A clone holds the batch's finalizer too: resolve it, keep the data.
                    let mut r = r.clone();
                    r.finalize(BatchStatus::Delivered);
                    dead = Some(r);
                }
                b.finalize(BatchStatus::Delivered);
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    let r = good.expect("decoded record");
    assert_eq!(r.tag("device_id"), Some("dev-7"));
    assert_eq!(r.tag("tenant"), Some("acme"));
    assert_eq!(r.tag("project"), Some("p1"));
    assert_eq!(r.tag("device_status"), Some("online"));
    assert_eq!(r.tag("site"), Some("berlin"));
    assert_eq!(r.tag("rssi"), Some("-70"));
    assert_eq!(r.tag("ignored"), None, "only the listed attributes");
    assert_eq!(r.time, 1_764_000_000_000_000_000);
    for (k, v) in [("temp", 21.5), ("humidity", 40.2), ("voltage", 3.31)] {
        assert_eq!(r.field(k).and_then(|f| f.as_f64()), Some(v), "{k}");
    }
    assert!(r.field("topic").is_none());
    let d = dead.expect("dead letter");
    assert!(
        d.meta
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("`topic_path` \"topic\" is not in the body"),
        "{:?}",
        d.meta.error
    );
    assert_eq!(
        d.payload.as_deref(),
        Some(&br#"{"payload":{"temp":1}}"#[..])
    );
    run.deleted(2).await;
    run.stop().await;
    assert_empty(&client, &url).await;
}

/// One undecodable body among good ones: each message is deleted or left by its own outcome,
/// so with `on_rejected = "leave"` only the bad one stays for the redrive policy. (Before,
/// one status covered a whole ReceiveMessage answer: the good neighbours were left too and
/// would have been written again, then moved to the DLQ although delivered.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_message_does_not_keep_its_neighbours_on_the_queue() {
    let (client, url) = queue("per-message").await;
    let mut bodies: Vec<String> = (0..4).map(|n| format!("{{\"n\":{n}}}")).collect();
    bodies.insert(2, "{not json".to_string());
    // One SendMessageBatch: moto hands the five out in one ReceiveMessage answer.
    send(&client, &url, &bodies).await;
    let mut run = start(&url, 1, |c| {
        c.visibility_timeout = HumanDuration(Duration::from_secs(2))
    })
    .await;
    let (mut good, mut dead) = (BTreeSet::new(), 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while good.len() < 4 || dead == 0 {
        assert!(Instant::now() < deadline, "good {good:?}, dead {dead}");
        tokio::select! {
            Some(mut b) = run.input.recv() => {
                good.extend(numbers(&b));
                b.finalize(BatchStatus::Delivered);
            }
            Some(mut b) = run.dead.recv() => {
                dead += b.len();
                b.finalize(BatchStatus::Delivered); // the decoder marked it Rejected
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    assert_eq!(good, (0..4).collect::<BTreeSet<_>>());
    run.deleted(4).await;
    // The bad one is left (redrive policy's job): never deleted, even when received again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(run.counter("deleted"), 4, "only the delivered messages");
    run.stop().await;
    assert_eq!(depth(&client, &url).await, 1, "the rejected message stays");
    let left = client
        .receive_message()
        .queue_url(&url)
        .max_number_of_messages(10)
        .wait_time_seconds(5)
        .send()
        .await
        .expect("ReceiveMessage")
        .messages
        .unwrap_or_default();
    let left: Vec<&str> = left.iter().filter_map(|m| m.body.as_deref()).collect();
    assert_eq!(left, vec!["{not json"]);
}

/// Issue 13, item 6: a poison message (its sink fails it every time) is received once plus
/// `max_redeliveries` times, then dead-lettered with the reason and the count and deleted
/// (with the default `on_rejected = "leave"` too); the messages around it are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_message_is_dead_lettered_after_max_redeliveries() {
    let (client, url) = queue("poison").await;
    let bodies: Vec<String> = (0..6).map(|n| format!("{{\"n\":{n}}}")).collect();
    send(&client, &url, &bodies).await;
    // Retries back off (n-1)² s after n receives: 0 + 1 + 4 s with max_redeliveries = 2.
    let mut run = start(&url, 1, |c| c.max_redeliveries = 2).await;
    let (mut delivered, mut attempts, mut dead) = (BTreeSet::new(), 0, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    while dead.is_empty() || delivered.len() < 5 {
        assert!(
            Instant::now() < deadline,
            "poison received {attempts} times, dead-lettered {}, {} of 5 delivered",
            dead.len(),
            delivered.len()
        );
        tokio::select! {
            b = run.input.recv() => {
                let mut b = b.expect("output open");
                for r in &mut b.records {
                    let n = r.field("n").and_then(|v| v.as_f64()).expect("field n") as i64;
                    if n == 0 {
                        attempts += 1;
                        r.finalize(BatchStatus::Errored);
                    } else {
                        delivered.insert(n);
                        r.finalize(BatchStatus::Delivered);
                    }
                }
            }
            d = run.dead.recv() => {
                let mut d = d.expect("dead_letter open");
                d.finalize(BatchStatus::Delivered);
                dead.extend(d.records);
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    assert_eq!(attempts, 3, "received once + max_redeliveries (2) times");
    assert_eq!(dead.len(), 1);
    let error = dead[0].meta.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("failed 3 times") && error.contains("max_redeliveries = 2"),
        "reason and count in the error: {error}"
    );
    assert_eq!(dead[0].payload.as_deref(), Some(&b"{\"n\":0}"[..]));
    assert_eq!(delivered, (1..6).collect::<BTreeSet<i64>>());
    assert_eq!(run.counter("poisoned"), 1);
    run.deleted(6).await;
    run.stop().await;
    assert_empty(&client, &url).await;
}
