"""On CUDA the step loop waits for the GPU only where it must: to read sampled tokens, and at `expert`
granularity once per MoE layer to learn which experts have tokens. Skipped on a machine without CUDA.

In bfloat16, the dtype a GPU serves in. In float32, torch's own `grouped_mm` (transformers' default expert
kernel) synchronised twice per MoE layer (torch 2.11, H200): that is torch's, not the engine's."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from qllm_core import EngineConfig, SamplingParams
from qllm_core.engine_core import EngineCore
from tests.conftest import drain

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Where a host synchronisation is allowed, by file: reading sampled tokens, and (expert granularity) the
# group sizes of a layer's routing.
ALLOWED = {
    "iteration": {"qllm_core/sampler.py"},
    "layer": {"qllm_core/sampler.py"},
    "expert": {"qllm_core/sampler.py", "models/staged.py"},
}


def _sync_sites(core: EngineCore) -> Counter[tuple[str, int]]:
    """Drain the core with CUDA's sync debug mode on; every synchronising call by (folder/file, line)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            drain(core)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return Counter((Path(w.filename).name, w.lineno) for w in caught if "synchroniz" in str(w.message).lower())


@pytest.mark.parametrize("granularity", ["iteration", "layer", "expert"])
def test_steps_synchronise_only_to_sample_and_to_group_experts(granularity: str) -> None:
    core = EngineCore(
        EngineConfig(model="tiny", device="cuda", dtype="bfloat16", policy="qllm", granularity=granularity)
    )
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, top_k=20, seed=3, ignore_eos=True)
    core.add_request("warm", list(range(3, 40)), greedy, "be")
    drain(core)  # first-use allocations and library handles stay out of the count

    for i in range(4):
        core.add_request(f"be-{i}", [(7 * i + t) % 300 + 3 for t in range(200)], sampled if i % 2 else greedy, "be")
    core.add_request("ls", list(range(5, 25)), greedy, "ls")
    sites = _sync_sites(core)

    assert sites, "sync debug mode reported nothing: the check itself is not working"
    files = {name for name, _ in sites}
    assert files <= ALLOWED[granularity], f"unexpected host synchronisations: {dict(sites)}"
