#!/usr/bin/env bash
# Installs what building yametee-deploy and running its lab and tests need on a Debian
# machine, as root. Safe to run again: it installs only what is missing.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "error: run as root: the lab boots systemd-nspawn containers and network namespaces" >&2
  exit 2
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found; install a Rust toolchain (1.85 or newer) with rustup first" >&2
  exit 2
fi

# debootstrap builds the lab's base image, systemd-container provides systemd-nspawn,
# iproute2 the network namespaces; redis-server and postgresql serve the worker's own
# integration tests on loopback.
packages=(debootstrap systemd-container iproute2 openssh-client redis-server redis-tools
          postgresql postgresql-client ca-certificates)
missing=()
for package in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null || true)
  [ "$status" = "installed" ] || missing+=("$package")
done

if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  # Keep package scripts from starting Redis and PostgreSQL on this machine: the tests start
  # their own servers, and the lab hosts run theirs.
  policy=/usr/sbin/policy-rc.d
  own_policy=false
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    own_policy=true
  fi
  trap '[ "$own_policy" = true ] && rm -f "$policy"' EXIT
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
