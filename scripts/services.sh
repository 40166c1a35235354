#!/usr/bin/env bash
# Installs, starts and stops the real servers the integration tests talk to, each on 127.0.0.1.
# Idempotent: `start` installs what is missing and starts what is not already listening.
#
#   scripts/services.sh start [SERVICE...]   install if needed, start, wait until ready
#   scripts/services.sh stop [SERVICE...]
#   scripts/services.sh restart SERVICE      stop then start (data kept where the server keeps it)
#   scripts/services.sh status
#
# Services: mosquitto (MQTT, 1883), moto (S3 and other AWS APIs, 5000; its venv also holds
# DuckDB + httpfs, pyarrow and awscli, the independent readers the tests verify output with). State, logs and pid files live under
# $SLUICE_SERVICES_DIR (default /tmp/sluice-services). victoriametrics (InfluxDB 2.x write API
# /api/v2/write, read back through /api/v1/export, 8428). tansu (Kafka-compatible broker, 9092;
# built once with `cargo install` into $SLUICE_TANSU_ROOT, default ~/.cache/sluice/tansu).
# postgres (PostgreSQL 15 from Debian, 5432; a cluster of its own under $DIR/postgres, run as
# the `postgres` OS user when this script runs as root; user/password/database sluice/sluice/
# sluice over TCP with scram-sha-256).
set -euo pipefail

DIR="${SLUICE_SERVICES_DIR:-/tmp/sluice-services}"
ALL_SERVICES=(mosquitto moto victoriametrics tansu postgres)
mkdir -p "$DIR"

log() { echo "[services] $*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local name=$1 port=$2 tries=${3:-100}
  for _ in $(seq "$tries"); do
    if port_open "$port"; then return 0; fi
    sleep 0.1
  done
  log "$name did not open port $port; last log lines:"
  tail -n 20 "$DIR/$name.log" >&2 || true
  return 1
}

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# --- mosquitto -------------------------------------------------------------------------------
mosquitto_start() {
  apt_install mosquitto mosquitto-clients
  if port_open 1883; then log "mosquitto already listening on 1883"; return 0; fi
  mkdir -p "$DIR/mosquitto/data"
  # Unlimited per-client queue and in-flight window: the defaults (1000 queued, 20 in flight)
  # silently drop messages for slow or offline persistent sessions (see README, MQTT).
  # `user`: started as root, mosquitto would switch to the `mosquitto` user, which cannot write
  # the persistence file or the log under $DIR (sessions would be lost on restart).
  cat > "$DIR/mosquitto/mosquitto.conf" <<CONF
user $(id -un)
listener 1883 127.0.0.1
allow_anonymous true
persistence true
persistence_location $DIR/mosquitto/data/
autosave_interval 1
max_queued_messages 0
max_inflight_messages 0
log_dest file $DIR/mosquitto.log
CONF
  mosquitto -c "$DIR/mosquitto/mosquitto.conf" -d
  wait_port mosquitto 1883
  pgrep -f "mosquitto -c $DIR/mosquitto/mosquitto.conf" > "$DIR/mosquitto.pid" || true
  log "mosquitto ready on 127.0.0.1:1883"
}

mosquitto_stop() {
  pkill -f "mosquitto -c $DIR/mosquitto/mosquitto.conf" 2>/dev/null || true
  for _ in $(seq 50); do port_open 1883 || break; sleep 0.1; done
}

mosquitto_status() { port_open 1883 && echo "mosquitto: up (127.0.0.1:1883)" || echo "mosquitto: down"; }

# --- moto (S3 on 5000) + the Python readers used to verify output ---------------------------
# One venv under $DIR/venv: moto's server, DuckDB 1.4.4 with its httpfs extension shipped as a
# PyPI package (INSTALL httpfs would download, which fails offline), pyarrow and the AWS CLI.
VENV="$DIR/venv"
MOTO_PACKAGES=('moto[server]' 'duckdb==1.4.4' 'duckdb-ext-httpfs==1.4.4.20260205' pyarrow awscli)

moto_install() {
  if [ -x "$VENV/bin/moto_server" ] && [ -f "$VENV/.sluice-packages" ] \
     && [ "$(cat "$VENV/.sluice-packages")" = "${MOTO_PACKAGES[*]}" ]; then return 0; fi
  log "installing ${MOTO_PACKAGES[*]} into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${MOTO_PACKAGES[@]}"
  echo "${MOTO_PACKAGES[*]}" > "$VENV/.sluice-packages"
}

moto_start() {
  moto_install
  if port_open 5000 && port_open 5001; then log "moto already listening on 5000 (+5001)"; return 0; fi
  if port_open 5000; then log "moto on 5000 lacks the Timestream read-back port 5001: restarting it"; moto_stop; fi
  # scripts/moto_server.py: moto in-process, plus GET :5001/timestream/<db>/<table> (the records
  # moto stored; its timestream-query returns nothing). setsid: the server outlives this script.
  setsid "$VENV/bin/python" "$(dirname "${BASH_SOURCE[0]}")/moto_server.py" --host 127.0.0.1 --port 5000 \
    --dump-port 5001 >> "$DIR/moto.log" 2>&1 < /dev/null &
  echo $! > "$DIR/moto.pid"
  wait_port moto 5000 300
  wait_port moto 5001 100
  log "moto ready on 127.0.0.1:5000 (S3 path-style, credentials test/test, region us-east-1)"
}

moto_stop() {
  if [ -f "$DIR/moto.pid" ]; then kill "$(cat "$DIR/moto.pid")" 2>/dev/null || true; rm -f "$DIR/moto.pid"; fi
  for _ in $(seq 50); do port_open 5000 || break; sleep 0.1; done
}

moto_status() { port_open 5000 && port_open 5001 && echo "moto: up (127.0.0.1:5000, Timestream read-back 5001)" || echo "moto: down"; }

# --- victoriametrics (InfluxDB /api/v2/write on 8428) ------------------------------------------
# Stands in for InfluxDB 2.x (Debian's influxdb is 1.x, without /api/v2/write). Retention 100y so
# simulator data with old timestamps is kept; latencyOffset 0 so reads see data right after
# GET /internal/force_flush.
victoriametrics_start() {
  apt_install victoria-metrics
  if port_open 8428; then log "victoriametrics already listening on 8428"; return 0; fi
  mkdir -p "$DIR/vm"
  setsid victoria-metrics -httpListenAddr=127.0.0.1:8428 -storageDataPath="$DIR/vm" \
    -retentionPeriod=100y -search.latencyOffset=0s >> "$DIR/victoriametrics.log" 2>&1 < /dev/null &
  echo $! > "$DIR/victoriametrics.pid"
  wait_port victoriametrics 8428 300
  log "victoriametrics ready on 127.0.0.1:8428 (InfluxDB write API: /api/v2/write)"
}

victoriametrics_stop() {
  if [ -f "$DIR/victoriametrics.pid" ]; then
    kill "$(cat "$DIR/victoriametrics.pid")" 2>/dev/null || true
    rm -f "$DIR/victoriametrics.pid"
  fi
  for _ in $(seq 100); do port_open 8428 || break; sleep 0.1; done
}

victoriametrics_status() { port_open 8428 && echo "victoriametrics: up (127.0.0.1:8428)" || echo "victoriametrics: down"; }

# --- tansu (Kafka API on 9092) ----------------------------------------------------------------
# A Kafka-compatible broker written in Rust (Apache-2.0); in-memory storage, so every start is
# empty. Built from crates.io once (debug build: ~4 min; a release build takes far longer) and
# cached outside the checkout so fresh clones reuse it.
TANSU_VERSION=0.6.0
TANSU_ROOT="${SLUICE_TANSU_ROOT:-$HOME/.cache/sluice/tansu}"
TANSU="$TANSU_ROOT/bin/tansu"

tansu_install() {
  if [ -x "$TANSU" ] && "$TANSU" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then return 0; fi
  log "building tansu $TANSU_VERSION with cargo install (a few minutes, once)"
  apt_install pkg-config
  cargo install "tansu@$TANSU_VERSION" --locked --features dynostore --debug --quiet \
    --root "$TANSU_ROOT" --target-dir "$TANSU_ROOT/target"
  rm -rf "$TANSU_ROOT/target"
}

tansu_start() {
  tansu_install
  if port_open 9092; then log "tansu already listening on 9092"; return 0; fi
  setsid "$TANSU" broker --listener-url tcp://127.0.0.1:9092 \
    --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine memory://tansu/ \
    >> "$DIR/tansu.log" 2>&1 < /dev/null &
  echo $! > "$DIR/tansu.pid"
  wait_port tansu 9092 300
  log "tansu ready on 127.0.0.1:9092 (Kafka API, in-memory storage)"
}

tansu_stop() {
  if [ -f "$DIR/tansu.pid" ]; then kill "$(cat "$DIR/tansu.pid")" 2>/dev/null || true; rm -f "$DIR/tansu.pid"; fi
  pkill -f "$TANSU broker" 2>/dev/null || true
  for _ in $(seq 100); do port_open 9092 || break; sleep 0.1; done
}

tansu_status() { port_open 9092 && echo "tansu: up (127.0.0.1:9092)" || echo "tansu: down"; }

# --- postgres (PostgreSQL 15 on 5432) --------------------------------------------------------
# Debian's package ships the server binaries only under /usr/lib/postgresql/<major>/bin and
# starts nothing without systemd. PostgreSQL refuses to run as root, so as root the cluster
# belongs to the `postgres` OS user the package creates. Socket in $DIR/postgres, TCP only on
# 127.0.0.1; role `sluice` (superuser, password `sluice`), database `sluice`.
PG_PORT=5432
PG_DIR="$DIR/postgres"

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

# Runs a PostgreSQL binary as the cluster's owner.
pg_as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

postgres_start() {
  apt_install postgresql
  local bin; bin=$(pg_bin)
  if port_open "$PG_PORT"; then
    if [ -f "$PG_DIR/data/PG_VERSION" ] && pg_as_owner "$bin/pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1; then
      log "postgres already listening on $PG_PORT"; return 0
    fi
    # Where systemd runs, installing the package starts Debian's own cluster on 5432.
    log "port $PG_PORT is taken by another PostgreSQL (Debian's default cluster? stop it with: pg_ctlcluster $(basename "$(dirname "$bin")") main stop)"
    return 1
  fi
  mkdir -p "$PG_DIR"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$PG_DIR"
  if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
    log "creating a PostgreSQL cluster in $PG_DIR/data"
    echo sluice > "$PG_DIR/pwfile"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$PG_DIR/pwfile"
    pg_as_owner "$bin/initdb" -D "$PG_DIR/data" -U sluice --pwfile="$PG_DIR/pwfile" \
      --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >> "$PG_DIR/initdb.log" 2>&1
    rm -f "$PG_DIR/pwfile"
    cat >> "$PG_DIR/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DIR'
max_connections = 200
fsync = on
CONF
  fi
  touch "$DIR/postgres.log"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$DIR/postgres.log"
  pg_as_owner "$bin/pg_ctl" -D "$PG_DIR/data" -l "$DIR/postgres.log" -w -t 60 start >/dev/null
  wait_port postgres "$PG_PORT" 300
  if ! pg_as_owner "$bin/psql" -h "$PG_DIR" -p "$PG_PORT" -U sluice -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = 'sluice'" | grep -q 1; then
    pg_as_owner "$bin/createdb" -h "$PG_DIR" -p "$PG_PORT" -U sluice sluice
  fi
  log "postgres ready on 127.0.0.1:$PG_PORT (postgres://sluice:sluice@127.0.0.1:$PG_PORT/sluice)"
}

postgres_stop() {
  local bin; bin=$(pg_bin)
  if [ -n "$bin" ] && [ -f "$PG_DIR/data/postmaster.pid" ]; then
    pg_as_owner "$bin/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
  for _ in $(seq 100); do port_open "$PG_PORT" || break; sleep 0.1; done
}

postgres_status() { port_open "$PG_PORT" && echo "postgres: up (127.0.0.1:$PG_PORT, user/password/db sluice)" || echo "postgres: down"; }

# --- dispatch ----------------------------------------------------------------------------------
cmd=${1:-status}
shift || true
services=("$@")
[ ${#services[@]} -eq 0 ] && services=("${ALL_SERVICES[@]}")
for s in "${services[@]}"; do
  case " ${ALL_SERVICES[*]} " in *" $s "*) ;; *) log "unknown service $s (known: ${ALL_SERVICES[*]})"; exit 2;; esac
done
case "$cmd" in
  start) for s in "${services[@]}"; do "${s}_start"; done ;;
  stop) for s in "${services[@]}"; do "${s}_stop"; done ;;
  restart) for s in "${services[@]}"; do "${s}_stop"; "${s}_start"; done ;;
  status) for s in "${services[@]}"; do "${s}_status"; done ;;
  *) echo "usage: $0 start|stop|restart|status [SERVICE...]" >&2; exit 2 ;;
esac
