#!/usr/bin/env bash
# PostgreSQL load test (a measurement, not a timed test): how fast does the `postgres` sink
# write rows (file source → JSON decode → postgres sink: binary COPY into staging + INSERT …
# ON CONFLICT DO NOTHING per batch) compared with `psql \copy` of the same rows as CSV into the
# same kind of table, on the same server in the same run? Target: ≥ 0.7×.
#
#   benches/postgres-load.sh                      # N=500000 rows (the issue's iot_messages)
#   N=200000 SLUICE=path/to/sluice benches/postgres-load.sh
#
# Needs PostgreSQL on 127.0.0.1:5432 (`scripts/services.sh start postgres`; user, password and
# database sluice). Builds the release binary if SLUICE is not set and it is missing.
#
# Both sides write into an empty table with the issue's primary key and indexes. The sluice
# time is the whole `sluice run` (start-up, reading and parsing the JSON lines, writing, exit);
# the psql time is the `\copy` of the CSV (parsing done by the server).
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-500000}
TARGET=${CARGO_TARGET_DIR:-target}
if [ -z "${SLUICE:-}" ]; then
  SLUICE=$TARGET/release/sluice
  [ -x "$SLUICE" ] || cargo build --release -p sluice-cli
fi
(exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null || { echo "PostgreSQL is not on 127.0.0.1:5432: run scripts/services.sh start postgres" >&2; exit 1; }
export PGPASSWORD=${PGPASSWORD:-sluice}
URL=${POSTGRES_URL:-postgres://sluice@127.0.0.1:5432/sluice}
SUFFIX=$$
T_COPY=bench_copy_$SUFFIX
T_SINK=bench_sink_$SUFFIX

DIR=$(mktemp -d /tmp/sluice-pg-load.XXXXXX)
cleanup() {
  psql "$URL" -qXc "DROP TABLE IF EXISTS $T_COPY; DROP TABLE IF EXISTS $T_SINK" >/dev/null 2>&1 || true
  rm -rf "$DIR"
}
trap cleanup EXIT

# The same rows twice: CSV for psql, the bridge consumer's JSON for sluice. Payloads ~60 bytes.
python3 - "$N" "$DIR" <<'PY'
import json, sys, datetime
n, d = int(sys.argv[1]), sys.argv[2]
base = 1767225600000  # 2026-01-01T00:00:00Z in ms
with open(f"{d}/rows.csv", "w") as c, open(f"{d}/rows.jsonl", "w") as j:
    for i in range(n):
        t, p = f"t{i % 20}", f"p{i % 7}"
        topic = f"mtic/msg/client/realtime/{t}/{p}/dev-{i % 1000}"
        payload = '{"seq":%d,"temp":21.53,"humidity":40.1,"status":"ok"}' % i
        ms = base + i
        ts = datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).isoformat()
        c.write('%s,%s,%s,%s,"%s"\n' % (ts, t, p, topic, payload.replace('"', '""')))
        j.write(json.dumps({"ts": ms, "tenant_id": t, "project_id": p, "mqtt_topic": topic, "payload": payload}, separators=(",", ":")) + "\n")
PY

create() {
  psql "$URL" -qX -v ON_ERROR_STOP=1 <<SQL
CREATE TABLE $1 (time TIMESTAMPTZ NOT NULL, tenant_id TEXT NOT NULL, project_id TEXT NOT NULL,
  mqtt_topic TEXT, payload TEXT, created_at TIMESTAMPTZ DEFAULT NOW(),
  PRIMARY KEY (time, tenant_id, project_id));
CREATE INDEX ON $1 (tenant_id, time DESC);
CREATE INDEX ON $1 (project_id, time DESC);
SQL
}
create "$T_COPY"
create "$T_SINK"
psql "$URL" -qXc "CHECKPOINT" >/dev/null

now() { date +%s.%N; }

t0=$(now)
psql "$URL" -qX -v ON_ERROR_STOP=1 -c "\\copy $T_COPY (time, tenant_id, project_id, mqtt_topic, payload) FROM '$DIR/rows.csv' CSV"
t1=$(now)
psql "$URL" -qXc "CHECKPOINT" >/dev/null

cat > "$DIR/pipeline.toml" <<TOML
[pipeline]
id = "postgres-load"

[sources.rows]
type = "file"
path = "$DIR/rows.jsonl"
batch_size = 1024
decode = { codec = "json", time_key = "ts", time_unit = "ms", tags = ["tenant_id", "project_id", "mqtt_topic"] }

[sinks.pg]
type = "postgres"
inputs = ["rows"]
url = "$URL"
table = "$T_SINK"
on_conflict = "nothing"
batch = { max_records = 5000, max_age = "200ms" }

[sinks.pg.columns]
time = "time"
tenant_id = "tag:tenant_id"
project_id = "tag:project_id"
mqtt_topic = "tag:mqtt_topic"
payload = "field:payload"
TOML
t2=$(now)
SLUICE_DATA_DIR="$DIR/data" RUST_LOG=warn "$SLUICE" run "$DIR/pipeline.toml" >/dev/null
t3=$(now)

copied=$(psql "$URL" -qXtAc "SELECT count(*) FROM $T_COPY")
written=$(psql "$URL" -qXtAc "SELECT count(*) FROM $T_SINK")
same=$(psql "$URL" -qXtAc "SELECT count(*) FROM $T_COPY c JOIN $T_SINK s USING (time, tenant_id, project_id) WHERE c.mqtt_topic = s.mqtt_topic AND c.payload = s.payload")
python3 - "$N" "$t0" "$t1" "$t2" "$t3" "$copied" "$written" "$same" <<'PY'
import sys
n = int(sys.argv[1]); t0, t1, t2, t3 = map(float, sys.argv[2:6]); copied, written, same = map(int, sys.argv[6:9])
copy_rate, sink_rate = n / (t1 - t0), n / (t3 - t2)
print(f"psql \\copy : {copied:>9} rows in {t1 - t0:6.2f} s = {copy_rate:>9.0f} rows/s")
print(f"sluice sink: {written:>9} rows in {t3 - t2:6.2f} s = {sink_rate:>9.0f} rows/s")
print(f"ratio sluice / psql \\copy = {sink_rate / copy_rate:.2f}x (target >= 0.7x); identical rows: {same}")
if copied != n or written != n or same != n:
    sys.exit(f"row counts differ: expected {n}")
PY
