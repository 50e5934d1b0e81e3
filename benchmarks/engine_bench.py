"""Engine benchmark (not a test): decode throughput vs transformers, preemption overhead, LS TTFT under BE load.

Run: `python -m benchmarks.engine_bench --out benchmarks/results/engine_bench.json` (bench preset, a few
minutes on 2 CPU cores). Every ratio is measured in this one run, on this machine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from benchmarks.json_form import write_result
from benchmarks.script_args import add_engine_arguments, add_out_argument, count, script_parser
from qllm_core import Engine, EngineConfig, Granularity, SamplingParams
from qllm_core.engine_core import EngineCore
from qllm_core.models.registry import LoadedModel, load_model

PROMPT_BASE = [(j * 7) % 497 + 3 for j in range(4096)]


def prompt(i: int, length: int) -> list[int]:
    """A distinct deterministic prompt."""
    return [(t + 13 * i) % 497 + 3 for t in PROMPT_BASE[:length]]


def synchronize(core: EngineCore) -> None:
    """Wait for the core's device: on CUDA a host clock must not stop while queued GPU work runs."""
    if core.loaded.device.type == "cuda":
        torch.cuda.synchronize(core.loaded.device)


def drain(core: EngineCore) -> None:
    """Step until idle."""
    while core.has_work():
        core.step()


class _Lockstep(LogitsProcessor):
    """Runs one engine step each time transformers' `generate` asks for a next token, and times both.

    The two decodes then alternate step by step, so a slow spell of a shared machine lands on both alike.
    `generate`'s own step is the time from leaving one call to entering the next.
    """

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.engine_steps: list[float] = []
        self.hf_steps: list[float] = []
        self._left: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        synchronize(self.core)  # generate's step ends when its logits exist, not when it has queued them
        entered = time.perf_counter()
        if self._left is not None:
            self.hf_steps.append(entered - self._left)
        if self.core.has_work():
            self.core.step()
            synchronize(self.core)
            self.engine_steps.append(time.perf_counter() - entered)
        self._left = time.perf_counter()
        return scores


def decode_lockstep(core: EngineCore, model: Any, batch: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
    """Median decode step time of the engine and of `generate` (greedy, KV cache, no early stop), in lockstep."""
    # One more token than generate: after its prefill pass the engine owes exactly `new_tokens` decode steps.
    params = SamplingParams(max_tokens=new_tokens + 1, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        core.add_request(f"d-{i}", prompt(i, prompt_len), params, "be")
    core.step()  # the prefill pass, at iteration granularity one step
    clock = _Lockstep(core)
    ids = torch.tensor([prompt(i, prompt_len) for i in range(batch)], device=core.loaded.device)
    with torch.inference_mode():
        model.generate(
            ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            logits_processor=LogitsProcessorList([clock]),
        )
    drain(core)
    return {"engine": statistics.median(clock.engine_steps), "transformers": statistics.median(clock.hf_steps)}


def paired_ratio(rounds: list[dict[str, float]], name: str, baseline: str) -> float:
    """Median over rounds of `name / baseline` measured in the same round.

    A slow spell that splits a round skews that round's ratio only; the median drops it.
    """
    return statistics.median(r[name] / r[baseline] for r in rounds)


def transformers_twin(core: EngineCore, **kwargs: Any) -> Any:
    """The engine's model as transformers loads it (`kwargs` to `from_pretrained`), reading the very same
    weight tensors as the engine: where a copy lands in memory (pages, alignment) moves a weight-bound
    decode step by a few percent, which would otherwise pass for a difference between the two."""
    loaded = core.loaded
    model = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=loaded.dtype, device_map=loaded.device, **kwargs)
    model.load_state_dict(core.model.adapter.model.state_dict(), assign=True)
    return model.eval()


def decode_comparison(
    base: EngineConfig, loaded: LoadedModel, batch: int, prompt_len: int, new_tokens: int, rounds: int
) -> dict:
    """Engine vs transformers decode step time at equal batch: lockstep runs against each expert kernel."""
    # The KV pool sized for this batch (8 x 128 tokens, with room), as transformers' cache is.
    config = dataclasses.replace(base, granularity=Granularity.ITERATION, policy="fcfs", kv_cache_tokens=8192)
    core = EngineCore(config, loaded=loaded)
    hf = {
        "transformers_default_experts": transformers_twin(core),
        "transformers_eager_experts": transformers_twin(core, experts_implementation="eager"),
    }
    result: dict[str, Any] = {}
    for name, m in hf.items():
        decode_lockstep(core, m, batch, prompt_len, 4)  # warm-up
        per_round = [decode_lockstep(core, m, batch, prompt_len, new_tokens) for _ in range(rounds)]
        for r, steps in enumerate(per_round, 1):
            print(f"  {name} round {r}: " + ", ".join(f"{k}={v:.4f}" for k, v in steps.items()), flush=True)
        result[name] = {
            "rounds_step_s": per_round,
            "engine_tokens_per_s": batch / statistics.median(r["engine"] for r in per_round),
            "transformers_tokens_per_s": batch / statistics.median(r["transformers"] for r in per_round),
            # Step-time ratio: above 1 means the engine is faster.
            "engine_speedup": paired_ratio(per_round, "transformers", "engine"),
        }
    return result


def _nothing_arrived() -> bool:
    return False


def lockstep_passes(cores: Mapping[str, EngineCore]) -> dict[str, float]:
    """Drain every core one whole forward pass at a time, taking turns (order reversed every pass);
    returns each core's summed pass time. Turns of one pass keep slow spells from favouring one core."""
    totals = dict.fromkeys(cores, 0.0)
    names = list(cores)
    turn = 0
    while any(c.has_work() for c in cores.values()):
        for name in names if turn % 2 else names[::-1]:
            core = cores[name]
            if not core.has_work():
                continue
            start = time.perf_counter()
            # As the async front drives it, with a probe for news that never fires (nothing arrives here).
            core.step(interrupted=_nothing_arrived)
            while core.active is not None:  # the pass is not done yet
                core.step(interrupted=_nothing_arrived)
            synchronize(core)
            totals[name] += time.perf_counter() - start
        turn += 1
    return totals


def granularity_overhead(
    base: EngineConfig, loaded: LoadedModel, requests: int, prompt_len: int, new_tokens: int, rounds: int
) -> dict:
    """BE-only time (nothing to preempt for) at `layer` and `expert` granularity against `iteration`, under
    `qllm`: all engines serve the same burst in lockstep, pass by pass."""
    # A token budget of two prompts per pass: many passes of similar length, so that taking turns pass by
    # pass spreads a slow spell over every engine (one 4096-token pass would take most of a round).
    # KV for the whole burst with room to spare, and no more: every engine holds a pool.
    kv_tokens = 2 * requests * (prompt_len + new_tokens)
    base = dataclasses.replace(base, policy="qllm", max_batched_tokens=2 * prompt_len, kv_cache_tokens=kv_tokens)
    cores = {
        g: EngineCore(dataclasses.replace(base, granularity=Granularity(g)), loaded=loaded)
        for g in ("iteration", "layer", "expert")
    }
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    per_round = []
    for r in range(rounds + 1):  # round 0 warms up
        for core in cores.values():
            for i in range(requests):
                core.add_request(f"be-{i}", prompt(i, prompt_len), params, "be")
        totals = lockstep_passes(cores)
        if r:
            per_round.append(totals)
            print(f"  round {r}: " + ", ".join(f"{k}={v:.3f}s" for k, v in totals.items()), flush=True)
    tokens = requests * new_tokens
    return {
        "rounds_s": per_round,
        "tokens_per_s": {g: tokens / statistics.median(r[g] for r in per_round) for g in cores},
        "overhead_vs_iteration": {g: paired_ratio(per_round, g, "iteration") - 1 for g in ("layer", "expert")},
    }


async def _ttft(engine: Engine, ids: list[int], priority: str, max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ttft = None
    async for out in engine.generate(prompt_token_ids=ids, params=params, priority=priority):
        ttft = out.ttft_s
    if ttft is None:
        raise RuntimeError("the request produced no token")
    return ttft


async def _ls_during_be_prefill(engine: Engine, delay_s: float) -> float:
    """TTFT of one LS request sent `delay_s` after a long BE prompt started prefilling."""
    be = asyncio.create_task(_ttft(engine, prompt(100, BE_BURST_PROMPT), "be", 2))
    await asyncio.sleep(delay_s)
    ttft = await _ttft(engine, LS_PROMPT, "ls", 1)
    await be
    return ttft


BE_BURST_PROMPT = 3072
LS_PROMPT = prompt(7, 32)


def ls_ttft_under_be_prefill(
    base: EngineConfig, loaded: LoadedModel, policy: str, granularity: str, trials: int
) -> dict[str, Any]:
    """LS TTFT on an idle engine vs while one long BE prompt (one pass) prefills, in units of one layer of
    that prefill. Each trial measures all three in a row: the LS request alone, the BE prefill alone (its
    TTFT is the pass time), and the LS request arriving during the prefill, at a different point of a
    layer in each trial."""
    engine = Engine(dataclasses.replace(base, policy=policy, granularity=Granularity(granularity)), loaded=loaded)
    layers = loaded.staged.num_layers
    per_trial = []
    try:
        asyncio.run(_ttft(engine, LS_PROMPT, "ls", 1))  # warm-up
        for t in range(trials):
            idle = asyncio.run(_ttft(engine, LS_PROMPT, "ls", 1))
            layer = asyncio.run(_ttft(engine, prompt(100, BE_BURST_PROMPT), "be", 1)) / layers
            busy = asyncio.run(_ls_during_be_prefill(engine, 3 * layer + layer * t / trials))
            per_trial.append(
                {
                    "idle_ttft_s": idle,
                    "layer_s": layer,
                    "loaded_ttft_s": busy,
                    "added_in_layers": (busy - idle) / layer,
                }
            )
    finally:
        engine.shutdown()
    summary = {k: statistics.median(t[k] for t in per_trial) for k in per_trial[0]}
    return summary | {"trials": per_trial}


def _ls_ttfts(base: EngineConfig, loaded: LoadedModel, trials: int) -> dict[str, Any]:
    ttft: dict[str, Any] = {"be_prompt_tokens": BE_BURST_PROMPT, "ls_prompt_tokens": len(LS_PROMPT)}
    for policy, granularity in (
        ("fcfs", "iteration"),
        ("priority", "iteration"),
        ("qllm", "layer"),
        ("qllm", "expert"),
    ):
        r = ls_ttft_under_be_prefill(base, loaded, policy, granularity, trials)
        ttft[f"{policy}:{granularity}"] = r
        print(policy, granularity, _shown(r, "trials"), flush=True)
    return ttft


def _shown(part: Mapping[str, Any], rounds_key: str) -> str:
    """A part of the results as printed along the way: everything but its per-round figures."""
    return json.dumps({k: v for k, v in part.items() if k != rounds_key})


def main() -> None:
    """Run every measurement and write one JSON file."""
    parser = script_parser(__doc__)
    add_engine_arguments(parser)
    add_out_argument(parser, "engine_bench.json")
    parser.add_argument("--batch", type=count, default=8)
    parser.add_argument("--trials", type=count, default=5, help="LS TTFT trials per policy; median kept")
    parser.add_argument("--rounds", type=count, default=5, help="alternating rounds per comparison; median kept")
    args = parser.parse_args()
    torch.manual_seed(0)
    # Loaded once and shared by every engine of the run.
    base = EngineConfig(model=args.model, device=args.device, dtype=args.dtype)
    loaded = load_model(base)
    decode: dict[str, Any] = {"batch": args.batch, "prompt_len": 64, "new_tokens": 64}
    decode |= decode_comparison(base, loaded, args.batch, 64, 64, rounds=args.rounds)
    for name in ("transformers_default_experts", "transformers_eager_experts"):
        print(name, _shown(decode[name], "rounds_step_s"), flush=True)
    overhead: dict[str, Any] = {"requests": 16, "prompt_len": 256, "new_tokens": 16}
    overhead |= granularity_overhead(base, loaded, 16, 256, 16, rounds=args.rounds)
    print(_shown(overhead, "rounds_s"), flush=True)
    settings = {k: getattr(args, k) for k in ("model", "device", "dtype", "rounds", "trials")}
    results = settings | {
        "expert_spans_per_layer": EngineConfig.expert_spans_per_layer,
        "decode_throughput": decode,
        "be_only_granularity_overhead": overhead,
        "ls_ttft_during_be_prefill": _ls_ttfts(base, loaded, args.trials),
    }
    write_result(args.out, results)


if __name__ == "__main__":
    main()
