#!/usr/bin/env bash
# Installs the clients nobody here wrote (npm `consul`, pip `py-eureka-client`) into
# a cache outside the clone; prints that directory. Idempotent: reinstalls only when
# the pinned versions change. Used by tests/foreign_clients.rs and .ci/run.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="${BAZAAR_CACHE_DIR:-$HOME/.cache/bazaar}/foreign-clients"
stamp="$(cat "$here/package.json" "$here/package-lock.json" "$here/requirements.txt" | sha256sum | cut -c1-16)"
if [ "$(cat "$dest/stamp" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$dest" && mkdir -p "$dest"
  cp "$here/package.json" "$here/package-lock.json" "$dest/"
  (cd "$dest" && npm ci --silent --no-audit --no-fund >&2)
  python3 -m venv "$dest/venv" >&2
  "$dest/venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt" >&2
  echo "$stamp" > "$dest/stamp"
fi
echo "$dest"
