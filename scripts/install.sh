#!/usr/bin/env bash
# Set-up on a fresh machine: a virtualenv in .venv with torch first (a CPU build here; an open torch
# requirement would pull a multi-GB CUDA build), then the project. `--dev` adds the test tools and
# Debian's prometheus package (server and promtool), which the monitoring tests start on loopback, and
# guidellm (below).
set -euo pipefail
cd "$(dirname "$0")/.."
dev=false
[ "${1:-}" = "--dev" ] && dev=true
# Without prometheus the monitoring tests fail (under CI=true) or skip (elsewhere): under CI this script fails
# at once instead, naming what is missing.
no_prometheus() {
  if [ "${CI:-}" = true ]; then
    echo "install.sh: $1; CI=true needs prometheus and promtool" >&2
    exit 1
  fi
  echo "install.sh: $1; the promtool tests will be skipped" >&2
}
if $dev && ! command -v promtool >/dev/null 2>&1; then
  as_root=""
  [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && as_root="sudo -n"; } || true
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$as_root" ]; }; then
    ($as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq prometheus >/dev/null) \
      || no_prometheus "could not install prometheus"
  else
    no_prometheus "promtool missing and apt-get unavailable (not root, no sudo)"
  fi
  command -v promtool >/dev/null 2>&1 || no_prometheus "promtool is still not on PATH"
fi
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q "torch==2.13.0"
if $dev; then python -m pip install -q -e '.[dev]'; else python -m pip install -q -e .; fi
# --dev: guidellm, the outside benchmark client tests/deployments/test_outside_client.py runs against the app,
# in a venv of its own (.venv/guidellm): it pins packages the project pins otherwise (click, multidict). A
# .pth file lets it reuse this venv's torch and transformers instead of pulling a CUDA torch of its own;
# what guidellm pins itself is installed in front of them, and nothing in .venv changes.
GUIDELLM_VERSION=0.8.1
clients=.venv/guidellm
if $dev && ! "$clients/bin/python" -c "import importlib.metadata as m; assert m.version('guidellm') == '$GUIDELLM_VERSION'" \
    2>/dev/null; then
  "$(python -c 'import sys; print(sys._base_executable)')" -m venv "$clients"
  purelib='import sysconfig; print(sysconfig.get_paths()["purelib"])'
  python -c "$purelib" > "$("$clients/bin/python" -c "$purelib")/_qllm_venv.pth"
  "$clients/bin/python" -m pip install -q "guidellm==$GUIDELLM_VERSION"
fi
