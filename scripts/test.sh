#!/usr/bin/env bash
# The whole test suite, from a fresh clone: starts the real servers the integration tests
# need (installing them if missing), then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh start
# --no-fail-fast: one failing test binary must not hide the results of the others (the
# command still exits non-zero when anything failed).
cargo test --workspace --locked --no-fail-fast "$@"
