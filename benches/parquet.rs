//! Throughput of the parquet sink's encoder and of the sink end to end, in records/s.
//!
//! * `parquet_encode/*`: records with 3 tags and 10 fields → Arrow columns → Parquet (zstd,
//!   snappy, none) in memory, one core. `arrow_only` is the column building alone.
//! * `parquet_e2e/simulator_to_local_parquet`: the simulator (unlimited rate) → parquet sink on
//!   a local temporary directory (zstd, `max_file_size = "128MiB"`), the whole runtime in
//!   between. The process's peak RSS is printed after it (`VmHWM`).
//!
//! Run: cargo bench -p sluice-benches --bench parquet

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice_core::record::{intern, Record, Value};
use sluice_sinks::parquet::{
    arrow_schema, evolve, to_record_batch, Compression, EncodeOptions, Schema, Writer,
};

const RECORDS: usize = 100_000;
const BATCH: usize = 10_000;

/// 100 devices × 3 tags, 10 fields: 7 floats, 2 integers, 1 short string.
fn records() -> Vec<Record> {
    let tags = [intern("device_id"), intern("site"), intern("model")];
    let fields: Vec<_> = [
        "temp", "humidity", "voltage", "current", "pressure", "rssi_f", "battery", "seq", "uptime",
        "status",
    ]
    .iter()
    .map(|n| intern(n))
    .collect();
    let devices: Vec<Arc<str>> = (0..100).map(|i| Arc::from(format!("dev-{i:04}"))).collect();
    let sites: Vec<Arc<str>> = (0..5).map(|i| Arc::from(format!("site-{i}"))).collect();
    let models: Vec<Arc<str>> = ["t100", "t200"].iter().map(|m| Arc::from(*m)).collect();
    let status: Arc<str> = Arc::from("online");
    (0..RECORDS)
        .map(|i| {
            let d = i % 100;
            let x = i as f64;
            let mut r = Record::new(1_772_323_200_000_000_000 + (i as i64 / 100) * 1_000_000_000);
            r.tags.push((tags[0].clone(), devices[d].clone()));
            r.tags.push((tags[1].clone(), sites[d % 5].clone()));
            r.tags.push((tags[2].clone(), models[d % 2].clone()));
            let values = [
                Value::F64(20.0 + (x * 0.37).sin() * 3.0),
                Value::F64(40.0 + (x * 0.11).cos() * 5.0),
                Value::F64(3.3 + (x * 0.01).sin() * 0.05),
                Value::F64(0.5 + (x * 0.7).sin() * 0.1),
                Value::F64(1013.0 + (x * 0.003).cos()),
                Value::F64(-60.0 + (x * 0.9).sin() * 8.0),
                Value::F64(100.0 - (x / RECORDS as f64) * 20.0),
                Value::I64(i as i64 / 100),
                Value::I64(3600 + i as i64 / 100),
                Value::Str(status.clone()),
            ];
            for (n, v) in fields.iter().zip(values) {
                r.fields.push((n.clone(), v));
            }
            r
        })
        .collect()
}

fn encode(c: &mut Criterion) {
    let records = records();
    let schema = evolve(&Schema::new(), &records, false).unwrap_or_default();
    let mut group = c.benchmark_group("parquet_encode");
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.sample_size(20);
    let options = EncodeOptions::default();
    let arrow = arrow_schema(&schema, &options);
    group.bench_function("arrow_only", |b| {
        b.iter(|| {
            for chunk in records.chunks(BATCH) {
                let batch = to_record_batch(chunk, &schema, &arrow, &options).expect("batch");
                std::hint::black_box(batch);
            }
        })
    });
    for (name, compression) in [
        ("zstd", Compression::Zstd),
        ("snappy", Compression::Snappy),
        ("none", Compression::None),
    ] {
        let options = EncodeOptions {
            compression,
            ..EncodeOptions::default()
        };
        let mut size = 0;
        group.bench_with_input(BenchmarkId::new("parquet", name), &options, |b, options| {
            b.iter(|| {
                let mut w = Writer::parquet(Vec::with_capacity(8 << 20), schema.clone(), options)
                    .expect("writer");
                for chunk in records.chunks(BATCH) {
                    w.write(chunk).expect("write");
                }
                let out = w.finish().expect("finish");
                size = out.len();
                std::hint::black_box(out);
            })
        });
        eprintln!(
            "parquet {name}: {RECORDS} records → {size} bytes ({:.1} bytes/record)",
            size as f64 / RECORDS as f64
        );
    }
    group.finish();
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

const E2E_RECORDS: u64 = 1_000_000;

fn e2e(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut registry = sluice_core::registry::Registry::new();
    sluice_sources::register(&mut registry);
    sluice_sinks::register(&mut registry);
    let mut group = c.benchmark_group("parquet_e2e");
    group.throughput(Throughput::Elements(E2E_RECORDS));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    let source = format!(
        r#"
[sources.sim]
type = "simulator"
devices = 100
rate = "unlimited"
count = {E2E_RECORDS}
start_time = "2026-03-01T00:00:00Z"
batch_size = 1024
"#
    );
    // The same source into a blackhole: what the runtime and the simulator cost without the sink.
    group.bench_function("simulator_to_blackhole", |b| {
        b.iter(|| {
            let toml =
                format!("{source}\n[sinks.null]\ntype = \"blackhole\"\ninputs = [\"sim\"]\n");
            let config =
                sluice_core::config::parse_str(&toml, Path::new("bench.toml")).expect("config");
            runtime
                .block_on(sluice_core::topology::run(
                    config,
                    &registry,
                    &sluice_core::metrics::Metrics::new(),
                    None,
                ))
                .expect("pipeline");
        })
    });
    // Reset the peak-RSS mark so it covers only the parquet runs (Linux ≥ 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    group.bench_function("simulator_to_local_parquet", |b| {
        b.iter(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let toml = format!(
                r#"{source}
[sinks.lake]
type = "parquet"
inputs = ["sim"]
destination = "{}"
key = "date={{%Y-%m-%d}}/hour={{%H}}/"
max_file_size = "128MiB"
fsync = false
"#,
                dir.path().display()
            );
            let config =
                sluice_core::config::parse_str(&toml, Path::new("bench.toml")).expect("config");
            runtime
                .block_on(sluice_core::topology::run(
                    config,
                    &registry,
                    &sluice_core::metrics::Metrics::new(),
                    None,
                ))
                .expect("pipeline");
        })
    });
    group.finish();
    if let Some(kib) = peak_rss_kib() {
        eprintln!(
            "peak RSS during the simulator → parquet runs: {} MiB",
            kib / 1024
        );
    }
}

criterion_group!(benches, encode, e2e);
criterion_main!(benches);
