#!/usr/bin/env bash
# Runs each cargo-fuzz target for FUZZ_SECONDS (default 20): path normalization and
# request-head parsing under the gateway's limits (fuzz/fuzz_targets). cargo fuzz
# needs a nightly toolchain; without one this says so and skips. cargo-fuzz and the
# fuzz build are cached outside the clone.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-20}"
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "no nightly toolchain (rustup toolchain install nightly): skipping the fuzz targets"
  exit 0
fi
root="$HOME/.cache/bazaar/cargo-fuzz"
if [ ! -x "$root/bin/cargo-fuzz" ]; then
  echo "installing cargo-fuzz into $root"
  cargo install --root "$root" cargo-fuzz --locked --quiet
fi
export PATH="$root/bin:$PATH"
export CARGO_TARGET_DIR="$HOME/.cache/bazaar/fuzz-target"
for target in normalize request_head; do
  echo "fuzzing $target for ${seconds}s"
  # The corpus lives outside the clone too, so each run starts where the last ended.
  corpus="$HOME/.cache/bazaar/fuzz-corpus/$target"
  mkdir -p "$corpus"
  cargo +nightly fuzz run --fuzz-dir fuzz "$target" "$corpus" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tail -n 40
done
