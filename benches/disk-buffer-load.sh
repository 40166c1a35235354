#!/usr/bin/env bash
# Disk buffer load run (a measurement, not a timed test): issue 12's "done when" scenario at full
# size, through the release binary and the shared mosquitto (scripts/services.sh start).
#
#   benches/disk-buffer-load.sh            # 3 runs × 66,667 QoS 1 messages = 200,001
#   PER_RUN=20000 benches/disk-buffer-load.sh
#
# mqtt (QoS 1, max_inflight = 100 like AWS IoT Core) → raw file sink, and → disk-buffered dedupe
# → aggregate (1 h window) → rollups. Run 1 is killed with SIGKILL when half of its messages
# are in the raw sink and restarted; run 2 ends with SIGINT (no partial rollup may be written);
# run 3 closes the hour. It checks that the raw sink has every message, that the one hourly
# rollup equals a recomputation (count and sum), and that each process's peak RSS stays under
# 100 MiB; it prints each run's rate and peak RSS. It is the suite's test
# `hour_window_behind_a_disk_buffer_survives_kill_and_restart` at a larger size.
set -euo pipefail
cd "$(dirname "$0")/.."
PER_RUN=${PER_RUN:-66667}
SLUICE_LOAD_PER_RUN=$PER_RUN cargo test --release -p sluice-cli --test disk_buffer \
  hour_window_behind_a_disk_buffer_survives_kill_and_restart -- --nocapture 2>&1 \
  | grep -E "disk buffer (load|test)|panicked|test result|assert"
