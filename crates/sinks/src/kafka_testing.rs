//! Helpers for the Kafka integration tests of the source, the sink and the CLI: check that
//! the broker is up, create topics, produce and read back with a plain librdkafka client, read
//! a group's committed offsets. Test support only; panics with a message naming the fix.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;

pub use sluice_mqtt::testing::unique;

/// The broker started by `scripts/services.sh start` (tansu).
pub const BOOTSTRAP: &str = "127.0.0.1:9092";

/// Panics (never skips) when no Kafka-compatible broker listens on 127.0.0.1:9092.
pub fn require_kafka() {
    if TcpStream::connect_timeout(
        &"127.0.0.1:9092".parse().expect("address"),
        Duration::from_secs(2),
    )
    .is_err()
    {
        panic!(
            "no Kafka broker on 127.0.0.1:9092: run `scripts/services.sh start tansu` before \
             the Kafka integration tests"
        );
    }
}

/// Creates `topic` with `partitions` partitions (replication 1).
pub async fn create_topic(topic: &str, partitions: i32) {
    require_kafka();
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", BOOTSTRAP)
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create_topics request");
    for r in results {
        if let Err((t, e)) = r {
            panic!("creating topic {t}: {e}");
        }
    }
}

/// Produces `messages` (key, payload) to `topic` and waits for every delivery report.
///
/// One message per record batch: tansu 0.6's memory engine answers a fetch that starts
/// *inside* a record batch with nothing (measured: 100 messages in one batch, a fetch from
/// offset 20 returns 0 messages; Kafka returns the batch and the client skips to 20). Tests
/// that resume from a committed offset or seek back would then stall on the broker, not on
/// Sluice; with one message per batch every offset is a batch start.
pub async fn produce(topic: &str, messages: Vec<(Option<String>, Vec<u8>)>) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", BOOTSTRAP)
        .set("linger.ms", "0")
        .set("batch.num.messages", "1")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let mut pending = Vec::with_capacity(messages.len());
    for (key, payload) in &messages {
        let mut rec = FutureRecord::to(topic).payload(payload.as_slice());
        if let Some(k) = key {
            rec = rec.key(k.as_str());
        }
        match producer.send_result(rec) {
            Ok(f) => pending.push(f),
            Err((e, _)) => panic!("produce to {topic}: {e}"),
        }
    }
    for f in pending {
        match f.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => panic!("delivery to {topic} failed: {e}"),
            Err(_) => panic!("producer dropped a delivery"),
        }
    }
}

/// One message read back.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

/// Reads `topic` from the beginning with a fresh group until `n` messages arrived or
/// nothing came for `idle`.
pub async fn consume(topic: &str, n: usize, idle: Duration) -> Vec<Consumed> {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", BOOTSTRAP)
            .set("group.id", unique("reader"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "6000")
            .set("fetch.queue.backoff.ms", "10")
            .create()
            .expect("consumer");
        consumer.subscribe(&[&topic]).expect("subscribe");
        let mut out = Vec::with_capacity(n);
        let mut last = Instant::now();
        // Joining the group takes a few seconds: the idle clock starts at the first message.
        let join_deadline = Instant::now() + Duration::from_secs(30);
        while out.len() < n {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    last = Instant::now();
                    out.push(Consumed {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                        headers: m
                            .headers()
                            .map(|hs| {
                                hs.iter()
                                    .map(|h| {
                                        (
                                            h.key.to_string(),
                                            String::from_utf8_lossy(h.value.unwrap_or_default())
                                                .into_owned(),
                                        )
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                        payload: m.payload().unwrap_or_default().to_vec(),
                    });
                }
                Some(Err(e)) => panic!("consuming {topic}: {e}"),
                None => {
                    let started = !out.is_empty() || Instant::now() > join_deadline;
                    if started && last.elapsed() > idle {
                        break;
                    }
                }
            }
        }
        out
    })
    .await
    .expect("consumer thread")
}

/// The offsets `group` committed for partitions `0..partitions` of `topic` (`None`: nothing
/// committed).
pub async fn committed(group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
    let (group, topic) = (group.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", BOOTSTRAP)
            .set("group.id", &group)
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&topic, p);
        }
        let got = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        (0..partitions)
            .map(
                |p| match got.find_partition(&topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => Some(o),
                    _ => None,
                },
            )
            .collect()
    })
    .await
    .expect("offset reader thread")
}
