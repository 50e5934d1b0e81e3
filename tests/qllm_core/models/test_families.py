"""The family sweep: every MoE family of the installed transformers, tiny and random, through the engine.

A served family gives transformers' own greedy tokens (`generate`, eager experts, float64) for a mixed
LS/BE load under layer and expert preemption, and in float32 with the default kernels picks transformers'
top-1 token at every step; a refused family fails at load with a ConfigError that names it. The table in
docs/models.md is the sweep's outcome and must not drift from it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from qllm_core import EngineConfig
from qllm_core.engine_core import EngineCore
from qllm_core.errors import ConfigError
from qllm_core.models.families import REFUSED
from tests.conftest import DEVICE, drain
from tests.qllm_core.models.test_exactness import MAX_NEW, _mixed_load
from tests.qllm_core.models.tiny_families import (
    DOCS,
    Status,
    load_error,
    moe_families,
    render,
    save_checkpoint,
    status_of,
)

FAMILIES = moe_families()
PEOPLE_RUN = (
    "mixtral",
    "qwen2_moe",
    "olmoe",
    "qwen3_moe",
    "phimoe",
    "deepseek_v2",
    "deepseek_v3",
    "gpt_oss",
    "glm4_moe",
    "granitemoe",
)
"""Families the engine must serve (the issue's list)."""
RECURRENT = ("jamba", "qwen3_next", "nemotron_h", "granitemoehybrid", "kimi_linear", "lfm2_moe", "minimax")
"""Families whose layers keep recurrent or linear-attention state: refused, saying so."""
# Two top-1 logits closer than this (relative to the larger) are a tie that float32 rounding may break
# either way; such a step does not count against the engine.
_FLOAT32_TIE = 1e-5

Reference = Callable[..., list[int]]


class Sweep:
    """Each family's tiny checkpoint and what the engine does with it, worked out once per session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._paths: dict[str, Path] = {}
        self._errors: dict[str, ConfigError | None] = {}

    def checkpoint(self, family: str) -> Path:
        """The family's tiny random checkpoint."""
        if family not in self._paths:
            self._paths[family] = save_checkpoint(family, self.root / family)
        return self._paths[family]

    def error(self, family: str) -> ConfigError | None:
        """The ConfigError a float64 load of the family raises, or None when it loads."""
        if family not in self._errors:
            self._errors[family] = load_error(self.checkpoint(family), DEVICE)
        return self._errors[family]

    def status(self, family: str) -> Status:
        """Served, or refused with the ConfigError's reason."""
        return status_of(family, self.error(family))


@pytest.fixture(scope="session")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    """The session's family sweep."""
    return Sweep(tmp_path_factory.mktemp("sweep"))


def _served(sweep: Sweep, family: str) -> Path:
    status = sweep.status(family)
    if not status.supported:
        pytest.skip(f"{family} is refused: {status.reason}")
    return sweep.checkpoint(family)


def _engine(path: Path, dtype: str, granularity: str, spans: int) -> EngineCore:
    return EngineCore(
        EngineConfig(
            model=str(path),
            dtype=dtype,
            device=DEVICE,
            policy="qllm",
            granularity=granularity,
            expert_spans_per_layer=spans,
        )
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_is_served_token_for_token_under_preemption_or_refused_by_name(
    family: str, sweep: Sweep, reference: Reference
) -> None:
    error = sweep.error(family)
    if error is not None:
        assert str(error).startswith(f"model type {family!r} is not supported: "), str(error)
        assert sweep.status(family).reason, "a refusal says why"
        return
    path = sweep.checkpoint(family)
    # Layer granularity, and expert granularity in spans of several experts (6 experts, 2 spans).
    for granularity, spans in (("layer", 8), ("expert", 2)):
        core = _engine(path, "float64", granularity, spans)
        prompts, finals = _mixed_load(core)
        finals |= drain(core)
        assert core.stats().preemptions > 0, "the workload must actually preempt BE passes"
        for rid, prompt in prompts.items():
            expected = reference(path, torch.float64, prompt, MAX_NEW)
            assert list(finals[rid].token_ids) == expected, f"{family} {granularity}: {rid}"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_served_family_in_float32_picks_transformers_top1_at_every_step(family: str, sweep: Sweep) -> None:
    """float32 as served, the default kernels on both sides (grouped_mm): each token the engine samples
    under expert preemption is the argmax of transformers' own logits given the same prefix."""
    path = _served(sweep, family)
    core = _engine(path, "float32", "expert", 2)
    prompts, finals = _mixed_load(core)
    finals |= drain(core)
    assert core.stats().preemptions > 0
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(DEVICE).eval()
    for rid, prompt in prompts.items():
        output = list(finals[rid].token_ids)
        ids = torch.tensor([prompt + output[:-1]], device=DEVICE)
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 :]
        top2 = logits.topk(2, dim=-1)
        for step, token in enumerate(output):
            best, second = top2.values[step].tolist()
            tie = best - second <= _FLOAT32_TIE * abs(best)
            assert token == int(top2.indices[step, 0]) or tie, f"{family} {rid}: step {step}"


def test_the_families_people_run_are_served_and_recurrent_ones_refused_saying_why(sweep: Sweep) -> None:
    served = [f for f in FAMILIES if sweep.status(f).supported]
    assert set(PEOPLE_RUN) <= set(served), sorted(set(PEOPLE_RUN) - set(served))
    assert len(served) >= 20
    for family in RECURRENT:
        assert family in FAMILIES and family in REFUSED
        assert "recurrent or linear-attention state" in sweep.status(family).reason


def test_the_docs_table_is_the_sweeps_outcome(sweep: Sweep) -> None:
    table = render([sweep.status(f) for f in FAMILIES])
    assert DOCS.read_text() == table, "docs/models.md is stale: run python -m tests.qllm_core.models.tiny_families"
