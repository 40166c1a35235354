#!/usr/bin/env bash
# SQS load test (a measurement, not a timed test): how fast does sluice drain an SQS queue
# (sqs source → JSON decode → blackhole) with 1, 4 and 16 receivers, compared with a plain
# boto3 receive + DeleteMessageBatch loop (THREADS threads) draining the same backlog on the
# same server in the same run?
#
#   benches/sqs-load.sh                     # N=1000 messages of 200 bytes per case
#   N=500 THREADS=4 SLUICE=path/to/sluice benches/sqs-load.sh
#
# Needs moto on 127.0.0.1:5000 and its venv (boto3): `scripts/services.sh start moto`. Builds
# the release binary if SLUICE is not set and it is missing.
#
# Each case gets a fresh queue filled with N messages (SendMessageBatch, 8 threads) before the
# clock starts; the time until the consumer has all N (sluice: the blackhole's records_out
# counter from --metrics-addr) is measured. moto is the limit here, not the client: its calls
# cost O(messages on the queue) (see crates/cli/tests/sqs_crash.rs), so keep N small and read
# the figures as sluice vs the reference on the same server, not as SQS throughput.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-1000}
THREADS=${THREADS:-4}
ENDPOINT=${ENDPOINT:-http://127.0.0.1:5000}
PY=${PY:-${SLUICE_SERVICES_DIR:-/tmp/sluice-services}/venv/bin/python}
TARGET=${CARGO_TARGET_DIR:-target}
if [ -z "${SLUICE:-}" ]; then
  SLUICE=$TARGET/release/sluice
  [ -x "$SLUICE" ] || cargo build --release -p sluice-cli
fi
[ -x "$PY" ] || { echo "no $PY: run scripts/services.sh start moto" >&2; exit 1; }
(exec 3<>/dev/tcp/127.0.0.1/5000) 2>/dev/null || { echo "moto is not on 127.0.0.1:5000: run scripts/services.sh start moto" >&2; exit 1; }
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1

DIR=$(mktemp -d /tmp/sluice-sqs-load.XXXXXX)
MPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() { [ -n "${SLUICE_PID:-}" ] && kill "$SLUICE_PID" 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT

cat > "$DIR/sqs.py" <<'PY'
import sys, time, threading, concurrent.futures as cf, boto3
endpoint, cmd, args = sys.argv[1], sys.argv[2], sys.argv[3:]
c = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
if cmd == "fill":                       # fill NAME N → prints the queue URL
    url = c.create_queue(QueueName=args[0])["QueueUrl"]
    n = int(args[1])
    def send(first):
        # ~200-byte JSON bodies
        entries = [{"Id": str(i), "MessageBody": '{"ts":1764000000000,"device_id":"dev-%05d","temp":21.53,"humidity":40.12,"voltage":3.291,"seq":%d,"status":"ok","pad":"%s"}' % (i % 1000, i, "x" * 74)}
                   for i in range(first, min(n, first + 10))]
        assert not c.send_message_batch(QueueUrl=url, Entries=entries).get("Failed")
    with cf.ThreadPoolExecutor(8) as ex:
        list(ex.map(send, range(0, n, 10)))
    print(url)
elif cmd == "drain":                    # drain URL N THREADS → prints seconds
    url, n, threads = args[0], int(args[1]), int(args[2])
    got, lock, t0 = [0], threading.Lock(), time.time()
    def work():
        while got[0] < n:
            ms = c.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
            if ms:
                c.delete_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(ms)])
                with lock:
                    got[0] += len(ms)
    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts: t.start()
    for t in ts: t.join()
    print(time.time() - t0)
elif cmd == "delete":
    c.delete_queue(QueueUrl=args[0])
PY
sqs() { "$PY" "$DIR/sqs.py" "$ENDPOINT" "$@"; }
now() { date +%s.%N; }
rate() { python3 -c "print(f'{$1/($2):,.1f}')"; }

run_sluice() {
  local receivers=$1 url
  url=$(sqs fill "sluice-load-r$receivers-$$-$(date +%s)" "$N")
  cat > "$DIR/load.toml" <<TOML
[pipeline]
id = "sqs-load"

[sources.sqs]
type = "sqs"
queue_url = "$url"
endpoint_url = "$ENDPOINT"
receivers = $receivers
wait_time = "1s"
decode = { codec = "json", time_key = "ts", tags = ["device_id", "status"] }

[sinks.sink]
type = "blackhole"
inputs = ["sqs"]
TOML
  local t0 t1 done_n=0
  t0=$(now)
  RUST_LOG=warn "$SLUICE" run --metrics-addr "127.0.0.1:$MPORT" --status-interval 0s "$DIR/load.toml" &
  SLUICE_PID=$!
  while [ "$done_n" -lt "$N" ]; do
    sleep 0.05
    done_n=$(curl -s "http://127.0.0.1:$MPORT/metrics" | awk -F' ' '/^sluice_component_records_out_total\{component="sink"/ {print $2}')
    done_n=${done_n:-0}
    kill -0 "$SLUICE_PID" 2>/dev/null || { echo "sluice exited early" >&2; exit 1; }
  done
  t1=$(now)
  kill -INT "$SLUICE_PID"; wait "$SLUICE_PID" || true; SLUICE_PID=
  sqs delete "$url"
  echo "sluice, receivers = $receivers: $N msgs in $(python3 -c "print(f'{$t1-$t0:.1f}')") s = $(rate "$N" "$t1-$t0") msg/s"
}

run_reference() {
  local url secs
  url=$(sqs fill "ref-load-$$-$(date +%s)" "$N")
  secs=$(sqs drain "$url" "$N" "$THREADS")
  sqs delete "$url"
  echo "reference (boto3, $THREADS threads receive + DeleteMessageBatch): $N msgs in $(python3 -c "print(f'{$secs:.1f}')") s = $(rate "$N" "$secs") msg/s"
}

echo "moto $("$PY" -c 'import moto; print(moto.__version__)') at $ENDPOINT, $(nproc) cores, N=$N messages of ~200 B per case, sluice = $SLUICE"
run_reference
for r in 1 4 16; do run_sluice "$r"; done
