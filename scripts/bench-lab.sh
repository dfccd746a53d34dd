#!/usr/bin/env bash
# Times the main job on the lab, step by step, and prints the figures: lab up (base image
# cached), a second lab up, the first and second apply, verify with the end-to-end probe
# latency and the worker's memory, and lab down. Needs root; takes the lab down at the end.
# Run `cargo build --release --workspace` first.
set -euo pipefail
cd "$(dirname "$0")/.."

deploy=target/release/yametee-deploy
[ -x "$deploy" ] || { echo "error: $deploy not found; run cargo build --release --workspace" >&2; exit 2; }
runs=${RUNS:-1}

now() { date +%s.%N; }
elapsed() { awk -v start="$1" -v end="$2" 'BEGIN { printf "%.2f", end - start }'; }

step() {
  local name=$1; shift
  local start end
  start=$(now)
  "$@" > /tmp/bench-lab.out 2> /tmp/bench-lab.err || { cat /tmp/bench-lab.err >&2; echo "error: $name failed" >&2; exit 1; }
  end=$(now)
  printf '%-28s %8s s\n' "$name" "$(elapsed "$start" "$end")"
}

"$deploy" lab down > /dev/null 2>&1
echo "machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
for run in $(seq 1 "$runs"); do
  echo "run $run"
  step "lab up (cold hosts)" "$deploy" lab up
  step "lab up (already up)" "$deploy" lab up
  step "apply (first)" "$deploy" --lab apply
  step "apply (no changes)" "$deploy" --lab apply
  step "plan (in sync)" "$deploy" --lab plan --detailed-exitcode
  step "verify" "$deploy" --lab --format json verify
  python3 - /tmp/bench-lab.out <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
checks = {c["id"]: c for h in report["hosts"] for c in h["checks"]}
print(f'{"  probe job":<28} {checks["e2e.probe-job"]["detail"]}')
print(f'{"  worker memory":<28} {checks["worker.memory"]["detail"]}')
print(f'{"  checks":<28} {len(checks)} distinct ids, ok={report["ok"]}')
PY
  step "lab down" "$deploy" lab down
done
