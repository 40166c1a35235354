//! JSON decode throughput of the `json` codec (the hot path of every JSON source), in
//! records/s, with a plain `serde_json::Value` parse of the same payloads as the reference in
//! the same run, and allocations per record counted by a global allocator.
//!
//! Payloads:
//! * `simulator`: what the `simulator` source generates (`{"ts":…,"temp":…,"humidity":…,
//!   "voltage":…,"device_status":"online","seq":…}`, ~95 B) with its default decoding (the
//!   topic pattern `devices/{device_id}/data` gives the `device_id` tag);
//! * `telemetry_125b`: a ~125 B line with two tag keys (`device_id`, `site`), three floats, a
//!   string and an integer, as read from stdin or a file.
//!
//! Each iteration decodes all payloads in batches of 256 through `Decoded::push` (as the
//! sources do) and drops the records. Times are CPU time of the benchmark thread (from
//! /proc/thread-self/schedstat; wall time elsewhere), the per-core figure on a shared machine.
//!
//! Measured on the shared 2-core box (issue 19, ns/record, ratio to the reference in the same
//! run): before the streaming decoder simulator 1324 (1.37), telemetry_125b 1604 (0.94), 7 and 9
//! allocations/record; after 867 (0.76) and 1171 (0.84), 2 allocations/record each (the tag
//! and field vectors; serde_json::Value: 11 and 17).
//!
//! Run: cargo bench -p sluice-benches --bench json_decode
//!
//! `SLUICE_DECODE_LOOP=<rounds>` skips criterion and decodes every payload set `rounds` times
//! (for timing whole processes, e.g. an old and a new build against each other).

use std::alloc::System;
use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use sluice_core::decode::{DecodeConfig, Decoded, Decoder};
use sluice_core::record::{intern, Meta};
use sluice_sources::simulator::{Fleet, SimulatorConfig};
use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};

/// Counts allocations so the bench can report allocations per record (a crate does the
/// counting: the workspace forbids `unsafe`, which a global allocator needs).
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Allocations so far (reallocations count: each one may move the block).
fn allocations() -> usize {
    let s = GLOBAL.stats();
    s.allocations + s.reallocations
}

const PAYLOADS: usize = 10_000;
const BATCH: usize = 256;

/// One payload set: the payloads, their topics and the decoding the source would apply.
struct Input {
    name: &'static str,
    payloads: Vec<(Bytes, Option<String>)>,
    config: DecodeConfig,
}

fn simulator() -> Input {
    let cfg = SimulatorConfig {
        devices: 500,
        ..SimulatorConfig::default()
    };
    let mut fleet = Fleet::new(&cfg, 1_764_000_000_000);
    let mut readings = Vec::new();
    while readings.len() < PAYLOADS {
        fleet.round(&mut readings);
    }
    readings.truncate(PAYLOADS);
    Input {
        name: "simulator",
        payloads: readings
            .into_iter()
            .map(|r| (r.payload, Some(r.topic.to_string())))
            .collect(),
        config: cfg.decode_config(),
    }
}

fn telemetry_125b() -> Input {
    let payloads = (0..PAYLOADS)
        .map(|i| {
            let line = format!(
                r#"{{"ts":{},"device_id":"dev-{:04}","site":"north-{}","temp":{:.2},"humidity":{:.1},"voltage":{:.3},"status":"online","seq":{}}}"#,
                1_764_000_000_000_i64 + i as i64 * 10,
                i % 500,
                i % 7,
                18.0 + (i % 997) as f64 * 0.0173,
                35.0 + (i % 211) as f64 * 0.097,
                3.6 + (i % 101) as f64 * 0.0049,
                i * 13,
            );
            (Bytes::from(line), None)
        })
        .collect();
    Input {
        name: "telemetry_125b",
        payloads,
        config: DecodeConfig {
            tags: vec!["device_id".into(), "site".into()],
            ..DecodeConfig::default()
        },
    }
}

/// Decodes every payload of `input` as a source does; returns the records decoded.
fn decode_all(decoder: &mut Decoder, input: &Input) -> usize {
    let source = intern("bench");
    let mut n = 0;
    for chunk in input.payloads.chunks(BATCH) {
        let mut out = Decoded::with_capacity(chunk.len());
        for (payload, topic) in chunk {
            let meta = Meta {
                source: Some(source.clone()),
                ..Meta::default()
            };
            out.push(
                decoder,
                payload.clone(),
                topic.as_deref(),
                1_764_000_000_000_000_000,
                meta,
            );
        }
        assert!(
            out.dead.is_empty(),
            "{}: {:?}",
            input.name,
            out.dead[0].meta
        );
        n += black_box(out).records.len();
    }
    n
}

/// The reference: a plain `serde_json::Value` parse of every payload.
fn parse_all(input: &Input) -> usize {
    let mut n = 0;
    for (payload, _) in &input.payloads {
        let v: serde_json::Value = serde_json::from_slice(payload).expect("bench payloads parse");
        n += black_box(v).as_object().map_or(0, |o| o.len().min(1));
    }
    n
}

/// CPU time of the current thread (Linux), or `None` elsewhere.
fn thread_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// CPU time of `iters` runs of `f` (wall time where thread CPU time is unavailable).
fn timed(iters: u64, mut f: impl FnMut() -> usize) -> Duration {
    let (cpu, wall) = (thread_cpu_time(), Instant::now());
    for _ in 0..iters {
        black_box(f());
    }
    match (cpu, thread_cpu_time()) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => wall.elapsed(),
    }
}

/// Allocations per record of one warmed-up pass of `f` over `records` records.
fn allocations_per_record(records: usize, mut f: impl FnMut() -> usize) -> f64 {
    f();
    let before = allocations();
    f();
    (allocations() - before) as f64 / records as f64
}

fn main() {
    let inputs = [simulator(), telemetry_125b()];
    for input in &inputs {
        let bytes: usize = input.payloads.iter().map(|(p, _)| p.len()).sum();
        let mut decoder = Decoder::new(input.config.clone()).expect("valid decode config");
        let n = input.payloads.len();
        let ours = allocations_per_record(n, || decode_all(&mut decoder, input));
        let reference = allocations_per_record(n, || parse_all(input));
        println!(
            "json_decode/{}: {} payloads, {:.0} B average; allocations per record: decoder {ours:.2}, serde_json::Value {reference:.2}",
            input.name,
            n,
            bytes as f64 / n as f64
        );
    }
    if let Some(rounds) = std::env::var("SLUICE_DECODE_LOOP")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        for input in &inputs {
            let mut decoder = Decoder::new(input.config.clone()).expect("valid decode config");
            for _ in 0..rounds {
                black_box(decode_all(&mut decoder, input));
            }
        }
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    let mut group = c.benchmark_group("json_decode");
    for input in &inputs {
        group.throughput(Throughput::Elements(input.payloads.len() as u64));
        let mut decoder = Decoder::new(input.config.clone()).expect("valid decode config");
        group.bench_function(BenchmarkId::new("decoder", input.name), |b| {
            b.iter_custom(|iters| timed(iters, || decode_all(&mut decoder, input)))
        });
        group.bench_function(BenchmarkId::new("serde_json_value", input.name), |b| {
            b.iter_custom(|iters| timed(iters, || parse_all(input)))
        });
    }
    group.finish();
    c.final_summary();
}
