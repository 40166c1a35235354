#!/usr/bin/env bash
# MQTT load test (a measurement, not a timed test): how fast does sluice drain an MQTT backlog
# (mqtt source → JSON decode → blackhole) compared with `mosquitto_sub > /dev/null`, the
# client-side ceiling, on the same private broker in the same run?
#
#   benches/mqtt-load.sh                 # 1,000,000 QoS 0 and 200,000 QoS 1 messages (~120 B)
#   N0=100000 N1=20000 MAX_INFLIGHT=2000 benches/mqtt-load.sh
#
# For each QoS the broker first queues N messages for an offline persistent session (so the
# publisher's speed does not matter), then the subscriber connects and the time until it has
# every message is measured. mosquitto runs with unlimited queues and in-flight window
# (max_queued_messages 0, max_inflight_messages 0) and queue_qos0_messages true. Peak RSS of
# sluice is VmHWM from /proc. Needs mosquitto + mosquitto-clients (scripts/services.sh start
# installs them) and builds target/release/sluice if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

N0=${N0:-1000000}
N1=${N1:-200000}
MAX_INFLIGHT=${MAX_INFLIGHT:-2000}   # the mqtt source's max_inflight
SLUICE=${SLUICE:-target/release/sluice}
[ -x "$SLUICE" ] || cargo build --release -p sluice-cli

DIR=$(mktemp -d /tmp/sluice-mqtt-load.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
MPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$DIR/mosquitto.conf" <<CONF
user $(id -un)
listener $PORT 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 0
max_queued_bytes 0
max_inflight_messages 0
queue_qos0_messages true
log_dest file $DIR/mosquitto.log
CONF
mosquitto -c "$DIR/mosquitto.conf" &
BROKER=$!
cleanup() { kill "$BROKER" 2>/dev/null || true; [ -n "${SLUICE_PID:-}" ] && kill "$SLUICE_PID" 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done

# A ~120-byte JSON payload (mosquitto_pub --repeat; `-l` with QoS 1 loses messages at EOF).
PAYLOAD='{"ts":1764000000000,"device_id":"dev-00042","temp":21.53,"humidity":40.12,"voltage":3.291,"seq":12345,"status":"ok"}'

now() { date +%s.%N; }
sub() { mosquitto_sub -h 127.0.0.1 -p "$PORT" "$@"; }

# queue QOS N TOPIC CLIENT_ID: makes CLIENT_ID's persistent session and queues N messages for it.
queue() {
  sub -c -i "$4" -q "$1" -t "$3" -E
  mosquitto_pub -h 127.0.0.1 -p "$PORT" -q "$1" -t "$3" --repeat "$2" -m "$PAYLOAD"
}

rss_kib() { awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

run_case() {
  local qos=$1 n=$2 topic="load/q$1"
  # Baseline: mosquitto_sub drains the backlog into /dev/null.
  queue "$qos" "$n" "$topic" "base-q$qos"
  local t0 t1 base sl
  t0=$(now)
  sub -c -i "base-q$qos" -q "$qos" -t "$topic" -C "$n" > /dev/null
  t1=$(now)
  base=$(python3 -c "print($n/($t1-$t0))")

  # sluice: mqtt → json decode → blackhole, same backlog.
  queue "$qos" "$n" "$topic" "sluice-q$qos"
  cat > "$DIR/load-q$qos.toml" <<TOML
[pipeline]
id = "mqtt-load"

[sources.mqtt]
type = "mqtt"
url = "mqtt://127.0.0.1:$PORT"
client_id = "sluice-q$qos"
protocol = "v3.1.1"
topics = ["$topic"]
qos = $qos
max_inflight = $MAX_INFLIGHT
decode = { codec = "json", time_key = "ts", tags = ["device_id", "status"] }

[sinks.sink]
type = "blackhole"
inputs = ["mqtt"]
TOML
  t0=$(now)
  RUST_LOG=warn "$SLUICE" run --metrics-addr "127.0.0.1:$MPORT" --status-interval 0s "$DIR/load-q$qos.toml" &
  SLUICE_PID=$!
  local done_n=0
  while [ "$done_n" -lt "$n" ]; do
    sleep 0.02
    done_n=$(curl -s "http://127.0.0.1:$MPORT/metrics" | awk -F' ' '/^sluice_component_records_out_total\{component="sink"/ {print $2}')
    done_n=${done_n:-0}
    kill -0 "$SLUICE_PID" 2>/dev/null || { echo "sluice exited early" >&2; exit 1; }
  done
  t1=$(now)
  local rss
  rss=$(rss_kib "$SLUICE_PID")
  kill -INT "$SLUICE_PID"; wait "$SLUICE_PID" || true; SLUICE_PID=
  sl=$(python3 -c "print($n/($t1-$t0))")
  python3 -c "print(f'QoS $qos: {$n:>9,} msgs | mosquitto_sub {$base:>10,.0f} msg/s | sluice {$sl:>10,.0f} msg/s | ratio {$sl/$base:.2f} | sluice peak RSS {$rss/1024:.1f} MiB')"
}

echo "mosquitto $(mosquitto -h 2>/dev/null | head -1 | awk '{print $3}') on 127.0.0.1:$PORT, $(nproc) cores, sluice = $SLUICE"
run_case 0 "$N0"
run_case 1 "$N1"
