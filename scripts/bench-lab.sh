#!/usr/bin/env bash
# Times the main job on the lab, step by step, and prints the figures: lab up (base image
# cached), a second lab up, a cold apply, a no-op apply, an apply after one setting changed,
# a plan, verify with the end-to-end probe latency and the worker's memory, and lab down.
# With SCALES="1 5 20" it then times, for a lab of each number of worker hosts beside the
# data stores and the web host: lab up, a cold and a no-op apply, and verify. Needs root;
# takes the lab down at the end.
# Run `cargo build --release --workspace` first.
set -euo pipefail
cd "$(dirname "$0")/.."

deploy=$PWD/target/release/yametee-deploy
[ -x "$deploy" ] || { echo "error: $deploy not found; run cargo build --release --workspace" >&2; exit 2; }
scales=${SCALES:-}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

now() { date +%s.%N; }
elapsed() { awk -v start="$1" -v end="$2" 'BEGIN { printf "%.2f", end - start }'; }

step() {
  local name=$1; shift
  local start end
  start=$(now)
  "$@" > "$scratch/out" 2> "$scratch/err" || { cat "$scratch/err" >&2; echo "error: $name failed" >&2; exit 1; }
  end=$(now)
  printf '%-34s %8s s\n' "$name" "$(elapsed "$start" "$end")"
}

grep -q 'concurrency: 4' inventory.yaml || { echo "error: inventory.yaml no longer sets concurrency: 4" >&2; exit 2; }
sed 's/concurrency: 4/concurrency: 2/' inventory.yaml > "$scratch/changed.yaml"

"$deploy" lab down > /dev/null 2>&1
echo "machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), load $(cut -d' ' -f1 /proc/loadavg)"
step "lab up (fresh hosts)" "$deploy" lab up
step "lab up (already up)" "$deploy" lab up
step "apply (cold)" "$deploy" --lab apply
step "apply (no changes)" "$deploy" --lab apply
step "apply (one setting changed)" "$deploy" -i "$scratch/changed.yaml" --lab apply
step "apply (setting back)" "$deploy" --lab apply
step "plan (in sync)" "$deploy" --lab plan --detailed-exitcode
step "verify" "$deploy" --lab --format json verify
python3 - "$scratch/out" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
checks = {c["id"]: c for h in report["hosts"] for c in h["checks"]}
print(f'{"  probe job":<34} {checks["e2e.probe-job"]["detail"]}')
print(f'{"  worker memory":<34} {checks["worker.memory"]["detail"]}')
print(f'{"  results":<34} {sum(len(h["checks"]) for h in report["hosts"])}, ok={report["ok"]}')
PY
step "lab down" "$deploy" lab down

# The deployment other tools were compared on (worker unit, env file, binary, ufw rules, Redis
# drop-in) has no PostgreSQL settings: fresh hosts again, PostgreSQL converged first, untimed.
step "lab up (fresh hosts)" "$deploy" lab up
"$deploy" --lab --limit postgres apply > /dev/null 2>&1 || { echo "error: apply --limit postgres failed" >&2; exit 1; }
step "apply (cold, PostgreSQL already set)" "$deploy" --lab --limit web,redis,worker apply
step "lab down" "$deploy" lab down

# Scale: the same inventory with the one worker replaced by N workers, from .100 upwards.
for count in $scales; do
  python3 - "$count" > "$scratch/scaled.yaml" <<'PY'
import sys
count = int(sys.argv[1])
text = open("inventory.yaml").read()
head, _, _ = text.partition("  worker:\n    address: 192.168.120.45")
workers = "".join(
    f"  worker-{i}:\n    address: 192.168.120.{99 + i}\n    roles: [worker]\n" for i in range(1, count + 1)
)
print(head + workers, end="")
PY
  echo "lab of $count worker hosts"
  step "lab up ($count workers)" "$deploy" -i "$scratch/scaled.yaml" lab up
  step "apply (cold, $count workers)" "$deploy" -i "$scratch/scaled.yaml" --lab apply
  step "apply (no changes, $count workers)" "$deploy" -i "$scratch/scaled.yaml" --lab apply
  step "verify ($count workers)" "$deploy" -i "$scratch/scaled.yaml" --lab verify
  # The default hybrid post-quantum key exchange costs about ten times the CPU of
  # curve25519-sha256 per connection, and here one machine runs both ends of every one.
  sed 's/^    sudo: true$/&\n    key_exchange: curve25519-sha256/' "$scratch/scaled.yaml" > "$scratch/kex.yaml"
  grep -q key_exchange "$scratch/kex.yaml" || { echo "error: cannot set key_exchange" >&2; exit 2; }
  step "apply (no changes, curve25519)" "$deploy" -i "$scratch/kex.yaml" --lab apply
  step "verify (curve25519)" "$deploy" -i "$scratch/kex.yaml" --lab verify
  step "lab down" "$deploy" lab down
done
