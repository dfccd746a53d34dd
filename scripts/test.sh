#!/usr/bin/env bash
# The whole test suite: unit tests, the worker's integration tests against Redis and
# PostgreSQL on loopback, and the end-to-end test on the lab (lab up, apply, verify, a
# second apply that changes nothing, lab down). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --workspace --locked

# The end-to-end test deploys the release binaries, as an operator would.
export YAMETEE_DEPLOY_BINARY="$PWD/target/release/yametee-deploy"
export YAMETEE_WORKER_BINARY="$PWD/target/release/yametee-worker"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --release --workspace --locked -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "%d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
