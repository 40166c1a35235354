//! `postgres` sink against a real PostgreSQL 15: the shared server of `scripts/services.sh
//! start postgres` (127.0.0.1:5432, user/password/db sluice), and for the restart test a
//! private cluster started in a temp dir (so restarting it disturbs no other test).
//! Every test reads the table back with SQL and checks the rows value by value.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sluice_core::ack::{self, BatchStatus, StatusReceiver};
use sluice_core::record::{Batch, Origin, Record, Value};
use sluice_core::testing::{status_within, SinkHarness};
use sluice_sinks::postgres::PostgresConfig;
use tokio_postgres::Client;

const PG: &str = "127.0.0.1:5432";
const PG_URL: &str = "postgres://sluice:sluice@127.0.0.1:5432/sluice";

fn require_postgres() {
    assert!(
        std::net::TcpStream::connect_timeout(&PG.parse().expect("address"), Duration::from_secs(2))
            .is_ok(),
        "PostgreSQL is not listening on {PG}: run `scripts/services.sh start postgres`"
    );
}

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// A table name no other test (or earlier run) uses.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}_{}_{}", std::process::id(), nanos % 1_000_000_000)
}

fn config(text: &str) -> PostgresConfig {
    toml::from_str(text).unwrap_or_else(|e| panic!("config: {e}\n{text}"))
}

/// Sends `records` in batches of `per_batch`, each with its own finalizer; returns the status
/// receivers in order.
async fn send_all(
    sink: &SinkHarness,
    records: Vec<Record>,
    per_batch: usize,
) -> Vec<StatusReceiver> {
    let mut statuses = Vec::new();
    let mut records = records.into_iter().peekable();
    while records.peek().is_some() {
        let (f, rx) = ack::batch();
        let mut batch = Batch::new(records.by_ref().take(per_batch).collect());
        for r in &mut batch.records {
            r.finalizers.push(f.clone());
        }
        f.finish(BatchStatus::Delivered);
        sink.out.send(batch).await.expect("send to sink");
        statuses.push(rx);
    }
    statuses
}

async fn statuses_of(rxs: Vec<StatusReceiver>, wait: Duration) -> Vec<Option<BatchStatus>> {
    let mut out = Vec::new();
    for rx in rxs {
        out.push(status_within(rx, wait).await);
    }
    out
}

/// Every dead-lettered record until nothing arrives for `idle`.
async fn dead_letters(sink: &mut SinkHarness, idle: Duration) -> Vec<Record> {
    let mut out = Vec::new();
    while let Ok(Some(mut b)) = tokio::time::timeout(idle, sink.dead.recv()).await {
        b.finalize(BatchStatus::Delivered);
        out.extend(b.records);
    }
    out
}

async fn count(client: &Client, table: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0)
}

const BASE: i64 = 1_767_225_600_000_000_000; // 2026-01-01T00:00:00Z

/// A record of the wide test table: every column type the sink encodes natively.
fn wide_record(i: i64) -> Record {
    // Nanoseconds that PostgreSQL cuts to microseconds: checked below.
    let mut r = Record::new(BASE + i * 1_000_000 + (i % 1000) * 1_001);
    r.set_tag("device_id", format!("dev-{}", i % 50));
    r.set_field("temp", Value::F64(i as f64 * 0.37 - 1000.5));
    r.set_field("count", Value::I64(i * 7919 - 400_000_000));
    r.set_field("ok", Value::Bool(i % 3 == 0));
    if i % 10 != 0 {
        r.set_field("label", Value::from(format!("é \"q\" 'x' \\ {i}").as_str()));
    }
    r.set_field("small", Value::I64(i % 30_000));
    r.payload = Some(format!("{{\"i\":{i},\"s\":\"p{i}\"}}").into_bytes().into());
    r.meta.origin = Origin::Mqtt {
        topic: Arc::from(format!("site/{}/dev-{}", i % 7, i % 50)),
    };
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_records_read_back_field_by_field() {
    require_postgres();
    let client = connect(PG_URL).await;
    let table = unique("pg_roundtrip");
    let mut sink = SinkHarness::start(
        &config(&format!(
            r#"
url = "{PG_URL}"
table = "{table}"
create_table = true
key = ["time", "device_id"]
batch = {{ max_records = 5000, max_age = "200ms" }}
[columns]
time = "time"
device_id = "tag:device_id"
temp = "field:temp"
count = {{ value = "field:count", type = "BIGINT" }}
ok = {{ value = "field:ok", type = "BOOLEAN" }}
label = {{ value = "field:label", type = "TEXT" }}
small = {{ value = "field:small", type = "SMALLINT" }}
amount = {{ value = "field:temp", type = "NUMERIC(12,2)" }}
payload = {{ value = "payload", type = "JSONB" }}
topic = "topic"
"#
        )),
        "pg",
        "pg-tests",
    )
    .await
    .expect("sink builds");

    const N: i64 = 100_000;
    let started = Instant::now();
    let rxs = send_all(&sink, (0..N).map(wide_record).collect(), 1000).await;
    let statuses = statuses_of(rxs, Duration::from_secs(300)).await;
    let elapsed = started.elapsed();
    assert!(
        statuses.iter().all(|s| *s == Some(BatchStatus::Delivered)),
        "every batch Delivered: {:?}",
        statuses
            .iter()
            .filter(|s| **s != Some(BatchStatus::Delivered))
            .take(5)
            .collect::<Vec<_>>()
    );
    assert!(dead_letters(&mut sink, Duration::from_millis(200))
        .await
        .is_empty());
    sink.stop(Duration::from_secs(30))
        .await
        .expect("sink stops");
    eprintln!(
        "{N} records in {elapsed:?} ({:.0} rows/s)",
        N as f64 / elapsed.as_secs_f64()
    );

    let rows = client
        .query(
            &format!(
                "SELECT time, device_id, temp, count, ok, label, small, amount::text, payload::text, topic FROM {table} ORDER BY time"
            ),
            &[],
        )
        .await
        .expect("select");
    assert_eq!(rows.len(), N as usize, "exactly one row per record");
    for (i, row) in rows.iter().enumerate() {
        let want = wide_record(i as i64);
        let time: DateTime<Utc> = row.get(0);
        let ns = time.timestamp_nanos_opt().expect("time in range");
        assert_eq!(
            ns,
            want.time - want.time.rem_euclid(1000),
            "row {i}: time (microseconds)"
        );
        assert_eq!(
            row.get::<_, &str>(1),
            want.tag("device_id").expect("tag"),
            "row {i}"
        );
        assert_eq!(
            Some(row.get::<_, f64>(2)),
            want.field("temp").and_then(Value::as_f64),
            "row {i}: temp"
        );
        assert_eq!(
            Some(&Value::I64(row.get::<_, i64>(3))),
            want.field("count"),
            "row {i}: count"
        );
        assert_eq!(
            Some(&Value::Bool(row.get::<_, bool>(4))),
            want.field("ok"),
            "row {i}: ok"
        );
        assert_eq!(
            row.get::<_, Option<&str>>(5),
            want.field("label").and_then(Value::as_str),
            "row {i}: label"
        );
        assert_eq!(
            Some(&Value::I64(row.get::<_, i16>(6) as i64)),
            want.field("small"),
            "row {i}: small"
        );
        let temp = want.field("temp").and_then(Value::as_f64).expect("temp");
        let amount: f64 = row.get::<_, &str>(7).parse().expect("numeric text");
        assert!(
            (amount - temp).abs() <= 0.005 + 1e-9,
            "row {i}: amount {amount} vs {temp}"
        );
        let payload: serde_json::Value =
            serde_json::from_str(row.get::<_, &str>(8)).expect("payload JSON");
        let sent: serde_json::Value =
            serde_json::from_slice(want.payload.as_deref().expect("payload")).expect("json");
        assert_eq!(payload, sent, "row {i}: payload");
        assert_eq!(
            Some(row.get::<_, &str>(9)),
            want.meta.topic(),
            "row {i}: topic"
        );
    }
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .expect("drop");
}

/// The issue's table, as the MQTT -> Kafka -> PostgreSQL platform wrote it.
fn iot_config(table: &str, extra: &str) -> PostgresConfig {
    config(&format!(
        r#"
url = "{PG_URL}"
table = "{table}"
create_table = true
key = ["time", "tenant_id", "project_id"]
on_conflict = "nothing"
batch = {{ max_records = 1000, max_age = "100ms" }}
{extra}
[columns]
time = "time"
tenant_id = "tag:tenant"
project_id = "tag:project"
mqtt_topic = "topic"
payload = "payload"
created_at = {{ type = "TIMESTAMPTZ", default = "now()" }}
"#
    ))
}

fn iot_record(i: i64, payload: &str) -> Record {
    let tenant = format!("t{}", i % 5);
    let project = format!("p{}", i % 3);
    let mut r = Record::new(BASE + i * 1_000_000);
    r.set_tag("tenant", tenant.as_str());
    r.set_tag("project", project.as_str());
    r.payload = Some(payload.to_string().into_bytes().into());
    r.meta.origin = Origin::Kafka {
        topic: Arc::from(format!("mtic/msg/client/realtime/{tenant}/{project}/data")),
        partition: 0,
        offset: i,
    };
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_records_are_written_exactly_once() {
    require_postgres();
    let client = connect(PG_URL).await;
    let table = unique("iot_messages");
    const N: i64 = 5000;
    for (round, per_batch) in [(1, 1000), (2, 777)] {
        // A fresh sink each round: the second is a restarted consumer redelivering everything.
        let mut sink = SinkHarness::start(&iot_config(&table, ""), "pg", "pg-tests")
            .await
            .expect("sink builds");
        let rxs = send_all(
            &sink,
            (0..N)
                .map(|i| iot_record(i, &format!("{{\"v\":{i}}}")))
                .collect(),
            per_batch,
        )
        .await;
        let statuses = statuses_of(rxs, Duration::from_secs(120)).await;
        assert!(
            statuses.iter().all(|s| *s == Some(BatchStatus::Delivered)),
            "round {round}: redelivery is a no-op, not an error: {statuses:?}"
        );
        assert!(dead_letters(&mut sink, Duration::from_millis(200))
            .await
            .is_empty());
        // Round 1 copies straight into the table; round 2's first batch meets existing keys
        // and is written again through staging with ON CONFLICT DO NOTHING.
        let fallbacks = sink
            .metrics
            .counter("duplicate_fallbacks")
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            fallbacks > 0,
            round == 2,
            "round {round}: {fallbacks} fallbacks"
        );
        sink.stop(Duration::from_secs(30)).await.expect("stop");
        assert_eq!(count(&client, &table).await, N, "round {round}");
    }
    let distinct: i64 = client
        .query_one(
            &format!("SELECT count(DISTINCT (time, tenant_id, project_id)) FROM {table}"),
            &[],
        )
        .await
        .expect("distinct")
        .get(0);
    assert_eq!(distinct, N);
    // create_table made the issue's indexes and the default of created_at.
    let indexes: Vec<String> = client
        .query(
            "SELECT indexdef FROM pg_indexes WHERE tablename = $1 ORDER BY indexname",
            &[&table],
        )
        .await
        .expect("indexes")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        indexes
            .iter()
            .any(|d| d.contains("(project_id, \"time\" DESC)")),
        "{indexes:?}"
    );
    assert!(
        indexes
            .iter()
            .any(|d| d.contains("(tenant_id, \"time\" DESC)")),
        "{indexes:?}"
    );
    assert!(
        indexes
            .iter()
            .any(|d| d.contains("PRIMARY KEY") || d.contains("_pkey")),
        "{indexes:?}"
    );
    let nulls: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE created_at IS NULL OR payload <> '{{\"v\":' || ((extract(epoch from time - '2026-01-01'::timestamptz) * 1000)::bigint)::text || '}}'"),
            &[],
        )
        .await
        .expect("check")
        .get(0);
    assert_eq!(nulls, 0, "payload and created_at of every row");

    // on_conflict = "update": a redelivery with a newer payload overwrites, the last of a key
    // within one batch wins.
    let sink = SinkHarness::start(
        &iot_config(&table, "").clone_with_update(),
        "pg",
        "pg-tests",
    )
    .await
    .expect("sink builds");
    let mut records: Vec<Record> = (0..100).map(|i| iot_record(i, "\"old\"")).collect();
    records.extend((0..100).map(|i| iot_record(i, "\"new\"")));
    let statuses = statuses_of(send_all(&sink, records, 200).await, Duration::from_secs(60)).await;
    assert!(
        statuses.iter().all(|s| *s == Some(BatchStatus::Delivered)),
        "{statuses:?}"
    );
    sink.stop(Duration::from_secs(30)).await.expect("stop");
    let updated: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE payload = '\"new\"'"),
            &[],
        )
        .await
        .expect("updated")
        .get(0);
    assert_eq!(updated, 100);
    assert_eq!(count(&client, &table).await, N);
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .expect("drop");
}

trait WithUpdate {
    fn clone_with_update(&self) -> Self;
}
impl WithUpdate for PostgresConfig {
    fn clone_with_update(&self) -> Self {
        let mut c = self.clone();
        c.on_conflict = sluice_sinks::postgres::OnConflict::Update;
        c
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_are_dead_lettered_with_column_and_value_the_rest_written() {
    require_postgres();
    let client = connect(PG_URL).await;
    let table = unique("pg_bad_rows");
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (time TIMESTAMPTZ NOT NULL, device_id TEXT NOT NULL, \
             temp DOUBLE PRECISION CHECK (temp > -100), code VARCHAR(4), PRIMARY KEY (time, device_id))"
        ))
        .await
        .expect("create");
    // No `columns`: the mapping is inferred from the table (tag or field of the same name).
    let mut sink = SinkHarness::start(
        &config(&format!(
            r#"
url = "{PG_URL}"
table = "{table}"
on_conflict = "error"
batch = {{ max_records = 1000, max_age = "100ms" }}
"#
        )),
        "pg",
        "pg-tests",
    )
    .await
    .expect("sink builds");
    const N: i64 = 1000;
    let records: Vec<Record> = (0..N)
        .map(|i| {
            let mut r = Record::new(BASE + i * 1_000_000);
            r.set_tag("device_id", "d1");
            r.set_field("temp", Value::F64(i as f64 / 10.0));
            r.set_field("code", Value::from("ab"));
            match i {
                // Client-side type error: a string in a DOUBLE PRECISION column.
                100 => r.set_field("temp", Value::from("abc")),
                // Server-side CHECK violation: found by halving the batch.
                500 => r.set_field("temp", Value::F64(-500.0)),
                // NOT NULL column without a value.
                700 => {
                    r.remove_tag("device_id");
                }
                // Too long for VARCHAR(4): refused by the server during COPY.
                800 => r.set_field("code", Value::from("toolong")),
                // The key of record 899 again (on_conflict = "error"): a unique violation.
                900 => r.time = BASE + 899 * 1_000_000,
                _ => {}
            }
            r
        })
        .collect();
    let rxs = send_all(&sink, records, 1000).await;
    // The batch resolves once its dead letters are finished too: read both at once.
    let (statuses, dead) = tokio::join!(
        statuses_of(rxs, Duration::from_secs(120)),
        dead_letters(&mut sink, Duration::from_secs(10))
    );
    assert!(
        statuses
            .iter()
            .all(|s| s.is_some_and(|s| s != BatchStatus::Errored)),
        "nothing left for redelivery: {statuses:?}"
    );
    sink.stop(Duration::from_secs(30)).await.expect("stop");
    let mut reasons: BTreeMap<i64, String> = BTreeMap::new();
    for r in &dead {
        let i = (r.time - BASE) / 1_000_000;
        let i = if i == 899 && r.field("temp") == Some(&Value::F64(90.0)) {
            900
        } else {
            i
        };
        reasons.insert(i, r.meta.error.as_deref().unwrap_or("").to_string());
    }
    assert_eq!(
        reasons.keys().copied().collect::<Vec<_>>(),
        vec![100, 500, 700, 800, 900],
        "dead letters: {reasons:#?}"
    );
    assert!(
        reasons[&100].contains("column `temp`") && reasons[&100].contains("\"abc\""),
        "{}",
        reasons[&100]
    );
    assert!(
        reasons[&500].contains("check constraint") && reasons[&500].contains("-500"),
        "{}",
        reasons[&500]
    );
    assert!(
        reasons[&700].contains("column `device_id`") && reasons[&700].contains("NOT NULL"),
        "{}",
        reasons[&700]
    );
    assert!(
        reasons[&800].contains("character varying(4)"),
        "{}",
        reasons[&800]
    );
    assert!(
        reasons[&900].contains("already exists"),
        "{}",
        reasons[&900]
    );
    assert_eq!(count(&client, &table).await, N - 5);
    let temps: Vec<f64> = client
        .query(&format!("SELECT temp FROM {table} ORDER BY time"), &[])
        .await
        .expect("select")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let want: Vec<f64> = (0..N)
        .filter(|i| ![100, 500, 700, 800, 900].contains(i))
        .map(|i| i as f64 / 10.0)
        .collect();
    assert_eq!(temps, want);
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .expect("drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_job_deletes_rows_older_than_retention() {
    require_postgres();
    let client = connect(PG_URL).await;
    let table = unique("pg_retention");
    let sink_config = iot_config(&table, "retention = \"3d\"\nretention_interval = \"500ms\"");
    let mut sink = SinkHarness::start(&sink_config, "pg", "pg-tests")
        .await
        .expect("sink builds");
    let now = Utc::now().timestamp_nanos_opt().expect("now");
    let day = 86_400_000_000_000i64;
    let records: Vec<Record> = (0..300)
        .map(|i| {
            let mut r = iot_record(i, "{}");
            // 100 rows 5 days old, 100 rows 2 days old, 100 fresh ones.
            r.time = now - [5 * day, 2 * day, 0][(i / 100) as usize] + i * 1000;
            r
        })
        .collect();
    let statuses = statuses_of(send_all(&sink, records, 300).await, Duration::from_secs(60)).await;
    assert!(
        statuses.iter().all(|s| *s == Some(BatchStatus::Delivered)),
        "{statuses:?}"
    );
    let deleted = sink.metrics.counter("retention_deleted");
    let started = Instant::now();
    loop {
        let old: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM {table} WHERE time < now() - interval '3 days'"),
                &[],
            )
            .await
            .expect("old")
            .get(0);
        if old == 0 && deleted.load(std::sync::atomic::Ordering::Relaxed) >= 100 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{old} rows older than 3 days still there"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(dead_letters(&mut sink, Duration::from_millis(100))
        .await
        .is_empty());
    sink.stop(Duration::from_secs(30)).await.expect("stop");
    assert_eq!(
        count(&client, &table).await,
        200,
        "the 2-day-old and fresh rows stay"
    );
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .expect("drop");
}

/// A PostgreSQL cluster of this test alone, in a temp dir (as the `postgres` OS user when the
/// test runs as root: PostgreSQL refuses root). Stopped (immediate) on drop.
struct PrivateCluster {
    dir: PathBuf,
    port: u16,
    _tmp: tempfile::TempDir,
}

fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("/usr/lib/postgresql: PostgreSQL is not installed; run `scripts/services.sh start postgres`")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    versions.sort();
    versions
        .last()
        .expect("a PostgreSQL version")
        .join("bin")
        .join(name)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a PostgreSQL binary as the cluster owner.
fn as_owner(bin: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

impl PrivateCluster {
    fn start() -> PrivateCluster {
        Self::start_with(|_| {})
    }

    /// Like `start`, running `setup` on the data directory between initdb and the start (as
    /// root: files it writes are handed to the cluster owner afterwards).
    fn start_with(setup: impl FnOnce(&Path)) -> PrivateCluster {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        if is_root() {
            let ok = Command::new("chown")
                .args(["postgres:postgres", &dir.display().to_string()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown the private cluster dir to postgres");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let out = as_owner(&pg_bin("initdb"))
            .args(["-D", &dir.join("data").display().to_string()])
            .args([
                "-U",
                "sluice",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ])
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        setup(&dir.join("data"));
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres", &dir.display().to_string()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown the private cluster's files to postgres");
        }
        let cluster = PrivateCluster {
            dir,
            port,
            _tmp: tmp,
        };
        cluster.pg_ctl(&["start"]);
        cluster
    }

    fn pg_ctl(&self, args: &[&str]) {
        let out = as_owner(&pg_bin("pg_ctl"))
            .args(["-D", &self.dir.join("data").display().to_string()])
            .args(["-l", &self.dir.join("log").display().to_string()])
            .args([
                "-o",
                &format!(
                    "-p {} -k {} -c listen_addresses=127.0.0.1",
                    self.port,
                    self.dir.display()
                ),
            ])
            .args(["-w", "-t", "60"])
            .args(args)
            .output()
            .expect("pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn url(&self) -> String {
        format!("postgres://sluice@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = as_owner(&pg_bin("pg_ctl"))
            .args(["-D", &self.dir.join("data").display().to_string()])
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// The server is restarted (immediate mode: like a crash) twice while batches are being
/// written: the sink reconnects and retries, every record ends Delivered and is in the table
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_mid_stream_loses_and_duplicates_nothing() {
    require_postgres(); // installs the binaries this test starts a private cluster with
    let cluster = PrivateCluster::start();
    let url = cluster.url();
    let table = "iot_messages";
    let mut c = iot_config(
        table,
        "retry = { initial_backoff = \"100ms\", max_backoff = \"2s\", max_retries = 100 }",
    );
    c.url = Some(url.clone().into());
    c.batch.max_records = 500;
    let mut sink = SinkHarness::start(&c, "pg", "pg-tests")
        .await
        .expect("sink builds");
    const N: i64 = 20_000;
    let feed = {
        let out = sink.out.clone();
        tokio::spawn(async move {
            let mut rxs = Vec::new();
            for chunk in 0..N / 250 {
                let (f, rx) = ack::batch();
                let mut batch = Batch::new(
                    (chunk * 250..(chunk + 1) * 250)
                        .map(|i| iot_record(i, &format!("{{\"v\":{i}}}")))
                        .collect(),
                );
                for r in &mut batch.records {
                    r.finalizers.push(f.clone());
                }
                f.finish(BatchStatus::Delivered);
                out.send(batch).await.expect("send");
                rxs.push(rx);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            rxs
        })
    };
    // Restart once some rows are in, and again later.
    for threshold in [3_000, 10_000] {
        let started = Instant::now();
        // A new connection: the restart ended the previous one.
        let client = connect(&url).await;
        loop {
            let n = client
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .map(|r| r.get::<_, i64>(0))
                .expect("count");
            if n >= threshold {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "stuck at {n} rows"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cluster.pg_ctl(&["-m", "immediate", "restart"]);
        let restarted = retry_restart_count(&sink);
        eprintln!("restarted at >= {threshold} rows (retries so far {restarted})");
    }
    let rxs = feed.await.expect("feed");
    let statuses = statuses_of(rxs, Duration::from_secs(180)).await;
    assert!(
        statuses.iter().all(|s| *s == Some(BatchStatus::Delivered)),
        "every batch Delivered after the restarts: {:?}",
        statuses
            .iter()
            .filter(|s| **s != Some(BatchStatus::Delivered))
            .count()
    );
    assert!(dead_letters(&mut sink, Duration::from_millis(200))
        .await
        .is_empty());
    assert!(
        sink.metrics
            .counter("retries")
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "the restarts made the sink retry"
    );
    sink.stop(Duration::from_secs(30)).await.expect("stop");
    let client = connect(&url).await;
    assert_eq!(count(&client, table).await, N, "every record exactly once");
    let payload_ok: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE payload = '{{\"v\":' || ((extract(epoch from time - '2026-01-01'::timestamptz) * 1000)::bigint)::text || '}}'"),
            &[],
        )
        .await
        .expect("payloads")
        .get(0);
    assert_eq!(payload_ok, N);
}

fn retry_restart_count(sink: &SinkHarness) -> i64 {
    sink.metrics
        .counter("retries")
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// A wrong password fails the build with the server's answer, and the password appears in no
/// message (the URL, `password` and `PGPASSWORD` all stay out of errors and logs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_fails_the_build_without_showing_it() {
    require_postgres();
    for config_text in [
        "url = \"postgres://sluice:hunter2-secret@127.0.0.1:5432/sluice\"\ntable = \"t\"".to_string(),
        "host = \"127.0.0.1\"\nuser = \"sluice\"\ndbname = \"sluice\"\npassword = \"hunter2-secret\"\ntable = \"t\"".to_string(),
    ] {
        let err = match SinkHarness::start(&config(&config_text), "pg", "pg-tests").await {
            Ok(_) => panic!("a wrong password must fail the build"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("password authentication failed"), "{err}");
        assert!(err.contains("127.0.0.1:5432"), "the error names the server: {err}");
        assert!(!err.contains("hunter2"), "the password leaked: {err}");
        assert!(
            !format!("{:?}", config(&config_text)).contains("hunter2"),
            "Debug of the config shows the password"
        );
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// TLS against a private cluster that accepts only TLS connections (`hostssl` in pg_hba.conf)
/// with a certificate from a test CA: `verify-full` with `ssl_root_cert` = that CA connects and
/// writes; `verify-full` on the system roots, or `require` with another CA, fails
/// verification; `require` alone encrypts without verifying (libpq); `disable` is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_require_verifies_the_server_certificate() {
    require_postgres();
    let certs = tempfile::tempdir().expect("tempdir");
    let c = certs.path();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        c,
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=sluice test CA",
            ],
        ]
        .concat(),
    );
    openssl(
        c,
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        c.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext.cnf");
    openssl(
        c,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    let cluster = PrivateCluster::start_with(|data| {
        for f in ["server.crt", "server.key"] {
            std::fs::copy(c.join(f), data.join(f)).expect("copy cert");
        }
        let ok = Command::new("chmod")
            .args(["600", &data.join("server.key").display().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "chmod server.key");
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).expect("conf");
        conf.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(data.join("postgresql.conf"), conf).expect("conf");
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .expect("pg_hba.conf");
    });
    let base = format!(
        "host = \"127.0.0.1\"\nport = {}\nuser = \"sluice\"\ndbname = \"postgres\"\ntable = \"tls_rows\"\ncreate_table = true\ncolumns = {{ time = \"time\", device_id = \"tag:device_id\" }}\nkey = [\"time\", \"device_id\"]\n",
        cluster.port
    );

    let refused = |text: String| async move {
        match SinkHarness::start(&config(&text), "pg", "pg-tests").await {
            Ok(_) => panic!("must not connect: {text}"),
            Err(e) => e.to_string(),
        }
    };
    let plain = refused(format!("{base}sslmode = \"disable\"")).await;
    assert!(
        plain.contains("no encryption") || plain.contains("pg_hba.conf"),
        "{plain}"
    );
    let untrusted = refused(format!("{base}sslmode = \"verify-full\"")).await;
    assert!(
        untrusted.to_lowercase().contains("certificate"),
        "{untrusted}"
    );
    // A CA that did not sign the server's certificate.
    let other = tempfile::tempdir().expect("tempdir");
    openssl(
        other.path(),
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=other CA",
            ],
        ]
        .concat(),
    );
    let wrong_ca = refused(format!(
        "{base}sslmode = \"require\"\nssl_root_cert = \"{}\"",
        other.path().join("ca.pem").display()
    ))
    .await;
    assert!(
        wrong_ca.to_lowercase().contains("certificate"),
        "{wrong_ca}"
    );
    // libpq's "require" without a root certificate: encrypted, not verified.
    let sink = SinkHarness::start(
        &config(&format!("{base}sslmode = \"require\"")),
        "pg",
        "pg-tests",
    )
    .await
    .expect("require without ssl_root_cert encrypts without verifying");
    sink.stop(Duration::from_secs(30)).await.expect("stop");

    let sink = SinkHarness::start(
        &config(&format!(
            "{base}sslmode = \"verify-full\"\nssl_root_cert = \"{}\"",
            c.join("ca.pem").display()
        )),
        "pg",
        "pg-tests",
    )
    .await
    .expect("TLS with the test CA");
    let records: Vec<Record> = (0..100)
        .map(|i| {
            let mut r = Record::new(BASE + i * 1_000_000);
            r.set_tag("device_id", "tls-1");
            r
        })
        .collect();
    let statuses = statuses_of(send_all(&sink, records, 50).await, Duration::from_secs(60)).await;
    assert!(
        statuses.iter().all(|s| *s == Some(BatchStatus::Delivered)),
        "{statuses:?}"
    );
    sink.stop(Duration::from_secs(30)).await.expect("stop");
    let out = Command::new("psql")
        .arg(format!(
            "postgres://sluice@127.0.0.1:{}/postgres?sslmode=require",
            cluster.port
        ))
        .args(["-XtAc", "SELECT count(*) FROM tls_rows"])
        .output()
        .expect("psql");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "100",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
