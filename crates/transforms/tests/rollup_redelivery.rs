//! Issue 13, item 2, through the real topology: the rollup sink gives up (Errored) on the
//! rollups of a window right when it closes. The window must not be lost: the rollup is emitted
//! again with the same values, and the source's inputs are acknowledged only once a copy is
//! delivered.
//!
//! The acknowledging source and the failing sink are test components registered like any
//! plugin: the source redelivers a batch that comes back Errored (as MQTT, SQS and Kafka do),
//! the sink fails the first batch holding a closed window's rollups and delivers the rest.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use sluice_core::ack::{self, BatchStatus, Finalizers};
use sluice_core::config::parse_str;
use sluice_core::metrics::Metrics;
use sluice_core::record::{Batch, Record, Value};
use sluice_core::registry::{BuildContext, Registry, SinkConfig, SourceConfig};
use sluice_core::sink::{BatchConfig, Sink, SinkContext, SinkInput};
use sluice_core::source::{Source, SourceContext};
use sluice_core::topology;
use sluice_core::BoxError;

/// 2024-01-01T00:00:00Z, in ns: event times well in the past of the wall clock.
const BASE: i64 = 1_704_067_200_000_000_000;
const S: i64 = 1_000_000_000;

/// What happened, in order, across the source and the sink.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    /// The source sent the window's inputs (attempt n).
    Sent(u32),
    /// The source learnt the inputs' final status.
    Acked(u32, BatchStatus),
    /// The sink gave up on a batch holding these rollups (device, window start s).
    SinkFailed(Vec<(String, i64)>),
    /// The sink durably wrote this rollup: device, window start (s), count, mean, partial.
    Written(String, i64, i64, f64, bool),
}

static LOG: Mutex<Vec<Event>> = Mutex::new(Vec::new());

fn log(e: Event) {
    LOG.lock().unwrap_or_else(|p| p.into_inner()).push(e);
}

fn reading(secs: i64, device: &str, temp: f64) -> Record {
    let mut r = Record::new(BASE + secs * S);
    r.set_tag("device_id", device);
    r.set_field("temp", Value::F64(temp));
    r
}

/// Window [0, 60 s) of two devices, then one reading at 75 s that closes it.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ScriptedConfig {}

struct Scripted;

#[async_trait]
impl SourceConfig for ScriptedConfig {
    async fn build(&self, _cx: &BuildContext) -> Result<Box<dyn Source>, BoxError> {
        Ok(Box::new(Scripted))
    }
    fn acknowledges(&self) -> bool {
        true
    }
}

fn with_finalizer(records: Vec<Record>) -> (Batch, ack::StatusReceiver) {
    let (fin, status) = ack::batch();
    let records = records
        .into_iter()
        .map(|mut r| {
            r.finalizers = Finalizers::one(fin.clone());
            r
        })
        .collect();
    fin.finish(BatchStatus::Delivered); // the source's own handle
    (Batch::new(records), status)
}

#[async_trait]
impl Source for Scripted {
    fn can_acknowledge(&self) -> bool {
        true
    }

    async fn run(self: Box<Self>, cx: SourceContext) -> Result<(), BoxError> {
        let window = || {
            vec![
                reading(1, "d1", 10.0),
                reading(20, "d1", 20.0),
                reading(40, "d1", 60.0),
                reading(30, "d2", 5.0),
            ]
        };
        let mut closer_status = None;
        // Like a real acknowledging source: an Errored batch is delivered again (3 tries).
        for attempt in 1..=3 {
            let (batch, status) = with_finalizer(window());
            log(Event::Sent(attempt));
            cx.out.send(batch).await?;
            if closer_status.is_none() {
                let (closer, status) = with_finalizer(vec![reading(75, "d1", 0.0)]);
                cx.out.send(closer).await?;
                closer_status = Some(status);
            }
            let status = tokio::time::timeout(Duration::from_secs(60), status)
                .await
                .map_err(|_| "the window's inputs were not resolved within 60 s")?;
            log(Event::Acked(attempt, status));
            if status.is_ackable() {
                break;
            }
        }
        // End of input: downstream drains and flushes; keep serving acknowledgements.
        drop(cx.out);
        if let Some(status) = closer_status {
            tokio::time::timeout(Duration::from_secs(60), status)
                .await
                .map_err(|_| "the closing reading was not resolved within 60 s")?;
        }
        Ok(())
    }
}

/// Fails the first batch that holds a closed (non-partial) window's rollup, writes the rest.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct FailOnceConfig {}

struct FailOnce;

#[async_trait]
impl SinkConfig for FailOnceConfig {
    async fn build(&self, _cx: &BuildContext) -> Result<Box<dyn Sink>, BoxError> {
        Ok(Box::new(FailOnce))
    }
    fn can_reject(&self) -> bool {
        false
    }
}

fn int(r: &Record, name: &str) -> i64 {
    match r.field(name) {
        Some(Value::I64(v)) => *v,
        _ => i64::MIN,
    }
}

fn describe(r: &Record) -> (String, i64, i64, f64, bool) {
    (
        r.tag("device_id").unwrap_or("?").to_string(),
        int(r, "window_start").saturating_sub(BASE) / S,
        int(r, "temp_count"),
        r.field("temp_mean")
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN),
        r.field("partial") == Some(&Value::Bool(true)),
    )
}

#[async_trait]
impl Sink for FailOnce {
    async fn run(self: Box<Self>, mut input: SinkInput, _cx: SinkContext) -> Result<(), BoxError> {
        let config = BatchConfig {
            max_age: sluice_core::config::HumanDuration(Duration::from_millis(50)),
            ..BatchConfig::default()
        };
        let mut failed = false;
        while let Some(mut batch) = input.next_batch(&config).await {
            let rollups: Vec<_> = batch.records.iter().map(describe).collect();
            if !failed && rollups.iter().any(|r| !r.4) {
                failed = true;
                log(Event::SinkFailed(
                    rollups.iter().map(|r| (r.0.clone(), r.1)).collect(),
                ));
                batch.finalize(BatchStatus::Errored);
                continue;
            }
            for (device, start, count, mean, partial) in rollups {
                log(Event::Written(device, start, count, mean, partial));
            }
            batch.finalize(BatchStatus::Delivered);
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollup_the_sink_gave_up_on_is_emitted_again_before_its_inputs_are_acknowledged() {
    let mut registry = Registry::new();
    sluice_transforms::register(&mut registry);
    registry
        .source::<ScriptedConfig>("scripted")
        .sink::<FailOnceConfig>("fail_once");
    let config = parse_str(
        r#"
        [sources.devices]
        type = "scripted"

        [transforms.rollup]
        type = "aggregate"
        inputs = ["devices"]
        window = "1m"
        group_by = ["device_id"]
        allowed_lateness = "10s"
        idle_timeout = "2s"
        fields = { temp = ["count", "mean"] }

        [sinks.rollups]
        type = "fail_once"
        inputs = ["rollup"]
        "#,
        Path::new("rollup_redelivery.toml"),
    )
    .expect("valid pipeline");
    tokio::time::timeout(
        Duration::from_secs(120),
        topology::run(config, &registry, &Metrics::new(), None),
    )
    .await
    .expect("the pipeline ends within 120 s")
    .expect("the pipeline runs");

    let events = LOG.lock().unwrap_or_else(|p| p.into_inner()).clone();
    println!("{events:#?}");
    let failed = events
        .iter()
        .position(|e| matches!(e, Event::SinkFailed(_)))
        .expect("the sink gave up on the closed window's rollups");
    assert_eq!(
        events[failed],
        Event::SinkFailed(vec![("d1".into(), 0), ("d2".into(), 0)])
    );
    // The window is not lost: each device's rollup of [0, 60 s) is written, with its values.
    let written_window = |device: &str| {
        events
            .iter()
            .position(|e| matches!(e, Event::Written(d, 0, ..) if d == device))
            .unwrap_or_else(|| {
                panic!("window [0, 60 s) of {device} was never written: {events:#?}")
            })
    };
    let (d1, d2) = (written_window("d1"), written_window("d2"));
    assert_eq!(events[d1], Event::Written("d1".into(), 0, 3, 30.0, false));
    assert_eq!(events[d2], Event::Written("d2".into(), 0, 1, 5.0, false));
    assert!(d1 > failed && d2 > failed);
    let copies = events
        .iter()
        .filter(|e| matches!(e, Event::Written(_, 0, ..)))
        .count();
    assert_eq!(copies, 2, "one delivered copy per device: {events:#?}");
    // The inputs are acknowledged once, as Delivered, after both rollups were written; they
    // were never given up on, so the source did not need to redeliver them.
    let acks: Vec<(usize, &Event)> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e, Event::Acked(..)))
        .collect();
    assert_eq!(
        acks.iter().map(|(_, e)| (*e).clone()).collect::<Vec<_>>(),
        vec![Event::Acked(1, BatchStatus::Delivered)],
        "{events:#?}"
    );
    assert!(
        acks[0].0 > d1.max(d2),
        "acknowledged only after the rollups were written: {events:#?}"
    );
    // The closing reading's own window was flushed at the end.
    assert!(events.contains(&Event::Written("d1".into(), 60, 1, 0.0, true)));
}
