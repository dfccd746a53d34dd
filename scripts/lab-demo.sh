#!/usr/bin/env bash
# The main job on the lab: boots a local replica of inventory.yaml, applies, verifies and
# prints the report. Exits with verify's exit code. The lab keeps running afterwards, so it
# can be explored with `target/release/yametee-deploy lab ssh HOST`; stop it with
# `target/release/yametee-deploy lab down`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --workspace --locked

deploy=target/release/yametee-deploy
"$deploy" lab up
"$deploy" --lab apply
"$deploy" --lab verify "$@"
