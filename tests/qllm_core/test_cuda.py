"""On CUDA the step loop waits for the GPU only where it must: to read sampled tokens, and at `expert`
granularity once per MoE layer to learn which experts have tokens. Skipped on a machine without CUDA.

In bfloat16, the dtype a GPU serves in. In float32, torch's own `grouped_mm` (transformers' default expert
kernel) synchronised twice per MoE layer (torch 2.11, H200): that is torch's, not the engine's."""

from __future__ import annotations

import os
import traceback
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from qllm_core import EngineConfig, SamplingParams
from qllm_core.engine_core import EngineCore
from tests.conftest import drain

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Where a host synchronisation is allowed, by the engine file it happens in: reading sampled tokens, and
# (expert granularity) the group sizes of a layer's routing.
ENGINE, TESTS = f"{os.sep}qllm_core{os.sep}", f"{os.sep}tests{os.sep}"
OUTSIDE = "outside the engine"
ALLOWED = {"iteration": {"sampler.py"}, "layer": {"sampler.py"}, "expert": {"sampler.py", "staged.py"}}


def _sync_sites(core: EngineCore) -> Counter[str]:
    """Drain the core with CUDA's sync debug mode on; every synchronising call by the innermost engine
    frame it came from ("file.py:line"), or OUTSIDE when no engine frame is on the stack."""
    sites: Counter[str] = Counter()

    def record(message: Warning | str, category: type[Warning], filename: str, lineno: int, *_: object) -> None:
        if "synchroniz" not in str(message).lower():
            return
        ours = [f for f in traceback.extract_stack() if ENGINE in f.filename and TESTS not in f.filename]
        # With no engine frame on the stack it is not the step loop's: torch 2.11 on an H200 made one such
        # synchronisation in torch/cuda/__init__.py once per process.
        sites[f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else OUTSIDE] += 1

    with warnings.catch_warnings():  # restores showwarning too
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            drain(core)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites


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
    files = {site.split(":")[0] for site in sites if site != OUTSIDE}
    assert files <= ALLOWED[granularity], f"unexpected host synchronisations: {dict(sites)}"
