#!/usr/bin/env bash
# Set-up on a fresh machine: a virtualenv in .venv with torch first (a CPU build here; an open torch
# requirement would pull a multi-GB CUDA build), then the project. `--dev` adds the test tools and
# Debian's prometheus package (server and promtool), which the monitoring tests start on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=false
[ "${1:-}" = "--dev" ] && dev=true
if $dev && ! command -v promtool >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
      || echo "install.sh: could not install prometheus; its tests will be skipped" >&2
  else
    echo "install.sh: promtool missing and apt-get unavailable (not root?); its tests will be skipped" >&2
  fi
fi
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q "torch==2.13.0"
if $dev; then python -m pip install -q -e '.[dev]'; else python -m pip install -q -e .; fi
