//! Throughput of a disk-buffered edge against the same edge in memory, in one run: records in
//! batches from an acknowledging producer through the buffer to a consumer that delivers them;
//! every batch's acknowledgement is awaited. Disk variants: `fsync` after each group commit
//! (the default) and without it. Reported in records/s.
//!
//! Run: cargo bench -p sluice-benches --bench disk_buffer

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice_core::channel::{buffer, BufferConfig, BufferType};
use sluice_core::disk_buffer;
use sluice_core::metrics::{ComponentMetrics, Kind};
use tokio_util::sync::CancellationToken;

const RECORDS: usize = 131_072;

#[derive(Clone, Copy)]
enum Edge {
    Memory,
    Disk { fsync: bool },
}

async fn pump(edge: Edge, batch_size: usize) {
    let metrics = Arc::new(ComponentMetrics::new("sink", Kind::Sink));
    let dir = tempfile::tempdir().expect("tempdir");
    let (edge, input) = match edge {
        Edge::Memory => buffer(BufferConfig::default(), metrics),
        Edge::Disk { fsync } => {
            let cfg = BufferConfig {
                kind: BufferType::Disk,
                fsync,
                ..BufferConfig::default()
            };
            disk_buffer::open(dir.path().join("b"), cfg, metrics, CancellationToken::new())
                .await
                .expect("open disk buffer")
        }
    };
    sluice_benches::pump(edge, input, RECORDS, batch_size).await;
}

fn disk_vs_memory(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("disk_buffer");
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.sample_size(10);
    for batch_size in [64usize, 1024] {
        for (name, edge) in [
            ("memory", Edge::Memory),
            ("disk_fsync", Edge::Disk { fsync: true }),
            ("disk_no_fsync", Edge::Disk { fsync: false }),
        ] {
            group.bench_with_input(BenchmarkId::new(name, batch_size), &edge, |b, &e| {
                b.to_async(&runtime).iter(|| pump(e, batch_size));
            });
        }
    }
    group.finish();
}

criterion_group!(benches, disk_vs_memory);
criterion_main!(benches);
