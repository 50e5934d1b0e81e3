"""The engine benchmark's pairing: same-round ratios with a median, and cores served pass by pass in turn."""

from __future__ import annotations

import pytest

from benchmarks.engine_bench import lockstep_passes, paired_ratio, prompt
from qllm_core import EngineConfig, SamplingParams
from qllm_core.engine_core import EngineCore


def test_paired_ratio_is_the_median_of_same_round_ratios() -> None:
    # A slow spell doubles both sides of round 2 and one side of round 3: the median ignores the split round.
    rounds = [{"x": 1.1, "base": 1.0}, {"x": 2.2, "base": 2.0}, {"x": 3.0, "base": 1.0}]
    assert paired_ratio(rounds, "x", "base") == pytest.approx(1.1)


def test_lockstep_passes_drains_every_core_one_pass_per_turn() -> None:
    cores = {
        g: EngineCore(EngineConfig(model="tiny", device="cpu", granularity=g, max_batch_size=2))
        for g in ("iteration", "expert")
    }
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    for core in cores.values():
        for i in range(3):
            core.add_request(f"r{i}", prompt(i, 8), params, "be")
    totals = lockstep_passes(cores)
    assert set(totals) == {"iteration", "expert"}
    assert all(t > 0 for t in totals.values())
    for core in cores.values():
        assert not core.has_work()
        # Batches of at most two: prefill+decode of 3 requests x 3 tokens takes more than one pass each.
        assert core.stats().passes_completed >= 5
