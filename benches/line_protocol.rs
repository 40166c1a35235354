//! Line-protocol encoding throughput (the `influxdb` sink's CPU cost per record), reported in
//! fields/s: simulator-shaped records (2 tags, 5 fields) and a worst case where every name and
//! value needs escaping. Target: ≥ 5 M fields/s per core. `line_protocol_encode` is wall
//! time; `line_protocol_encode_cpu` counts only the CPU time of the benchmark thread (from
//! /proc/thread-self/schedstat), which is the per-core figure on a machine shared with other
//! work.
//!
//! With `SLUICE_BENCH_SERVERS=1` it also measures end-to-end writes/s of the `influxdb` sink
//! into VictoriaMetrics and of the `timestream` sink into moto (both from
//! `scripts/services.sh start`): a simulator pipeline of N records, run to completion.
//!
//! Run: cargo bench -p sluice-benches --bench line_protocol

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice_core::config::parse_str;
use sluice_core::metrics::Metrics;
use sluice_core::record::{intern, Record, Value};
use sluice_core::registry::Registry;
use sluice_core::topology;
use sluice_sinks::line_protocol::{Encoder, Precision};

const RECORDS: usize = 10_000;

fn simulator_like() -> Vec<Record> {
    let (device, site) = (intern("device_id"), intern("site"));
    let names = ["temp", "humidity", "voltage", "seq", "device_status"].map(intern);
    let status: Arc<str> = Arc::from("online");
    (0..RECORDS)
        .map(|i| {
            let mut r = Record::new(1_764_000_000_000_000_000 + i as i64 * 1_000_000_000);
            r.tags
                .push((device.clone(), Arc::from(format!("dev-{:04}", i % 500))));
            r.tags.push((site.clone(), Arc::from("north-1")));
            r.fields
                .push((names[0].clone(), Value::F64(21.5 + (i % 97) as f64 * 0.013)));
            r.fields
                .push((names[1].clone(), Value::F64(40.0 + (i % 53) as f64 * 0.7)));
            r.fields
                .push((names[2].clone(), Value::F64(3.3 - (i % 11) as f64 * 0.001)));
            r.fields.push((names[3].clone(), Value::I64(i as i64)));
            r.fields
                .push((names[4].clone(), Value::Str(status.clone())));
            r
        })
        .collect()
}

fn escaping_heavy() -> Vec<Record> {
    let (device, site) = (intern("device id"), intern("site,zone"));
    let names = ["temp=c", "rel humidity", "note", "a,b", "ok"].map(intern);
    (0..RECORDS)
        .map(|i| {
            let mut r = Record::new(i as i64);
            r.tags
                .push((device.clone(), Arc::from(format!("dev {i}, rack=3"))));
            r.tags.push((site.clone(), Arc::from("north\\1 a=b")));
            r.fields
                .push((names[0].clone(), Value::F64(i as f64 * 0.5)));
            r.fields.push((names[1].clone(), Value::F64(0.1)));
            r.fields
                .push((names[2].clone(), Value::from("said \"hi\" \\ bye")));
            r.fields.push((names[3].clone(), Value::I64(-7)));
            r.fields.push((names[4].clone(), Value::Bool(true)));
            r
        })
        .collect()
}

fn encode_all(encoder: &mut Encoder, records: &[Record], buf: &mut Vec<u8>) -> usize {
    buf.clear();
    for r in records {
        encoder
            .encode("telemetry", r, buf)
            .expect("bench records are encodable");
    }
    black_box(buf.len())
}

/// CPU time of the current thread (Linux), or `None` elsewhere.
fn thread_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

fn encoding(c: &mut Criterion) {
    let inputs = [
        ("simulator_like", simulator_like()),
        ("escaping_heavy", escaping_heavy()),
    ];
    let mut group = c.benchmark_group("line_protocol_encode");
    for (name, records) in &inputs {
        let fields: usize = records.iter().map(|r| r.fields.len()).sum();
        group.throughput(Throughput::Elements(fields as u64));
        let mut encoder = Encoder::new(Precision::Ns);
        let mut buf = Vec::with_capacity(RECORDS * 160);
        group.bench_with_input(BenchmarkId::from_parameter(name), records, |b, records| {
            b.iter(|| encode_all(&mut encoder, records, &mut buf))
        });
    }
    group.finish();
    if thread_cpu_time().is_none() {
        return;
    }
    let mut group = c.benchmark_group("line_protocol_encode_cpu");
    for (name, records) in &inputs {
        let fields: usize = records.iter().map(|r| r.fields.len()).sum();
        group.throughput(Throughput::Elements(fields as u64));
        let mut encoder = Encoder::new(Precision::Ns);
        let mut buf = Vec::with_capacity(RECORDS * 160);
        group.bench_with_input(BenchmarkId::from_parameter(name), records, |b, records| {
            b.iter_custom(|iters| {
                let start = thread_cpu_time().unwrap_or_default();
                for _ in 0..iters {
                    encode_all(&mut encoder, records, &mut buf);
                }
                thread_cpu_time().unwrap_or_default().saturating_sub(start)
            })
        });
    }
    group.finish();
}

fn registry() -> Registry {
    let mut registry = Registry::new();
    sluice_sources::register(&mut registry);
    sluice_sinks::register(&mut registry);
    registry
}

async fn run(toml: &str) {
    let config = parse_str(toml, Path::new("bench.toml")).unwrap_or_else(|e| {
        panic!(
            "bench pipeline: {}",
            e.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    topology::run(config, &registry(), &Metrics::new(), None)
        .await
        .unwrap_or_else(|e| panic!("{e} (are the servers up? `scripts/services.sh start`)"));
}

fn sink_section(sink: &str, run_id: u64) -> String {
    match sink {
        "influxdb_victoriametrics" => format!(
            "type = \"influxdb\"\nurl = \"http://127.0.0.1:8428\"\norg = \"bench\"\nbucket = \"bench\"\nmeasurement = \"bench_{run_id}\""
        ),
        _ => format!(
            "type = \"timestream\"\nendpoint_url = \"http://127.0.0.1:5000\"\nregion = \"us-east-1\"\ndatabase = \"bench_{run_id}\"\ntable = \"t\"\ncreate_if_missing = true\nin_flight = 8"
        ),
    }
}

fn end_to_end(c: &mut Criterion) {
    if std::env::var_os("SLUICE_BENCH_SERVERS").is_none() {
        return;
    }
    // Dummy credentials for moto.
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut group = c.benchmark_group("sink_writes");
    group.sample_size(10);
    for (sink, records) in [
        ("influxdb_victoriametrics", 50_000u64),
        ("timestream_moto", 10_000),
    ] {
        group.throughput(Throughput::Elements(records));
        let mut run_id = 0u64;
        group.bench_function(sink, |b| {
            b.iter(|| {
                run_id += 1;
                let toml = format!(
                    "[sources.sim]\ntype = \"simulator\"\ndevices = 50\nrate = \"unlimited\"\ncount = {records}\nstart_time = \"2026-01-01T00:00:00Z\"\n\n[sinks.out]\ninputs = [\"sim\"]\n{}\n",
                    sink_section(sink, std::process::id() as u64 * 1000 + run_id)
                );
                rt.block_on(run(&toml));
            })
        });
    }
    group.finish();
}

criterion_group!(benches, encoding, end_to_end);
criterion_main!(benches);
