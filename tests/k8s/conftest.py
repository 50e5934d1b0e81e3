"""The generators are a package in k8s/ (k8s/qllm_k8s, run by the script k8s/generate.py), not an installed
one: `python k8s/generate.py` finds it beside the script, and the tests find it the same way."""

from __future__ import annotations

import sys
from pathlib import Path

K8S = Path(__file__).resolve().parents[2] / "k8s"
if str(K8S) not in sys.path:
    sys.path.insert(0, str(K8S))
