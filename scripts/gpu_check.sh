#!/usr/bin/env bash
# The engine's checks on a CUDA machine (not part of CI, which has no GPU): the engine tests on the GPU,
# the host-synchronisation check, the engine benchmark on a random checkpoint with OLMoE-1B-7B's
# dimensions in bfloat16, and a profile of one decode step against transformers'. Logs and JSON go to $OUT
# (default ./gpu_out). Each stage runs under its own time limit; a failed stage does not stop the next, but
# the script exits 1 naming every stage that failed (a timeout is a failure). Usage: bash scripts/gpu_check.sh [layers]
set -euo pipefail
out=${OUT:-gpu_out}
layers=${1:-16}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 QLLM_CACHE_DIR=${QLLM_CACHE_DIR:-/tmp/qllm-cache}
py=${PYTHON:-python3}
failed=()

# stage NAME COMMAND...: run it; a non-zero exit (pipefail: of any command of a pipeline) is recorded. Inside a
# function run as an `if` condition bash ignores `set -e`, so the functions below end at their first failure
# with `|| return`.
stage() {
  local name=$1
  shift
  echo "== $name"
  if ! "$@"; then
    echo "!! stage failed: $name" >&2
    failed+=("$name")
  fi
}

tests() {
  # The whole pytest output goes to the console and the log: nothing cut, its exit status kept.
  QLLM_TEST_DEVICE=cuda timeout 200 $py -m pytest -q -p no:cacheprovider -rs tests/qllm_core \
    tests/benchmarks/test_engine_bench.py 2>&1 | tee "$out/tests.log"
}

bench() {
  local start
  start=$(date +%s)
  timeout 90 $py -m benchmarks.make_checkpoint olmoe-1b-7b /tmp/olmoe --layers "$layers" --device cuda \
    --dtype bfloat16 2>&1 | tee "$out/checkpoint.log" || return
  echo "checkpoint written in $(( $(date +%s) - start )) s"
  timeout 240 $py -m benchmarks.engine_bench --model /tmp/olmoe --device cuda --dtype bfloat16 --rounds 3 \
    --trials 3 --out "$out/engine_bench_cuda.json" 2>&1 | tee "$out/bench.log"
}

profile() {
  timeout 150 $py -m benchmarks.decode_profile --model /tmp/olmoe --device cuda --dtype bfloat16 \
    > "$out/decode_profile.txt" 2>&1 || return
  grep -E "^==|launches|Self CPU time total" "$out/decode_profile.txt"
}

gpu() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" || return
  $py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$out/gpu.txt"
}

stage "GPU and versions" gpu
stage "engine tests on CUDA" tests
stage "engine benchmark, OLMoE-1B-7B shape, $layers layers, bfloat16" bench
stage "decode step profile" profile

if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED stages:%s\n' "$(printf ' [%s]' "${failed[@]}")" >&2
  exit 1
fi
echo "every stage passed"
