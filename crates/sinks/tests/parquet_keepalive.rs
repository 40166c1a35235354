//! The parquet sink next to an MQTT source on the real mosquitto (`scripts/services.sh start`):
//! big files must not starve the source's keep-alive (issue 13 item 10).

mod parquet_support;

use std::path::Path;

use parquet_support::*;

/// Issue 13 item 10: Parquet encoding, `sync_all`, rename and directory fsync must not run on
/// the runtime's threads. An MQTT source (v3.1.1, 3 s keep-alive) feeds two parquet sinks that
/// write 128 MiB batches into 128 MiB files, on a 2-worker runtime as the CLI uses on this
/// 2-core machine. Before the fix both workers were busy encoding/closing for seconds at a time,
/// the broker dropped the starved connection ("exceeded timeout") and the source reconnected
/// (3 reconnects, 1,000 messages lost to the clean session). Now the source keeps its
/// connection and every message lands exactly once in each lake.
///
/// In its own test binary so that no other test competes for the 2 cores meanwhile.
///
/// Sizing: on this machine a 128 MiB close alone (footer + fsync + rename) stalled a runtime
/// thread < 0.5 s; what exceeds the 1.5 s keep-alive budget is encoding a large write batch
/// while both sinks do so, hence the 128 MiB `batch.max_bytes`.
///
/// The keep-alive was 1 s until a fresh-clone CI run on a busy machine (four builds beside it)
/// lost the connection with "Last pingreq isn't acked" although the runtime never stalled more
/// than 228 ms: rumqttc wants each PINGRESP within one keep-alive, and with the CPU shared the
/// client read the socket more than 1 s behind the broker. 3 s keeps the test about blocked
/// runtime threads (seconds at a time before the fix, reported as `stalled` below).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_keeps_its_connection_while_big_files_close() {
    use sluice_core::metrics::{Kind, Metrics};
    use sluice_mqtt::testing;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    testing::require_broker();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    // 36,000 × 8 kB = ~290 MB: each lake encodes two 128 MiB batches and closes a 128 MiB
    // file (zstd halves the hex) while the source runs.
    const MESSAGES: usize = 36_000;
    const BLOB: usize = 8_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let lake = dir.path().join("lake");
    let lake2 = dir.path().join("lake2");
    let topic = testing::unique("sluice-test/parquet-keepalive");
    let client = testing::unique("sluice-test-parquet-keepalive");
    let toml = format!(
        r#"
[sources.mqtt]
type = "mqtt"
url = "{}"
topics = ["{topic}/#"]
qos = 1
client_id = "{client}"
clean_session = true
protocol = "v3.1.1"
keep_alive = "3s"
max_inflight = 65535
decode = {{ codec = "json", tags = ["device_id"] }}

[sinks.lake]
type = "parquet"
inputs = ["mqtt"]
destination = "{}"
key = "device={{device_id}}/"
max_file_size = "128MiB"
max_age = "10m"
cleanup_after = "20m"
batch = {{ max_records = 100000, max_bytes = "128MiB", max_age = "20s" }}

# A second lake on the same stream (e.g. another table or region): its files close at the same
# moments, so both runtime threads would be busy closing.
[sinks.lake2]
type = "parquet"
inputs = ["mqtt"]
destination = "{}"
key = "device={{device_id}}/"
max_file_size = "128MiB"
max_age = "10m"
cleanup_after = "20m"
batch = {{ max_records = 100000, max_bytes = "128MiB", max_age = "20s" }}
"#,
        testing::BROKER,
        lake.display(),
        lake2.display()
    );
    let mut registry = sluice_core::registry::Registry::new();
    sluice_sources::register(&mut registry);
    sluice_sinks::register(&mut registry);
    let config =
        sluice_core::config::parse_str(&toml, Path::new("keepalive.toml")).expect("parses");
    let metrics = Metrics::new();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let pipeline = {
        let (metrics, shutdown) = (metrics.clone(), shutdown.clone());
        tokio::spawn(async move {
            sluice_core::topology::run(config, &registry, &metrics, Some(shutdown)).await
        })
    };
    // How long the runtime's threads were unavailable: the largest gap between 50 ms ticks.
    let stalled = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let heartbeat = {
        let stalled = stalled.clone();
        tokio::spawn(async move {
            let mut last = std::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let gap = last.elapsed().as_millis() as u64;
                stalled.fetch_max(gap, Ordering::Relaxed);
                last = std::time::Instant::now();
            }
        })
    };
    let source = metrics.component("mqtt", Kind::Source);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while source.gauge("subscribed").load(Ordering::Relaxed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the source never subscribed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Incompressible-ish payloads (xorshift hex).
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut messages = Vec::with_capacity(MESSAGES);
    for i in 0..MESSAGES {
        let mut blob = String::with_capacity(BLOB);
        while blob.len() < BLOB {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            blob.push_str(&format!("{state:016x}"));
        }
        let payload = format!(r#"{{"device_id":"d","n":{i},"blob":"{blob}"}}"#);
        messages.push((format!("{topic}/d"), bytes::Bytes::from(payload)));
    }
    let started = std::time::Instant::now();
    // ~10 MB/s, well below what the pipeline sustains even on a busy machine: the client is
    // never far behind the broker, so a PINGRESP is never stuck behind a long backlog (a short
    // keep-alive cannot survive that, whatever the sink does).
    for (i, chunk) in messages.chunks(125).enumerate() {
        testing::publish(testing::BROKER, 1, chunk.to_vec()).await;
        tokio::time::sleep_until(
            tokio::time::Instant::from_std(started) + Duration::from_millis(100) * (i as u32 + 1),
        )
        .await;
    }
    let published_in = started.elapsed();
    // Everything published reached the source (or the connection was lost).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while source.counter("messages").load(Ordering::Relaxed) < MESSAGES as i64
        && source.counter("reconnects").load(Ordering::Relaxed) == 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the source did not get every message"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reconnects = source.counter("reconnects").load(Ordering::Relaxed);
    let closed_while_running = files_under(&lake).len() + files_under(&lake2).len();
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(120), pipeline)
        .await
        .expect("pipeline stops")
        .expect("pipeline task")
        .expect("pipeline runs");
    heartbeat.abort();
    eprintln!(
        "published {MESSAGES} × {BLOB} B in {published_in:?}; {closed_while_running} files closed while running; {reconnects} reconnects; runtime stalled up to {} ms",
        stalled.load(Ordering::Relaxed)
    );
    assert!(
        closed_while_running >= 2,
        "big files should have closed during the run, not only at shutdown ({closed_while_running})"
    );
    assert_eq!(
        reconnects, 0,
        "the MQTT source lost its connection while files closed (keep-alive starved)"
    );
    let rows = duckdb(
        &format!(
            "SELECT count(*), count(DISTINCT n) FROM read_parquet('{}/*/*.parquet')",
            lake.display()
        ),
        false,
    );
    assert_eq!(
        rows,
        vec![vec![MESSAGES.to_string(), MESSAGES.to_string()]],
        "every message exactly once"
    );
    let rows = duckdb(
        &format!(
            "SELECT count(*), count(DISTINCT n) FROM read_parquet('{}/*/*.parquet')",
            lake2.display()
        ),
        false,
    );
    assert_eq!(
        rows,
        vec![vec![MESSAGES.to_string(), MESSAGES.to_string()]],
        "every message exactly once in the second lake"
    );
}
