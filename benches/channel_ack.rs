//! Throughput of the runtime's hot path: records in batches through a bounded channel to a
//! consumer that acknowledges them, with one finalizer per batch awaited by the producer
//! (what an acknowledging source does). Reported in records/s for batch sizes 1, 64 and 1024.
//!
//! Run: cargo bench -p sluice-benches --bench channel_ack

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice_core::ack::{self, BatchStatus, Finalizers};
use sluice_core::channel::{buffer, BufferConfig, Output};
use sluice_core::metrics::{ComponentMetrics, Kind};
use sluice_core::record::{intern, Batch, Record, Value};

const RECORDS: usize = 65_536;

async fn pump(batch_size: usize) {
    let metrics = Arc::new(ComponentMetrics::new("sink", Kind::Sink));
    let (edge, mut input) = buffer(BufferConfig::default(), metrics);
    let out = Output::new(vec![edge]);
    let consumer = tokio::spawn(async move {
        let mut n = 0usize;
        while let Some(mut batch) = input.recv().await {
            n += batch.len();
            batch.finalize(BatchStatus::Delivered);
        }
        n
    });
    let temp = intern("temp");
    let device = intern("device_id");
    let device_value: Arc<str> = Arc::from("dev-0001");
    let mut pending = Vec::with_capacity(RECORDS / batch_size + 1);
    for start in (0..RECORDS).step_by(batch_size) {
        let (finalizer, status) = ack::batch();
        let records = (start..(start + batch_size).min(RECORDS))
            .map(|i| {
                let mut r = Record::new(i as i64);
                r.tags.push((device.clone(), device_value.clone()));
                r.fields.push((temp.clone(), Value::F64(21.5)));
                r.finalizers = Finalizers::one(finalizer.clone());
                r
            })
            .collect();
        finalizer.finish(BatchStatus::Delivered);
        out.send(Batch::new(records)).await.expect("consumer alive");
        pending.push(status);
    }
    drop(out);
    for status in pending {
        assert_eq!(status.await, BatchStatus::Delivered);
    }
    assert_eq!(consumer.await.expect("consumer"), RECORDS);
}

fn channel_ack(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("channel_ack");
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.sample_size(10);
    for batch_size in [1usize, 64, 1024] {
        group.bench_with_input(
            BenchmarkId::new("batch", batch_size),
            &batch_size,
            |b, &s| {
                b.to_async(&runtime).iter(|| pump(s));
            },
        );
    }
    group.finish();
}

criterion_group!(benches, channel_ack);
criterion_main!(benches);
