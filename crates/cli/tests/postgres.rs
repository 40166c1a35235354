//! `pipelines/mqtt-kafka-postgres.toml` through the real binary: the bridge's Kafka envelopes
//! land in `iot_messages` (the issue's table) and per-tenant minute counts; `sluice` is killed
//! with SIGKILL midway and restarted: every message is in the table exactly once (the Kafka
//! source re-reads from its committed offsets, the primary key makes re-reads no-ops).
//! Read back with `psql`.
//!
//! Needs the broker and PostgreSQL: `scripts/services.sh start tansu postgres`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Sluice;
use sluice_sinks::kafka_testing::{create_topic, produce, require_kafka, unique};

/// How long a graceful stop may take before the test fails.
const STOP: Duration = Duration::from_secs(60);
/// The kafka source's log line once the group gave it partitions.
const ASSIGNED: Option<&str> = Some("kafka partitions assigned");
const ADMIN_URL: &str = "postgres://sluice:sluice@127.0.0.1:5432/sluice";

fn require_postgres() {
    assert!(
        std::net::TcpStream::connect_timeout(
            &"127.0.0.1:5432".parse().expect("address"),
            Duration::from_secs(2)
        )
        .is_ok(),
        "PostgreSQL is not listening on 127.0.0.1:5432: run `scripts/services.sh start postgres`"
    );
}

/// Runs `sql` with psql against `url`; the unaligned, tuples-only output, or the error.
fn psql(url: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-XtAc", sql])
        .output()
        .map_err(|e| format!("psql (installed by scripts/services.sh start postgres): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

fn count(url: &str, sql: &str) -> i64 {
    psql(url, sql)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A database of this test alone, dropped at the end.
struct Database {
    name: String,
    url: String,
}

impl Database {
    fn create() -> Database {
        let name = unique("pgcrash").replace('-', "_");
        psql(ADMIN_URL, &format!("CREATE DATABASE {name}")).expect("create database");
        Database {
            url: format!("postgres://sluice:sluice@127.0.0.1:5432/{name}"),
            name,
        }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let _ = psql(
            ADMIN_URL,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

const TENANTS: u64 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_pipeline_kill_9_midway_every_message_exactly_once() {
    require_kafka();
    require_postgres();
    const MESSAGES: u64 = 20_000;
    let db = Database::create();
    let topic = unique("pg-crash");
    let group = unique("pg-crash-group");
    create_topic(&topic, 6).await;
    // The bridge's envelopes (pipelines/mqtt-kafka-bridge.toml), keyed by tenant/project,
    // event times spread over one minute ending two minutes ago.
    let base_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
        / 60_000
        * 60_000
        - 180_000;
    produce(
        &topic,
        (0..MESSAGES)
            .map(|i| {
                let (tenant, project) = (format!("t{}", i % TENANTS), format!("p{}", i % 3));
                let envelope = format!(
                    r#"{{"tenant_id":"{tenant}","project_id":"{project}","mqtt_topic":"mtic/msg/client/realtime/{tenant}/{project}/dev-{}","payload":{{"seq":{i},"temp":21.5}},"timestamp":{}}}"#,
                    i % 10,
                    base_ms + i * 3
                );
                (Some(format!("{tenant}/{project}")), envelope.into_bytes())
            })
            .collect(),
    )
    .await;

    // The shipped pipeline, with test timings for the Kafka group (a killed member is expired
    // after 6 s instead of waiting for librdkafka's 300 s rebalance timeout).
    let dir = tempfile::tempdir().expect("tempdir");
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines/mqtt-kafka-postgres.toml"),
    )
    .expect("shipped pipeline");
    let group_line = "group_id = \"${KAFKA_GROUP:-iot-postgres}\"";
    assert!(shipped.contains(group_line), "the pipeline's group_id line");
    let pipeline = dir.path().join("pipeline.toml");
    // Smaller transactions, one at a time: the kill lands mid-stream even on a fast machine.
    let batch_line = "batch = { max_records = 5000, max_age = \"500ms\" }";
    assert!(shipped.contains(batch_line), "the pipeline's batch line");
    std::fs::write(
        &pipeline,
        shipped
            .replace(
                group_line,
                &format!(
                    "{group_line}\nsession_timeout = \"6s\"\ncommit_interval = \"200ms\"\nlibrdkafka_options = {{ \"max.poll.interval.ms\" = \"10000\" }}"
                ),
            )
            .replace(
                batch_line,
                "batch = { max_records = 500, max_age = \"100ms\" }\nin_flight = 1",
            ),
    )
    .expect("write pipeline");
    let data_dir = dir.path().display().to_string();
    let pg_url = format!("postgres://sluice@127.0.0.1:5432/{}", db.name);
    let env = [
        ("KAFKA_TOPIC", topic.as_str()),
        ("KAFKA_GROUP", group.as_str()),
        ("POSTGRES_URL", pg_url.as_str()),
        // The password only from the environment, as documented.
        ("PGPASSWORD", "sluice"),
        ("SLUICE_DATA_DIR", data_dir.as_str()),
    ];
    let rows = "SELECT count(*) FROM iot_messages";

    let first = Sluice::start(&pipeline, &env, ASSIGNED);
    let started = Instant::now();
    while count(&db.url, rows) < 4_000 {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the first run wrote {} rows",
            count(&db.url, rows)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    first.kill();
    let at_kill = count(&db.url, rows);
    assert!(
        (at_kill as u64) < MESSAGES,
        "killed too late to test anything ({at_kill} rows)"
    );

    // Let the group expire the killed member (session_timeout) before the restart joins.
    std::thread::sleep(Duration::from_secs(8));
    let second = Sluice::start(&pipeline, &env, ASSIGNED);
    let started = Instant::now();
    while (count(&db.url, rows) as u64) < MESSAGES {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "after the restart: {} of {MESSAGES} rows",
            count(&db.url, rows)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The minute counts: the last window closes after the aggregate's idle timeout.
    let counted = "SELECT coalesce(sum(messages), 0) FROM tenant_message_counts";
    let started = Instant::now();
    while (count(&db.url, counted) as u64) < MESSAGES && started.elapsed() < Duration::from_secs(90)
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    let exit = second.interrupt(STOP);
    assert!(exit.success(), "graceful stop after SIGINT: {exit:?}");

    let total = count(&db.url, rows);
    eprintln!("postgres crash test: {MESSAGES} messages, {at_kill} rows at kill -9, {total} rows at the end");
    assert_eq!(total as u64, MESSAGES, "every message exactly once");
    // Every row as the platform's consumer wrote it: tenant, project, topic, payload, time.
    let wrong = count(
        &db.url,
        &format!(
            "SELECT count(*) FROM iot_messages, LATERAL (SELECT (payload::json->>'seq')::bigint AS seq) s \
             WHERE tenant_id <> 't' || (seq % {TENANTS}) OR project_id <> 'p' || (seq % 3) \
             OR mqtt_topic <> 'mtic/msg/client/realtime/' || tenant_id || '/' || project_id || '/dev-' || (seq % 10) \
             OR payload <> '{{\"seq\":' || seq || ',\"temp\":21.5}}' \
             OR time <> to_timestamp(({base_ms} + seq * 3) / 1000.0) OR created_at IS NULL"
        ),
    );
    assert_eq!(wrong, 0, "rows whose columns differ from the envelope");
    let distinct = count(
        &db.url,
        "SELECT count(DISTINCT (payload::json->>'seq')::bigint) FROM iot_messages",
    );
    assert_eq!(distinct as u64, MESSAGES);
    let per_tenant = psql(
        &db.url,
        "SELECT string_agg(tenant_id || '=' || n, ',' ORDER BY tenant_id) FROM \
         (SELECT tenant_id, sum(messages) AS n FROM tenant_message_counts GROUP BY tenant_id) t",
    )
    .expect("counts");
    let want: Vec<String> = (0..TENANTS)
        .map(|t| format!("t{t}={}", MESSAGES / TENANTS))
        .collect();
    assert_eq!(per_tenant, want.join(","), "per-tenant minute counts");
}
