#!/usr/bin/env bash
# Installs, starts and stops the real servers the integration tests talk to, each on 127.0.0.1.
# Idempotent: `start` installs what is missing and starts what is not already listening.
#
#   scripts/services.sh start [SERVICE...]   install if needed, start, wait until ready
#   scripts/services.sh stop [SERVICE...]
#   scripts/services.sh restart SERVICE      stop then start (data kept where the server keeps it)
#   scripts/services.sh status
#
# Services: mosquitto (MQTT, 1883). State, logs and pid files live under
# $SLUICE_SERVICES_DIR (default /tmp/sluice-services).
set -euo pipefail

DIR="${SLUICE_SERVICES_DIR:-/tmp/sluice-services}"
ALL_SERVICES=(mosquitto)
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
  cat > "$DIR/mosquitto/mosquitto.conf" <<CONF
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
