"""The engine's greedy output is token for token transformers' own, for every family, with and without preemption.

Mixed-load runs use float64 so that batch-shape-dependent rounding (a 1e-16 effect) can never flip an
argmax; the default tiny model is also checked in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from qllm_core import EngineConfig, SamplingParams
from qllm_core.engine_core import EngineCore
from qllm_core.outputs import RequestOutput
from tests.conftest import DEVICE, FAMILIES, drain, save_tiny

PROMPTS = [
    [5, 17, 99, 250, 3, 3, 42],
    [7],
    list(range(20, 80)),
    [300, 12, 12, 12, 8, 190, 77, 31, 2, 64, 128, 256, 11, 13],
    list(range(100, 300, 3)),
]
MAX_NEW = 12

Reference = Callable[..., list[int]]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_alone_matches_transformers(family: str, family_checkpoints: dict[str, Path], reference: Reference) -> None:
    path = family_checkpoints[family]
    core = EngineCore(EngineConfig(model=str(path), dtype="float64", device=DEVICE, granularity="expert"))
    for i, prompt in enumerate(PROMPTS):
        core.add_request(f"r{i}", prompt, SamplingParams(max_tokens=MAX_NEW, temperature=0.0), "ls")
        out = drain(core)[f"r{i}"]
        assert list(out.token_ids) == reference(path, torch.float64, prompt, MAX_NEW), f"prompt {i}"


def _mixed_load(
    core: EngineCore, before_step: Callable[[int, dict[str, RequestOutput]], None] | None = None
) -> tuple[dict[str, list[int]], dict[str, RequestOutput]]:
    """BE prompts start first; LS prompts arrive while BE passes are mid-flight, so they preempt. Returns
    the prompts and the final outputs of the requests that finished meanwhile. `before_step(step, finals)`
    may act on the engine before each step (abort a request), adding the outputs it gets to `finals`."""
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    prompts: dict[str, list[int]] = {}
    finals: dict[str, RequestOutput] = {}
    for i in (2, 4, 3):
        prompts[f"be{i}"] = PROMPTS[i]
        core.add_request(f"be{i}", PROMPTS[i], params, "be")
    for step in range(40):
        if step in (1, 5, 9, 17, 30):
            rid = f"ls{step}"
            prompts[rid] = PROMPTS[step % len(PROMPTS)]
            core.add_request(rid, prompts[rid], params, "ls")
        if before_step is not None:
            before_step(step, finals)
        finals.update((out.request_id, out) for out in core.step() if out.finished)
    return prompts, finals


# Expert granularity with 8 units runs these 6-expert models one expert per step; with 2, in spans.
@pytest.mark.parametrize(("granularity", "units"), [("layer", 8), ("expert", 8), ("expert", 2)])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mixed_load_with_preemption_matches_transformers(
    family: str, granularity: str, units: int, family_checkpoints: dict[str, Path], reference: Reference
) -> None:
    path = family_checkpoints[family]
    core = EngineCore(
        EngineConfig(
            model=str(path),
            dtype="float64",
            device=DEVICE,
            policy="qllm",
            granularity=granularity,
            expert_spans_per_layer=units,
        )
    )
    prompts, finals = _mixed_load(core)
    finals |= drain(core)
    assert core.stats().preemptions > 0, "the workload must actually preempt BE passes"
    for rid, prompt in prompts.items():
        assert list(finals[rid].token_ids) == reference(path, torch.float64, prompt, MAX_NEW), rid


def test_merged_passes_match_transformers(family_checkpoints: dict[str, Path], reference: Reference) -> None:
    path = family_checkpoints["mixtral"]
    core = EngineCore(
        EngineConfig(model=str(path), dtype="float64", device=DEVICE, granularity="layer", merge_ls_into_be=True)
    )
    prompts, finals = _mixed_load(core)
    finals |= drain(core)
    assert core.stats().merges > 0, "an LS pass must have joined a suspended BE pass"
    for rid, prompt in prompts.items():
        assert list(finals[rid].token_ids) == reference(path, torch.float64, prompt, MAX_NEW), rid


@pytest.mark.parametrize(("granularity", "units"), [("expert", 8), ("expert", 3), ("layer", 8)])
def test_default_tiny_model_float32_under_preemption(granularity: str, units: int, reference: Reference) -> None:
    """float32, as served, against transformers' default expert kernel (grouped_mm). Layer granularity runs
    the model's own experts module, so that kernel; expert granularity runs it too in passes the policy
    could never preempt (decodes); in the others, spans of experts (one expert each with 8 units for its 8
    experts) run through the same `grouped_mm`, span by span."""
    core = EngineCore(
        EngineConfig(
            model="tiny", dtype="float32", device=DEVICE, granularity=granularity, expert_spans_per_layer=units
        )
    )
    prompts, finals = _mixed_load(core)
    finals |= drain(core)
    assert core.stats().preemptions > 0
    for rid, prompt in prompts.items():
        expected = reference(core.loaded.path, torch.float32, prompt, MAX_NEW, None)
        assert list(finals[rid].token_ids) == expected, rid


def test_sliding_window_matches_transformers(tmp_path: Path, reference: Reference) -> None:
    """A window shorter than the prompts: prefill and batched decode (contexts of unequal length) both
    see only the last `sliding_window` positions, as transformers' attention does."""
    torch.manual_seed(1234)
    model = FAMILIES["mixtral"]()
    model.config.sliding_window = 6
    save_tiny(model, tmp_path)
    core = EngineCore(EngineConfig(model=str(tmp_path), dtype="float64", device=DEVICE, granularity="iteration"))
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    for i, prompt in enumerate(PROMPTS):
        core.add_request(f"r{i}", prompt, params, "ls")
    finals = drain(core)
    for i, prompt in enumerate(PROMPTS):
        assert list(finals[f"r{i}"].token_ids) == reference(tmp_path, torch.float64, prompt, MAX_NEW), f"prompt {i}"
