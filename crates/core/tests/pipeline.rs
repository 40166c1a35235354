//! Pipeline-level behaviour of the runtime, with in-test components (no external systems):
//! backpressure from a blocked sink, and end-to-end acknowledgements across fan-out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::ack::{self, BatchStatus, Finalizers};
use sluice_core::config::parse_str;
use sluice_core::metrics::Metrics;
use sluice_core::record::{Batch, Record};
use sluice_core::registry::{BuildContext, Registry, SinkConfig, SourceConfig};
use sluice_core::sink::{Sink, SinkContext, SinkInput};
use sluice_core::source::{Source, SourceContext};
use sluice_core::topology;
use sluice_core::BoxError;
use tokio::sync::Semaphore;

/// Shared observations between the test and its components.
#[derive(Default)]
struct Probe {
    produced: AtomicU64,
    statuses: Mutex<Vec<(i64, BatchStatus)>>,
    gate: Option<Arc<Semaphore>>,
    /// (sink, record time, record error) of every record a sink delivered.
    received: Mutex<Vec<(String, i64, Option<String>)>>,
}

static PROBE: Mutex<Option<Arc<Probe>>> = Mutex::new(None);

fn probe() -> Arc<Probe> {
    PROBE
        .lock()
        .expect("probe lock")
        .clone()
        .expect("probe installed")
}

/// Emits `batches` batches of `size` records, each batch with its own finalizer, and records
/// the final status of each.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct CountingSource {
    batches: i64,
    size: usize,
    /// Keep running after the last batch until the pipeline is shut down.
    #[serde(default)]
    hold_open: bool,
}

struct CountingRun {
    batches: i64,
    size: usize,
    hold_open: bool,
}

#[async_trait]
impl SourceConfig for CountingSource {
    async fn build(&self, _cx: &BuildContext) -> Result<Box<dyn Source>, BoxError> {
        Ok(Box::new(CountingRun {
            batches: self.batches,
            size: self.size,
            hold_open: self.hold_open,
        }))
    }
}

#[async_trait]
impl Source for CountingRun {
    fn can_acknowledge(&self) -> bool {
        true
    }

    async fn run(self: Box<Self>, cx: SourceContext) -> Result<(), BoxError> {
        let probe = probe();
        let mut pending = Vec::new();
        for b in 0..self.batches {
            if cx.shutdown.is_cancelled() {
                break;
            }
            let (f, status) = ack::batch();
            let records = (0..self.size)
                .map(|_| {
                    let mut r = Record::new(b);
                    r.finalizers = Finalizers::one(f.clone());
                    r
                })
                .collect();
            f.finish(BatchStatus::Delivered);
            cx.out.send(Batch::new(records)).await?;
            probe.produced.fetch_add(self.size as u64, Ordering::SeqCst);
            pending.push((b, status));
        }
        if self.hold_open {
            cx.shutdown.cancelled().await;
        }
        drop(cx.out); // let downstream drain, then collect the acknowledgements
        for (b, status) in pending {
            let s = status.await;
            probe.statuses.lock().expect("lock").push((b, s));
        }
        Ok(())
    }
}

/// Marks batch numbers listed in `fail` as Errored, everything else Delivered; waits on the
/// probe's gate (if any) before each batch.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct TestSink {
    #[serde(default)]
    fail: Vec<i64>,
    #[serde(default)]
    gated: bool,
}

struct TestSinkRun {
    fail: Vec<i64>,
    gated: bool,
}

#[async_trait]
impl SinkConfig for TestSink {
    async fn build(&self, _cx: &BuildContext) -> Result<Box<dyn Sink>, BoxError> {
        Ok(Box::new(TestSinkRun {
            fail: self.fail.clone(),
            gated: self.gated,
        }))
    }
}

#[async_trait]
impl Sink for TestSinkRun {
    async fn run(self: Box<Self>, mut input: SinkInput, cx: SinkContext) -> Result<(), BoxError> {
        let probe = probe();
        let gate = probe.gate.clone();
        while let Some(batch) = input.recv().await {
            if let (true, Some(g)) = (self.gated, &gate) {
                g.acquire().await?.forget();
            }
            for mut r in batch.records {
                let status = if self.fail.contains(&r.time) {
                    BatchStatus::Errored
                } else {
                    let error = r.meta.error.as_deref().map(str::to_string);
                    let mut received = probe.received.lock().expect("lock");
                    received.push((cx.name.clone(), r.time, error));
                    BatchStatus::Delivered
                };
                r.finalize(status);
            }
        }
        Ok(())
    }
}

fn registry() -> Registry {
    let mut r = Registry::new();
    r.source::<CountingSource>("counting")
        .sink::<TestSink>("test");
    r
}

// Both scenarios share the global probe, so they run one after the other in one test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_and_fan_out_acknowledgements() {
    blocked_sink_stops_the_source().await;
    fan_out_acks_after_every_sink().await;
    a_disk_buffer_dead_letters_a_poison_record().await;
}

async fn blocked_sink_stops_the_source() {
    let gate = Arc::new(Semaphore::new(0));
    *PROBE.lock().expect("lock") = Some(Arc::new(Probe {
        gate: Some(gate.clone()),
        ..Probe::default()
    }));
    let text = r#"
[sources.src]
type = "counting"
batches = 1000
size = 100

[sinks.slow]
type = "test"
inputs = ["src"]
gated = true
buffer = { max_batches = 4 }
"#;
    let config = parse_str(text, std::path::Path::new("bp.toml")).expect("config");
    let metrics = Metrics::new();
    let run = tokio::spawn({
        let metrics = metrics.clone();
        async move { topology::run(config, &registry(), &metrics, None).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let p = probe();
    let stalled = p.produced.load(Ordering::SeqCst);
    // The sink holds 0 batches, its buffer 4, plus one send waiting: the source must stop.
    assert!(
        stalled <= 6 * 100,
        "source kept producing into a blocked sink: {stalled} records"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        p.produced.load(Ordering::SeqCst),
        stalled,
        "no progress while blocked"
    );
    gate.add_permits(1_000_000);
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("finishes after release")
        .expect("join")
        .expect("pipeline ok");
    assert_eq!(p.produced.load(Ordering::SeqCst), 100_000);
    let statuses = p.statuses.lock().expect("lock");
    assert_eq!(statuses.len(), 1000);
    assert!(statuses.iter().all(|(_, s)| *s == BatchStatus::Delivered));
}

async fn fan_out_acks_after_every_sink() {
    *PROBE.lock().expect("lock") = Some(Arc::new(Probe::default()));
    let text = r#"
[sources.src]
type = "counting"
batches = 10
size = 3

[sinks.a]
type = "test"
inputs = ["src"]

[sinks.b]
type = "test"
inputs = ["src"]
fail = [4, 7]
"#;
    let config = parse_str(text, std::path::Path::new("fan.toml")).expect("config");
    topology::run(config, &registry(), &Metrics::new(), None)
        .await
        .expect("pipeline ok");
    let mut statuses = probe().statuses.lock().expect("lock").clone();
    statuses.sort();
    let errored: Vec<i64> = statuses
        .iter()
        .filter(|(_, s)| *s == BatchStatus::Errored)
        .map(|(b, _)| *b)
        .collect();
    assert_eq!(statuses.len(), 10, "each batch resolves exactly once");
    assert_eq!(errored, vec![4, 7], "one sink erroring blocks the ack");
}

/// A sink behind a disk buffer fails every record of batch 7, always. The buffer finds them
/// (splitting the read batches that hold them) and, after `max_replays` failures, sends them to
/// the sink's `dead_letter` output (wired by the topology); everything else is delivered and
/// the pipeline finishes instead of replaying batch 7 forever.
async fn a_disk_buffer_dead_letters_a_poison_record() {
    *PROBE.lock().expect("lock") = Some(Arc::new(Probe::default()));
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        r#"
[pipeline]
data_dir = "{}"

[sources.src]
type = "counting"
batches = 30
size = 3
hold_open = true

[sinks.store]
type = "test"
inputs = ["src"]
fail = [7]
buffer = {{ type = "disk", max_replays = 2 }}

[sinks.dead]
type = "test"
inputs = ["store.dead_letter"]
"#,
        dir.path().display()
    );
    let config = parse_str(&text, std::path::Path::new("poison.toml")).expect("config");
    let plan = topology::plan(config, &registry()).expect("plan");
    let running = plan.start(&Metrics::new()).await.expect("starts");
    let dead_letters = || {
        let received = probe().received.lock().expect("lock").clone();
        received.iter().filter(|(sink, ..)| sink == "dead").count()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while dead_letters() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "batch 7 was not dead-lettered within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.shutdown_token().cancel();
    running.wait().await.expect("pipeline ok");
    let received = probe().received.lock().expect("lock").clone();
    let stored: std::collections::BTreeSet<i64> = received
        .iter()
        .filter(|(sink, ..)| sink == "store")
        .map(|(_, t, _)| *t)
        .collect();
    assert_eq!(stored, (0..30).filter(|b| *b != 7).collect());
    let dead: Vec<_> = received
        .iter()
        .filter(|(sink, ..)| sink == "dead")
        .collect();
    assert_eq!(dead.len(), 3, "the three records of batch 7: {dead:?}");
    for (_, t, error) in dead {
        assert_eq!(*t, 7);
        let error = error.as_deref().unwrap_or("");
        assert!(error.contains("max_replays = 2"), "{error}");
    }
}
