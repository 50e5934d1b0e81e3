"""Where a decode step's host time goes, engine against transformers (not a test).

A decode step of a small batch is bound by the host on a GPU: the time is in Python and in launching
kernels. This profiles one engine decode step and one `generate`-style decode step (the model's forward
with its own cache, then argmax) at equal batch, and prints for each the operators by self CPU time and
the count of kernel launches.

Run: `python -m benchmarks.decode_profile --model DIR --device cuda --dtype bfloat16`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.engine_bench import prompt, synchronize, transformers_twin
from benchmarks.script_args import add_engine_arguments, count, script_parser
from qllm_core import EngineConfig, Granularity, SamplingParams
from qllm_core.engine_core import EngineCore


def _profiled(run: Callable[[], object], device: torch.device, steps: int) -> str:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel"))
    table = events.table(sort_by="self_cpu_time_total", row_limit=25)
    return f"kernel launches per step: {launches / steps:.0f}\n{table}"


def main() -> None:
    """Profile both decode steps and print the tables."""
    parser = script_parser(__doc__)
    add_engine_arguments(parser)
    parser.add_argument("--batch", type=count, default=8)
    parser.add_argument("--steps", type=count, default=5)
    args = parser.parse_args()
    base = EngineConfig(model=args.model, device=args.device, dtype=args.dtype)
    core = EngineCore(dataclasses.replace(base, granularity=Granularity.ITERATION, policy="fcfs", kv_cache_tokens=8192))
    device = core.loaded.device
    params = SamplingParams(max_tokens=10 * args.steps + 10, temperature=0.0, ignore_eos=True)
    for i in range(args.batch):
        core.add_request(f"d-{i}", prompt(i, 64), params, "be")
    for _ in range(5):  # the prefill and a few warm decode steps
        core.step()

    def engine_step() -> None:
        core.step()
        synchronize(core)

    print("== engine decode step\n" + _profiled(engine_step, device, args.steps), flush=True)

    hf = transformers_twin(core)
    ids = torch.tensor([prompt(i, 64) for i in range(args.batch)], device=device)
    with torch.inference_mode():
        out = hf(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

        def hf_step() -> None:
            nonlocal token
            token = hf(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            token.tolist()  # generate reads the tokens back every step too

        for _ in range(3):
            hf_step()
        print("== transformers decode step\n" + _profiled(hf_step, device, args.steps), flush=True)


if __name__ == "__main__":
    main()
