#!/usr/bin/env bash
# Kafka load tool (a measurement, not a timed test). Two cases, each against a reference
# measured in the same run on the same broker:
#
#  1. consumer: N × 200-byte JSON messages in a 6-partition topic; sluice (kafka source → JSON
#     decode → blackhole, one process) against librdkafka's Python client (confluent-kafka,
#     a consumer loop that parses each message with json.loads; same fetch settings as the
#     kafka source: fetch.queue.backoff.ms 10, fetch.wait.max.ms 100).
#  2. bridge: N_BRIDGE QoS 1 MQTT messages queued for the bridge's persistent session; sluice
#     (mqtt → envelope → kafka sink, snappy, acks=all) against `mosquitto_sub` draining the
#     same backlog to /dev/null (the MQTT-side ceiling).
#
#   benches/kafka-load.sh                     # N=1000000, N_BRIDGE=200000
#   N=200000 N_BRIDGE=50000 benches/kafka-load.sh
#
# Needs the broker on 127.0.0.1:9092 and mosquitto (scripts/services.sh start); installs
# confluent-kafka into the services venv; builds target/release/sluice if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-1000000}
N_BRIDGE=${N_BRIDGE:-200000}
SLUICE=${SLUICE:-${CARGO_TARGET_DIR:-target}/release/sluice}
VENV="${SLUICE_SERVICES_DIR:-/tmp/sluice-services}/venv"
[ -x "$SLUICE" ] || cargo build --release -p sluice-cli
[ -x "$VENV/bin/python" ] || { echo "run scripts/services.sh start first (venv missing)" >&2; exit 1; }
"$VENV/bin/python" -c 'import confluent_kafka' 2>/dev/null || "$VENV/bin/pip" install -q confluent-kafka
PY="$VENV/bin/python"
(exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null || { echo "no broker on 9092: scripts/services.sh start tansu" >&2; exit 1; }

DIR=$(mktemp -d /tmp/sluice-kafka-load.XXXXXX)
MPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() { [ -n "${SLUICE_PID:-}" ] && kill "$SLUICE_PID" 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT
RUN=$(date +%s%N)
now() { date +%s.%N; }
rss_kib() { awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# Waits until the component's records_out_total reaches $2; prints nothing.
wait_out() {
  local component=$1 n=$2 got=0
  while [ "${got:-0}" -lt "$n" ]; do
    sleep 0.05
    got=$(curl -s "http://127.0.0.1:$MPORT/metrics" | awk -v c="component=\"$component\"" 'index($0, "sluice_component_records_out_total{" c) == 1 {print $2}')
    kill -0 "$SLUICE_PID" 2>/dev/null || { echo "sluice exited early" >&2; exit 1; }
  done
}

# --- 1. consumer ----------------------------------------------------------------------------
TOPIC="load-$RUN"
"$PY" - "$TOPIC" "$N" <<'PY'
import sys, time
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
topic, n = sys.argv[1], int(sys.argv[2])
admin = AdminClient({"bootstrap.servers": "127.0.0.1:9092"})  # kept alive until the result is in
admin.create_topics([NewTopic(topic, 6, 1)])[topic].result()
p = Producer({"bootstrap.servers": "127.0.0.1:9092", "linger.ms": 20, "batch.size": 1000000,
              "queue.buffering.max.messages": 2000000})
body = '{"ts":1764000000000,"device_id":"dev-%05d","temp":21.53,"humidity":40.12,"voltage":3.291,"seq":%d,"status":"ok","site":"plant-north","firmware":"2.4.1-rc3","pad":"%s"}'
t0 = time.time()
for i in range(n):
    m = body % (i % 10000, i, "")
    m = body % (i % 10000, i, "x" * max(0, 200 - len(m)))
    while True:
        try:
            p.produce(topic, m.encode(), key=b"dev-%05d" % (i % 10000)); break
        except BufferError:
            p.poll(0.01)
p.flush()
print(f"produced {n:,} × {len(m)} B in {time.time()-t0:.1f} s", file=sys.stderr)
PY

REF=$("$PY" - "$TOPIC" "$N" <<'PY'
import sys, time, json
from confluent_kafka import Consumer
topic, n = sys.argv[1], int(sys.argv[2])
c = Consumer({"bootstrap.servers": "127.0.0.1:9092", "group.id": f"ref-{time.time_ns()}",
              "auto.offset.reset": "earliest", "enable.auto.commit": False,
              "session.timeout.ms": 6000, "fetch.queue.backoff.ms": 10,
              "fetch.wait.max.ms": 100, "queued.max.messages.kbytes": 16384})  # as the sluice source
c.subscribe([topic])
got, t0 = 0, None
while got < n:
    for m in c.consume(10000, 1.0):
        if m.error(): continue
        if t0 is None: t0 = time.time()
        json.loads(m.value()); got += 1
print(n / (time.time() - t0))
c.close()
PY
)

cat > "$DIR/consume.toml" <<TOML
[pipeline]
id = "kafka-load"
[sources.bus]
type = "kafka"
bootstrap_servers = "127.0.0.1:9092"
topics = ["$TOPIC"]
group_id = "sluice-load-$RUN"
session_timeout = "6s"
decode = { codec = "json", time_key = "ts", tags = ["device_id", "status", "site"] }
[sinks.sink]
type = "blackhole"
inputs = ["bus"]
TOML
RUST_LOG=warn "$SLUICE" run --metrics-addr "127.0.0.1:$MPORT" --status-interval 0s "$DIR/consume.toml" &
SLUICE_PID=$!
# The clock starts when the first record is out (the reference also excludes the group join).
wait_out sink 1
t0=$(now)
wait_out sink "$N"
t1=$(now)
RSS=$(rss_kib "$SLUICE_PID")
kill -INT "$SLUICE_PID"; wait "$SLUICE_PID" || true; SLUICE_PID=
"$PY" -c "n=$N; s=n/($t1-$t0); r=$REF; print(f'consumer: {n:>9,} msgs of 200 B, 6 partitions | confluent-kafka (Python, json.loads) {r:>9,.0f} msg/s | sluice kafka→json→blackhole {s:>9,.0f} msg/s | ratio {s/r:.2f} | sluice peak RSS {$RSS/1024:.1f} MiB')"

# --- 2. bridge ------------------------------------------------------------------------------
BTOPIC="bridge-$RUN"
"$PY" -c "
from confluent_kafka.admin import AdminClient, NewTopic
admin = AdminClient({'bootstrap.servers': '127.0.0.1:9092'})
admin.create_topics([NewTopic('$BTOPIC', 6, 1)])['$BTOPIC'].result()"
PAYLOAD='{"ts":1764000000000,"temp":21.53,"humidity":40.12,"voltage":3.291,"seq":12345,"status":"ok"}'
MTOPIC="mtic/msg/client/realtime/acme/p1/load-$RUN"
queue() { # CLIENT_ID: persistent session with N_BRIDGE QoS 1 messages waiting
  mosquitto_sub -h 127.0.0.1 -c -i "$1" -q 1 -t "$MTOPIC" -E -V mqttv5 -x 3600
  mosquitto_pub -h 127.0.0.1 -q 1 -t "$MTOPIC" --repeat "$N_BRIDGE" -m "$PAYLOAD"
}
queue "ref-$RUN"
t0=$(now)
mosquitto_sub -h 127.0.0.1 -c -i "ref-$RUN" -q 1 -t "$MTOPIC" -V mqttv5 -x 3600 -C "$N_BRIDGE" > /dev/null
t1=$(now)
BASE=$("$PY" -c "print($N_BRIDGE/($t1-$t0))")

cat > "$DIR/bridge.toml" <<TOML
[pipeline]
id = "bridge-load"
[sources.devices]
type = "mqtt"
url = "mqtt://127.0.0.1:1883"
client_id = "bridge-$RUN"
protocol = "v5"
topics = ["$MTOPIC"]
qos = 1
max_inflight = 2000
decode = { codec = "raw", topic_pattern = "mtic/msg/client/realtime/{tenant_id}/{project_id}/#" }
[sinks.kafka]
type = "kafka"
inputs = ["devices"]
bootstrap_servers = "127.0.0.1:9092"
topic = "$BTOPIC"
key = "{tenant_id}/{project_id}"
format = "envelope"
compression = "snappy"
TOML
# Create the bridge's session first (subscribe once), then queue its backlog.
RUST_LOG=warn "$SLUICE" run --metrics-addr "127.0.0.1:$MPORT" --status-interval 0s "$DIR/bridge.toml" &
SLUICE_PID=$!
sleep 2
kill -INT "$SLUICE_PID"; wait "$SLUICE_PID" || true; SLUICE_PID=
mosquitto_pub -h 127.0.0.1 -q 1 -t "$MTOPIC" --repeat "$N_BRIDGE" -m "$PAYLOAD"
t0=$(now)
RUST_LOG=warn "$SLUICE" run --metrics-addr "127.0.0.1:$MPORT" --status-interval 0s "$DIR/bridge.toml" &
SLUICE_PID=$!
wait_out kafka "$N_BRIDGE"
t1=$(now)
RSS=$(rss_kib "$SLUICE_PID")
kill -INT "$SLUICE_PID"; wait "$SLUICE_PID" || true; SLUICE_PID=
"$PY" -c "n=$N_BRIDGE; s=n/($t1-$t0); b=$BASE; print(f'bridge:   {n:>9,} QoS 1 msgs | mosquitto_sub {b:>9,.0f} msg/s | sluice mqtt→kafka (snappy, acks=all) {s:>9,.0f} msg/s | ratio {s/b:.2f} | sluice peak RSS {$RSS/1024:.1f} MiB')"
