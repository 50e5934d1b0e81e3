"""Fit an engine's pass cost model by timing a few real passes of chosen shapes (at start-up, or to write a file).

`calibration_shapes` picks shapes that move the cost model's features apart (prompts alone of several
lengths, prompts after cached context, several short prompts, decode batches at two context lengths, a mixed
pass); `PassTimer` runs each as a real `ForwardPass` on the engine's model and KV pool with throw-away
requests; `calibrate` fits `qllm_core.cost_model.CostFit` to the timings. `cost_model_for` is what the
engine calls at start-up, following `EngineConfig.cost_model`. `python -m qllm_core.calibration --model bench
--out FILE` writes a cost model file for `cost_model: file`.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from qllm_core.cache import KVCache
from qllm_core.config import EngineConfig
from qllm_core.cost_model import CostFit, CostModel, PassFeatures, Row, fit, load_fit
from qllm_core.forward import ForwardPass, PassEntry
from qllm_core.models.registry import LoadedModel
from qllm_core.models.staged import StagedModel
from qllm_core.params import SamplingParams
from qllm_core.request import PriorityClass, Request
from qllm_core.sampler import Sampler
from qllm_core.scheduler.base import Granularity, Policy

log = logging.getLogger(__name__)

CALIBRATION_BUDGET_S = 10.0
"""Start-up time calibration may take beyond one pass per shape, to repeat shapes (the fastest counts)."""

Shape = tuple[Row, ...]
PassRunner = Callable[[Shape], float]
"""Runs a pass over the given (cached, new) rows and returns the seconds it took."""


class EngineLike(Protocol):
    """What calibration needs of an engine (`EngineCore` has it): its config, model, KV pool and load facts."""

    config: EngineConfig
    model: StagedModel
    kv: KVCache
    loaded: LoadedModel
    policy: Policy


def calibration_shapes(max_tokens: int, max_rows: int, max_context: int, chunk_tokens: int) -> list[Shape]:
    """Pass shapes that tell the cost model's features apart, within the engine's limits: no pass over
    `max_tokens` new tokens or `max_rows` rows, no row past `max_context` positions."""
    longest = min(max_tokens, max_context - 1)
    half_chunk = min(chunk_tokens // 2, longest)
    shapes: list[Shape] = []
    # Prompts alone: the intercept, the cost per token, and (from the long ones) attention's quadratic part.
    for n in sorted({min(n, longest) for n in (8, 32, 128, chunk_tokens)}):
        if n > 1:
            shapes.append(((0, n),))
    # Prompt chunks after cached context: attention pairs apart from tokens.
    for n in sorted({min(64, longest), half_chunk}):
        if n > 1 and max_context - n > 0:
            shapes.append(((min(1024, max_context - n), n),))
    # Several short prompts: the cost per prompt row.
    for rows, n in ((4, 32), (8, 16)):
        if rows <= max_rows and rows * n <= max_tokens and n < max_context:
            shapes.append(((0, n),) * rows)
    # Decode batches at two context lengths: the cost per decode row and per token of context read.
    for rows in sorted({1, max(1, max_rows // 4), max_rows}):
        for context in sorted({min(32, max_context - 1), min(1024, max_context - 1)}):
            shapes.append(((context, 1),) * rows)
    # A mixed pass, as qllm and chunked run them.
    decodes = max_rows // 2
    mixed = min(half_chunk, max_tokens - decodes)
    if decodes and mixed > 1:
        shapes.append(((min(256, max_context - 1), 1),) * decodes + ((0, mixed),))
    return shapes


def calibrate(
    run: PassRunner,
    shapes: Sequence[Shape],
    model: str,
    device: str,
    budget_s: float = CALIBRATION_BUDGET_S,
    max_repeats: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> CostFit:
    """Time every shape once (after a warm-up pass), then again, round by round, while within `budget_s` and
    `max_repeats`; fit to each shape's fastest time, since interference from other work only ever adds time."""
    if not shapes:
        raise ValueError("calibration needs at least one pass shape")
    run(shapes[0])  # the first pass pays one-off costs (allocator, kernel selection)
    started = clock()
    fastest = [run(shape) for shape in shapes]
    for _ in range(max_repeats - 1):
        for i, shape in enumerate(shapes):
            if clock() - started > budget_s:
                return fit(list(zip(map(PassFeatures.of_rows, shapes), fastest, strict=True)), model, device)
            fastest[i] = min(fastest[i], run(shape))
    return fit(list(zip(map(PassFeatures.of_rows, shapes), fastest, strict=True)), model, device)


class PassTimer:
    """Runs real forward passes over throw-away requests on an engine's model and KV pool (which must have room
    for the rows; the requests' blocks are given back after each pass)."""

    def __init__(self, engine: EngineLike, clock: Callable[[], float] = time.perf_counter) -> None:
        self._engine = engine
        self._sampler = Sampler(engine.loaded.device)
        self._clock = clock
        self._runs = 0

    def __call__(self, shape: Shape) -> float:
        """Seconds one pass over `shape` took."""
        engine, self._runs = self._engine, self._runs + 1
        vocab = engine.loaded.vocab_size
        greedy = SamplingParams(temperature=0.0)
        requests = [
            Request(
                f"calibration-{self._runs}-{i}",
                [(i + 7 * p) % vocab for p in range(start + n)],
                greedy,
                PriorityClass.BEST_EFFORT,
                0.0,
            )
            for i, (start, n) in enumerate(shape)
        ]
        try:
            entries = []
            for request, (start, n) in zip(requests, shape, strict=True):
                engine.kv.allocate(request.request_id, start + n)
                entries.append(PassEntry(request, start, tuple(request.prompt_token_ids[start:]), samples=True))
            started = self._clock()
            forward = ForwardPass(
                0,
                engine.model,
                engine.kv,
                entries,
                Granularity.ITERATION,
                engine.config.expert_spans_per_layer,
                queued_s=0.0,
                sampler=self._sampler,
            )
            while not forward.done:
                forward.step()
            if engine.loaded.device.type == "cuda":
                torch.cuda.synchronize(engine.loaded.device)
            return self._clock() - started
        finally:
            for request in requests:
                if engine.kv.holds(request.request_id):
                    engine.kv.free(request.request_id)
                self._sampler.forget(request.request_id)


def device_name(device: torch.device) -> str:
    """The device as a cost model file records it: "cpu", or the CUDA device's name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def calibrate_engine(engine: EngineLike, budget_s: float = CALIBRATION_BUDGET_S, max_repeats: int = 3) -> CostFit:
    """Fit the cost model of an idle engine's model on its device, with shapes that fit its limits and KV pool."""
    config = engine.config
    capacity = engine.kv.free_blocks * engine.kv.block_size
    max_rows = config.max_batch_size
    max_context = min(engine.loaded.max_model_len, capacity // max_rows)
    shapes = calibration_shapes(min(config.max_batched_tokens, capacity), max_rows, max_context, config.chunk_tokens)
    fits_pool = [
        s for s in shapes if sum(engine.kv.request_blocks(start + n) for start, n in s) <= engine.kv.free_blocks
    ]
    started = time.perf_counter()
    device = device_name(engine.loaded.device)
    fitted = calibrate(PassTimer(engine), fits_pool, config.model, device, budget_s, max_repeats)
    log.info(
        "cost model of %s on %s from %d passes in %.1f s: %s",
        fitted.model,
        fitted.device,
        len(fits_pool),
        time.perf_counter() - started,
        fitted,
    )
    return fitted


_CALIBRATED: dict[tuple[str, str, str, int], CostFit] = {}
"""Fits made in this process, by (checkpoint, dtype, device, torch threads): a pass costs the same for every
engine on them, so a process that starts many engines (tests, benchmarks) calibrates once."""


def cost_model_for(engine: EngineLike) -> CostModel:
    """The engine's cost model as `EngineConfig.cost_model` says: calibrated (once per process for a model,
    dtype, device and thread count), read from a file, or nominal. A policy that does not plan with it
    (`Policy.plans_with_cost`) gets the nominal model and no calibration."""
    config = engine.config
    if config.cost_model == "off" or not engine.policy.plans_with_cost:
        return CostModel.nominal()
    device = device_name(engine.loaded.device)
    if config.cost_model == "file":
        assert config.cost_model_file is not None  # noqa: S101 (the config checks it)
        return CostModel(load_fit(config.cost_model_file, config.model, device))
    key = (str(engine.loaded.path), str(engine.loaded.dtype), device, torch.get_num_threads())
    if key not in _CALIBRATED:
        _CALIBRATED[key] = calibrate_engine(engine)
    return CostModel(_CALIBRATED[key])


def main(argv: Sequence[str] | None = None) -> None:
    """Write a cost model file: `python -m qllm_core.calibration --model bench --out costs/bench-cpu.json`."""
    from qllm_core.engine_core import EngineCore  # noqa: PLC0415 (the command line only: engine_core may import this module)

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", default="bench")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--budget-s", type=float, default=60.0, help="time to spend repeating shapes")
    parser.add_argument("--repeats", type=int, default=5, help="most timings of one shape")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, cost_model="off")
    fitted = calibrate_engine(EngineCore(config), args.budget_s, args.repeats)
    print(f"wrote {fitted.save(args.out)}: fit error {fitted.fit_error:.1%} over {fitted.samples} passes")


if __name__ == "__main__":
    main()
