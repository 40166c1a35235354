//! Throughput of the stateful transforms, in records/s on one core:
//!
//! * `aggregate`: 10k groups, 1-minute tumbling windows, mean/max/count/p99 of one field;
//! * `anomaly`: ewma + zscore over 10k series.
//!
//! Each iteration feeds 300k prebuilt records (10k devices × 30 readings, 4 s apart, so windows
//! close during the run and the rest are flushed) in batches of 256 to a fresh stage. Building
//! the records is not measured.
//!
//! `cargo bench -p sluice-benches --bench transforms`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use indexmap::IndexMap;
use sluice_core::config::HumanDuration;
use sluice_core::record::{Batch, Record, Value};
use sluice_core::registry::BuildContext;
use sluice_core::transform::{Transform, TransformOutput};
use sluice_transforms::aggregate::{AggFn, AggregateConfig, Aggregator, WatermarkMode, WhenFull};
use sluice_transforms::anomaly::{AnomalyConfig, Detector, DetectorConfig};

const DEVICES: usize = 10_000;
const ROUNDS: usize = 30;
const BATCH: usize = 256;

fn records() -> Vec<Record> {
    let ids: Vec<String> = (0..DEVICES).map(|i| format!("dev-{i:05}")).collect();
    let mut out = Vec::with_capacity(DEVICES * ROUNDS);
    for round in 0..ROUNDS {
        for (d, id) in ids.iter().enumerate() {
            let mut r = Record::new(1_700_000_000_000_000_000 + round as i64 * 4_000_000_000);
            r.set_tag("device_id", id.as_str());
            let wiggle = ((round * 31 + d * 17) % 100) as f64 / 100.0;
            r.set_field("temp", Value::F64(20.0 + (d % 10) as f64 + wiggle));
            r.set_field("humidity", Value::F64(40.0 + wiggle));
            out.push(r);
        }
    }
    out
}

fn batches(records: &[Record]) -> Vec<Batch> {
    records
        .chunks(BATCH)
        .map(|c| Batch::new(c.to_vec()))
        .collect()
}

fn cx() -> BuildContext {
    BuildContext {
        name: "bench".into(),
        pipeline_id: "bench".into(),
        state_dir: None,
    }
}

fn run(stage: &mut dyn Transform, input: Vec<Batch>) -> usize {
    let mut out = TransformOutput::default();
    let mut emitted = 0;
    for b in input {
        stage.process(b, &mut out);
        emitted += out.take().iter().map(|(_, v)| v.len()).sum::<usize>();
    }
    stage.flush(&mut out);
    emitted + out.take().iter().map(|(_, v)| v.len()).sum::<usize>()
}

fn bench(c: &mut Criterion) {
    let input = records();
    let mut group = c.benchmark_group("transforms");
    group.throughput(Throughput::Elements(input.len() as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(15));

    let mut fields = IndexMap::new();
    fields.insert(
        "temp".to_string(),
        vec![AggFn::Mean, AggFn::Max, AggFn::Count, AggFn::P99],
    );
    let agg_config = AggregateConfig {
        window: Some(HumanDuration(Duration::from_secs(60))),
        hop: None,
        gap: None,
        group_by: vec!["device_id".into()],
        fields,
        allowed_lateness: HumanDuration(Duration::from_secs(10)),
        idle_timeout: HumanDuration(Duration::from_secs(10)),
        max_groups: 100_000,
        when_full: WhenFull::FlushOldest,
        watermark: WatermarkMode::Global,
        // The bench's event times are in 2023: far from the future limit.
        max_future_skew: HumanDuration(Duration::from_secs(300)),
        max_pending_rollups: 200_000,
    };
    group.bench_function("aggregate_10k_groups_1m_4fns", |b| {
        b.iter_batched(
            || {
                (
                    Aggregator::new(&agg_config, &cx()).expect("valid config"),
                    batches(&input),
                )
            },
            |(mut stage, input)| run(&mut stage, input),
            BatchSize::PerIteration,
        )
    });

    let anomaly_config = AnomalyConfig {
        group_by: Some(vec!["device_id".into()]),
        detectors: vec![
            DetectorConfig::Ewma {
                alpha: 0.1,
                alpha_variance: None,
                k: 4.0,
            },
            DetectorConfig::Zscore {
                window: 60,
                threshold: 4.0,
            },
        ],
        warmup: 10,
        ..AnomalyConfig::for_fields(&["temp"])
    };
    // The default ensemble (`detectors` omitted): the figure the README quotes.
    let ensemble_config = AnomalyConfig {
        warmup: 10,
        ..AnomalyConfig::for_fields(&["temp"])
    };
    for (name, config) in [
        ("anomaly_ewma_zscore_10k_series", &anomaly_config),
        ("anomaly_default_ensemble_10k_series", &ensemble_config),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    (
                        Detector::new(config, &cx()).expect("valid config"),
                        batches(&input),
                    )
                },
                |(mut stage, input)| run(&mut stage, input),
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
