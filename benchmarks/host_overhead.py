"""Host work per decode step (not a test): the engine against transformers' `generate` on the built-in `tiny`
model, whose arithmetic is negligible, so a step's time is the host's.

Two figures, both from one run: the decode step time ratio (engine and `generate` in lockstep over the very
same weights, as `engine_bench` measures it) and the Python calls a step makes, counted with
`sys.setprofile` (deterministic, unlike time on a shared machine): the engine's split into inside and
outside its forward pass, `generate`'s for a whole step.

Run: `python -m benchmarks.host_overhead --out benchmarks/results/host_overhead.json`
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from benchmarks.engine_bench import decode_comparison, prompt, transformers_twin
from benchmarks.json_form import write_result
from benchmarks.script_args import add_out_argument, count, script_parser
from qllm_core import EngineConfig, Granularity, SamplingParams
from qllm_core.engine_core import EngineCore
from qllm_core.forward import ForwardPass
from qllm_core.models.registry import load_model

BATCH, PROMPT_LEN, NEW_TOKENS = 8, 16, 64
COUNTED_STEPS = 20


class _CallCounter:
    """Counts Python and C calls while on; calls made inside `inside` (a code object) are counted apart."""

    def __init__(self, inside: Any = None) -> None:
        self.inside_code = inside
        self.depth = 0
        self.inside = 0
        self.outside = 0

    def __call__(self, frame: FrameType, event: str, arg: object) -> None:
        if event in ("call", "c_call"):
            if self.depth:
                self.inside += 1
            else:
                self.outside += 1
            if event == "call" and frame.f_code is self.inside_code:
                self.depth += 1
        elif event == "return" and frame.f_code is self.inside_code:
            self.depth -= 1


def _counted(run: Callable[[], None], counter: _CallCounter) -> None:
    sys.setprofile(counter)
    try:
        run()
    finally:
        sys.setprofile(None)


def engine_calls(core: EngineCore) -> dict[str, float]:
    """Calls per decode pass of a batch of `BATCH` decodes, inside the forward pass and outside it."""
    params = SamplingParams(max_tokens=COUNTED_STEPS + 10, temperature=0.0, ignore_eos=True)
    for i in range(BATCH):
        core.add_request(f"c-{i}", prompt(i, PROMPT_LEN), params, "be")
    for _ in range(3):  # the prefill and a couple of decodes, out of the count
        core.step()
    forward = ForwardPass.step.__wrapped__.__code__  # type: ignore[attr-defined]  # under inference_mode
    counter = _CallCounter(forward)
    before = core.stats().passes_completed

    def steps() -> None:
        for _ in range(COUNTED_STEPS):
            core.step()

    _counted(steps, counter)
    passes = core.stats().passes_completed - before
    while core.has_work():
        core.step()
    return {"inside_forward": counter.inside / passes, "outside_forward": counter.outside / passes}


class _Window(LogitsProcessor):
    """Turns the counter on for `COUNTED_STEPS` of `generate`'s steps after a few warm ones."""

    def __init__(self, counter: _CallCounter) -> None:
        self.counter = counter
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.step += 1
        if self.step == 3:
            sys.setprofile(self.counter)
        elif self.step == 3 + COUNTED_STEPS:
            sys.setprofile(None)
        return scores


def transformers_calls(model: Any) -> float:
    """Calls per step of `generate` (greedy, KV cache), the same batch."""
    counter = _CallCounter()
    ids = torch.tensor([prompt(i, PROMPT_LEN) for i in range(BATCH)])
    with torch.inference_mode():
        model.generate(
            ids,
            max_new_tokens=COUNTED_STEPS + 6,
            do_sample=False,
            eos_token_id=None,
            logits_processor=LogitsProcessorList([_Window(counter)]),
        )
    sys.setprofile(None)
    return counter.outside / COUNTED_STEPS


def main() -> None:
    """Measure both figures and write one JSON file."""
    parser = script_parser(__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rounds", type=count, default=5, help="lockstep rounds; the median ratio is kept")
    add_out_argument(parser, "host_overhead.json")
    args = parser.parse_args()
    base = EngineConfig(model="tiny", device="cpu", dtype="float32")
    loaded = load_model(base)
    lockstep = decode_comparison(base, loaded, BATCH, PROMPT_LEN, NEW_TOKENS, rounds=args.rounds)
    config = dataclasses.replace(base, policy="fcfs", granularity=Granularity.ITERATION)
    core = EngineCore(config, loaded=loaded)
    calls = engine_calls(core)
    hf = transformers_calls(transformers_twin(core))
    result = {
        "model": "tiny",
        "batch": BATCH,
        "prompt_len": PROMPT_LEN,
        "new_tokens": NEW_TOKENS,
        "decode": {k: {kk: vv for kk, vv in v.items() if kk != "rounds_step_s"} for k, v in lockstep.items()},
        "decode_rounds": {k: v["rounds_step_s"] for k, v in lockstep.items()},
        "calls_per_step": {"engine": calls, "transformers_generate": hf},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "decode_rounds"}, indent=1))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
