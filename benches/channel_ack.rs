//! Throughput of the runtime's hot path: records in batches through a bounded channel to a
//! consumer that acknowledges them, with one finalizer per batch awaited by the producer
//! (what an acknowledging source does). Reported in records/s for batch sizes 1, 64 and 1024.
//!
//! Run: cargo bench -p sluice-benches --bench channel_ack

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice_core::channel::{buffer, BufferConfig};
use sluice_core::metrics::{ComponentMetrics, Kind};

const RECORDS: usize = 65_536;

async fn pump(batch_size: usize) {
    let metrics = Arc::new(ComponentMetrics::new("sink", Kind::Sink));
    let (edge, input) = buffer(BufferConfig::default(), metrics);
    sluice_benches::pump(edge, input, RECORDS, batch_size).await;
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
