#!/usr/bin/env bash
# Installs tansu, a Kafka-protocol broker written in Rust, that the Kafka backend's
# tests and the broker benchmark start on free ports. Cached outside the clone:
# ~/.cache/bazaar/tansu/bin/tansu (about 10 to 30 minutes to build the first time).
# `--locked` because its newest dependencies do not compile together; `dynostore`
# because its in-memory storage (`memory://`) is refused without it.
set -euo pipefail
root="${TANSU_ROOT:-$HOME/.cache/bazaar/tansu}"
version=0.6.0
if [ -x "$root/bin/tansu" ] && "$root/bin/tansu" --version 2>/dev/null | grep -q "$version"; then
  exit 0
fi
echo "installing tansu $version into $root"
cargo install --root "$root" tansu --version "$version" --locked --features dynostore,postgres
