"""Engine benchmark (not a test): decode throughput vs transformers, preemption overhead, LS TTFT under BE load.

Run: `python -m benchmarks.engine_bench --out benchmarks/results/engine_bench.json` (bench preset, a few
minutes on 2 CPU cores). Every ratio is measured in this one run, on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from qllm_core import Engine, EngineConfig, SamplingParams
from qllm_core.engine_core import EngineCore

PROMPT_BASE = [(j * 7) % 497 + 3 for j in range(4096)]


def prompt(i: int, length: int) -> list[int]:
    """A distinct deterministic prompt."""
    return [(t + 13 * i) % 497 + 3 for t in PROMPT_BASE[:length]]


def drain(core: EngineCore) -> None:
    """Step until idle."""
    while core.has_work():
        core.step()


def engine_decode_step_s(core: EngineCore, batch: int, prompt_len: int, new_tokens: int, tag: str) -> float:
    """Median wall time of one decode iteration (a whole forward pass plus sampling) at a fixed batch."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        core.add_request(f"{tag}-{i}", prompt(i, prompt_len), params, "be")
    steps = []
    while core.has_work():
        start = time.perf_counter()
        outputs = core.step()
        if outputs and all(len(o.token_ids) > 1 for o in outputs):  # a decode pass (not the prefill)
            steps.append(time.perf_counter() - start)
    return statistics.median(steps)


class _StepClock(LogitsProcessor):
    """Records when transformers' generate asks for each next token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.stamps.append(time.perf_counter())
        return scores


def hf_decode_step_s(model: Any, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Median wall time of one decode iteration inside `generate` (greedy, KV cache, no early stop)."""
    ids = torch.tensor([prompt(i, prompt_len) for i in range(batch)])
    clock = _StepClock()
    with torch.inference_mode():
        model.generate(
            ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            logits_processor=LogitsProcessorList([clock]),
        )
    return statistics.median(b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False))


def decode_comparison(model: str, path: Path, batch: int, prompt_len: int, new_tokens: int, rounds: int) -> dict:
    """Engine vs transformers decode throughput at equal batch, alternating runs; best round of each."""
    # The KV pool sized for this batch (8 x 128 tokens, with room), as transformers' cache is.
    core = EngineCore(
        EngineConfig(model=model, device="cpu", granularity="iteration", policy="fcfs", kv_cache_tokens=8192)
    )
    hf = {
        name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
        for name, kw in (
            ("transformers_default_experts", {}),
            ("transformers_eager_experts", {"experts_implementation": "eager"}),
        )
    }
    best: dict[str, float] = {}
    for r in range(rounds + 1):  # round 0 warms up
        steps = {"engine": engine_decode_step_s(core, batch, prompt_len, new_tokens, f"d{r}")}
        steps |= {name: hf_decode_step_s(m, batch, prompt_len, new_tokens) for name, m in hf.items()}
        if r:
            best = {k: min(best.get(k, v), v) for k, v in steps.items()}
    result: dict[str, Any] = {k: {"decode_step_s": v, "decode_tokens_per_s": batch / v} for k, v in best.items()}
    for name in hf:
        result[f"engine_vs_{name}"] = best[name] / best["engine"]
    return result


def be_only_throughput(model: str, granularity: str, requests: int, prompt_len: int, new_tokens: int) -> float:
    """Output tokens/s with BE-only traffic (nothing to preempt for): the cost of the preemption points."""
    core = EngineCore(EngineConfig(model=model, device="cpu", granularity=granularity, policy="qllm"))
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i in range(requests):
        core.add_request(f"w{i}", prompt(i, 16), params, "be")
    drain(core)  # warm-up
    for i in range(requests):
        core.add_request(f"r{i}", prompt(i, prompt_len), params, "be")
    start = time.perf_counter()
    drain(core)
    return requests * new_tokens / (time.perf_counter() - start)


async def _ls_ttft(engine: Engine, delay_s: float, be_requests: int, be_prompt: int) -> float:
    """TTFT of one LS request sent `delay_s` after BE prompts (or on an idle engine if be_requests=0)."""
    be_params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

    async def be(i: int) -> None:
        async for _ in engine.generate(prompt_token_ids=prompt(100 + i, be_prompt), params=be_params, priority="be"):
            pass

    tasks = [asyncio.create_task(be(i)) for i in range(be_requests)]
    await asyncio.sleep(delay_s)
    ttft = None
    ls_params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    async for out in engine.generate(prompt_token_ids=prompt(7, 32), params=ls_params, priority="ls"):
        ttft = out.ttft_s
    await asyncio.gather(*tasks)
    assert ttft is not None
    return ttft


BE_BURST_PROMPT = 3072


def ls_ttft_under_be_prefill(model: str, policy: str, granularity: str, trials: int) -> dict[str, float]:
    """Median LS TTFT idle and while one long BE prompt (BE_BURST_PROMPT tokens, one pass) is prefilling;
    the LS request arrives at a different point of that prefill in each trial."""
    engine = Engine(EngineConfig(model=model, device="cpu", policy=policy, granularity=granularity))
    try:
        idle = [asyncio.run(_ls_ttft(engine, 0.0, 0, 0)) for _ in range(trials)]
        loaded = [asyncio.run(_ls_ttft(engine, 0.1 + 0.15 * t, 1, BE_BURST_PROMPT)) for t in range(trials)]
    finally:
        engine.shutdown()
    return {"idle_ttft_s": statistics.median(idle), "loaded_ttft_s": statistics.median(loaded), "trials": trials}


def layer_time(model: str) -> dict[str, float]:
    """Wall time of the BE prefill pass of the TTFT test, and of one of its layers (pass time / layers)."""
    core = EngineCore(EngineConfig(model=model, device="cpu", granularity="layer"))
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for trial in range(3):
        core.add_request(f"t{trial}", prompt(100, BE_BURST_PROMPT), params, "be")
        start = time.perf_counter()
        drain(core)
        times.append(time.perf_counter() - start)
    pass_s = min(times)
    return {"be_prefill_pass_s": pass_s, "layer_s": pass_s / core.model.num_layers}


def main() -> None:
    """Run every measurement and write one JSON file."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="bench")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_bench.json"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per comparison; best kept")
    args = parser.parse_args()
    torch.manual_seed(0)
    results: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "model": args.model,
    }
    path = EngineCore(EngineConfig(model=args.model, device="cpu", kv_cache_tokens=64)).loaded.path
    decode = {"batch": args.batch, "prompt_len": 64, "new_tokens": 64}
    decode |= decode_comparison(args.model, path, args.batch, 64, 64, rounds=args.rounds)
    results["decode_throughput"] = decode
    print(json.dumps(decode, indent=1), flush=True)

    overhead: dict[str, Any] = {"requests": 16, "prompt_len": 256, "new_tokens": 16, "rounds": args.rounds}
    tput: dict[str, float] = {}
    for _ in range(args.rounds):  # interleaved, so slow spells of a shared machine hit every granularity
        for g in ("iteration", "layer", "expert"):
            tput[g] = max(tput.get(g, 0.0), be_only_throughput(args.model, g, 16, 256, 16))
    overhead["tokens_per_s"] = tput
    overhead["overhead_vs_iteration"] = {g: 1 - tput[g] / tput["iteration"] for g in ("layer", "expert")}
    results["be_only_granularity_overhead"] = overhead
    print(json.dumps(overhead, indent=1), flush=True)

    timing = layer_time(args.model)
    ttft: dict[str, Any] = {"be_prompt_tokens": BE_BURST_PROMPT, **timing}
    for policy, granularity in (
        ("fcfs", "iteration"),
        ("priority", "iteration"),
        ("qllm", "layer"),
        ("qllm", "expert"),
    ):
        r = ls_ttft_under_be_prefill(args.model, policy, granularity, args.trials)
        r["added_over_idle_s"] = r["loaded_ttft_s"] - r["idle_ttft_s"]
        r["added_in_layers"] = r["added_over_idle_s"] / timing["layer_s"]
        ttft[f"{policy}:{granularity}"] = r
        print(policy, granularity, json.dumps(r), flush=True)
    results["ls_ttft_during_be_prefill"] = ttft
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
