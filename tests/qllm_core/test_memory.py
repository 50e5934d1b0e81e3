"""A burst far beyond KV capacity is served completely, within the pool, with the books balanced."""

from __future__ import annotations

import random

from qllm_core import EngineConfig, FinishReason, SamplingParams
from qllm_core.engine_core import EngineCore
from qllm_core.request import RequestState
from tests.conftest import DEVICE, drain


def _burst(core: EngineCore, n: int) -> dict[str, list[int]]:
    rng = random.Random(7)
    prompts = {}
    for i in range(n):
        rid = f"r{i}"
        prompts[rid] = [rng.randrange(3, 500) for _ in range(rng.randrange(10, 60))]
        params = SamplingParams(max_tokens=rng.randrange(4, 24), temperature=0.0, ignore_eos=True)
        core.add_request(rid, prompts[rid], params, "ls" if i % 4 == 0 else "be")
    return prompts


def test_burst_beyond_kv_capacity_is_served_completely() -> None:
    # 16 blocks of 16 tokens; 80 requests want ~6000 tokens of KV in all.
    small = EngineCore(
        EngineConfig(model="tiny", device=DEVICE, dtype="float64", kv_cache_tokens=256, block_size=16, max_batch_size=8)
    )
    prompts = _burst(small, 80)
    finals: dict[str, object] = {}
    peak_used = 0
    while small.has_work():
        for out in small.step():
            if out.finished:
                finals[out.request_id] = out
        small.audit()  # the KV books, and the per-state request counts against a recount
        peak_used = max(peak_used, small.kv.used_blocks)
        running = sum(r.state is RequestState.RUNNING for r in small.requests.values())
        assert running <= 2 * small.config.max_batch_size  # an active pass plus at most one suspended
    assert set(finals) == set(prompts)
    assert all(o.finish_reason is FinishReason.LENGTH for o in finals.values())  # type: ignore[attr-defined]
    assert peak_used <= small.kv.num_blocks and small.kv.used_blocks == 0
    assert small.metrics.evictions.labels("best_effort")._value.get() > 0, "the burst must force evictions"

    # Evicted-and-recomputed requests still produce exactly what an unconstrained engine produces.
    big = EngineCore(EngineConfig(model="tiny", device=DEVICE, dtype="float64"))
    _burst(big, 80)
    expected = drain(big)
    assert {k: v.token_ids for k, v in finals.items()} == {k: v.token_ids for k, v in expected.items()}  # type: ignore[attr-defined]


def test_request_counts_stay_exact_through_preemption_eviction_and_aborts() -> None:
    core = EngineCore(
        EngineConfig(model="tiny", device=DEVICE, kv_cache_tokens=256, block_size=16, granularity="expert")
    )
    prompts = _burst(core, 30)
    for step in range(10_000):
        if not core.has_work():
            break
        if step % 7 == 3:  # abort some requests wherever they are: queued, ready or inside a pass
            victim = f"r{step % 30}"
            core.abort(victim)
        core.step()
        core.audit()
        counts = core.stats().classes.values()
        assert sum(c.waiting + c.ready + c.running for c in counts) == len(core.requests)
    assert not core.has_work() and len(prompts) == 30
