"""A sweep: every target (each policy in process, or one HTTP endpoint) at every rate and seed.

Order of work:

1. The dataset is read (with `dataset`), and one workload drawn per seed and rate.
2. With `rates_of_capacity`, the rates are those fractions of a saturation rate (`benchmarks.capacity`):
   given, or probed on fcfs (in process) or on the endpoint.
3. For each seed, each rate and each target, in that order (the targets interleaved, so the VM's drift over
   a long sweep falls on every target alike): the target is built (in this process one loaded model is shared
   by every engine; a child process loads its own), warmed up, its isolated TTFT measured on the grid of
   `benchmarks.calibration`, the workload sent, and the isolated TTFT measured again.
4. The SLO is given, or measured once on the first target as `slo_factor` x one decode iteration (the paper
   sets its 3 s LS TTFT SLO to about 10x a decode iteration). Metrics follow, once the SLO is known.

With a `Checkpoint`, the decode iteration, the saturation rate and each finished run are written to disk as
they are measured, and those already there are taken from it instead of measured again (`--resume`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from benchmarks.calibration import Calibration, Drift, calibration_grid, measure_isolated_ttft, workload_prompt_lens
from benchmarks.capacity import CapacityProbe, probe_capacity
from benchmarks.checkpoint import Checkpoint, Resumed, RunKey
from benchmarks.child_runner import ChildRunner
from benchmarks.engine_runner import EngineRunner
from benchmarks.metrics import RequestRecord, summarize
from benchmarks.progress import Progress
from benchmarks.results import RunResult, SweepResult, machine_info
from benchmarks.runners import HttpRunner, Runner
from benchmarks.sharegpt import DatasetSummary, default_path, load_sharegpt, token_counter
from benchmarks.sweep_settings import EngineHost, PolicySpec, SweepSettings
from benchmarks.workload import PairPool, Workload

if TYPE_CHECKING:
    from qllm_core.models.registry import LoadedModel

CAPACITY_PROBE_TIMEOUT_S = 1800.0
"""Longest the capacity probe may take after its burst: a bound, so a stuck target cannot hang the sweep."""


@dataclass(frozen=True)
class _Target:
    label: str
    policy: PolicySpec | None


@dataclass(frozen=True)
class _Planned:
    """One run to make: a workload for a target, and the fraction of capacity its rate is (if any)."""

    target: _Target
    seed: int
    workload: Workload
    rate_of_capacity: float | None

    @property
    def key(self) -> RunKey:
        """How the checkpoint names this run."""
        return self.target.label, self.seed, self.workload.rate


def _targets(settings: SweepSettings) -> list[_Target]:
    if settings.endpoint is not None:
        return [_Target(settings.endpoint_label, None)]
    return [_Target(p.label, p) for p in settings.policies]


class _Runners:
    """Builds each run's runner; in this process, every engine shares one loaded model."""

    def __init__(self, settings: SweepSettings) -> None:
        self.settings = settings
        self._loaded: LoadedModel | None = None

    def __call__(self, target: _Target) -> Runner:
        settings = self.settings
        if target.policy is None:
            return HttpRunner(settings.http_settings())
        config = settings.engine_config(target.policy)
        if settings.engine_host is EngineHost.CHILD:
            return ChildRunner(config, target.label)
        if self._loaded is None:
            from qllm_core.models.registry import load_model

            self._loaded = load_model(config)  # policy and granularity do not shape the loaded model
        return EngineRunner(config, target.label, self._loaded)


def _dataset(settings: SweepSettings) -> tuple[DatasetSummary, PairPool] | None:
    ds = settings.dataset
    if ds is None:
        return None
    from qllm_core.config import BUILTIN_MODELS

    counter = token_counter(settings.model, ds.token_counting, BUILTIN_MODELS)
    data = load_sharegpt(ds.path if ds.path is not None else default_path(), counter)
    return data.summary, data.pool(counter, ds.max_tokens_cap)


async def _capacity(settings: SweepSettings, runners: _Runners, pool: PairPool | None) -> CapacityProbe | None:
    if settings.rates_of_capacity is None:
        return None
    if settings.capacity_rps is not None:
        return CapacityProbe.given(settings.capacity_rps)
    spec = settings.capacity_policy
    target = _targets(settings)[0] if settings.endpoint is not None else _Target(spec.label, spec)
    async with runners(target) as runner:
        await runner.warmup(settings.warmup_requests, token_range=_token_range(settings))
        return await probe_capacity(runner, settings.probe_workload(pool), CAPACITY_PROBE_TIMEOUT_S)


def _token_range(settings: SweepSettings) -> tuple[int, int]:
    return settings.workload.token_low, settings.workload.token_high


def _plan(settings: SweepSettings, capacity: CapacityProbe | None, pool: PairPool | None) -> list[_Planned]:
    fractions: tuple[float | None, ...]
    if settings.rates_of_capacity is not None:
        assert capacity is not None
        fractions = settings.rates_of_capacity
        rates: tuple[float, ...] | None = tuple(f * capacity.rate_rps for f in settings.rates_of_capacity)
    else:
        rates = settings.rates
        fractions = (None,) * (1 if rates is None else len(rates))
    plan: list[_Planned] = []
    for seed in settings.seeds:
        for workload, fraction in zip(settings.workloads(rates, seed, pool), fractions, strict=True):
            plan += [_Planned(t, seed, workload, fraction) for t in _targets(settings)]
    return plan


def _with_isolated(records: list[RequestRecord], calibration: Calibration | None) -> list[RequestRecord]:
    if calibration is None:
        return records
    return [
        r if r.prompt_tokens is None else dataclasses.replace(r, isolated_ttft_s=calibration.before.at(r.prompt_tokens))
        for r in records
    ]


async def run_sweep_async(settings: SweepSettings, checkpoint: Checkpoint | None = None) -> SweepResult:
    """Run the sweep (see the module docstring); returns every run's metrics and records."""
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    t0 = time.monotonic()
    resumed = checkpoint.load() if checkpoint is not None else Resumed()
    dataset = _dataset(settings)
    pool = None if dataset is None else dataset[1]
    runners = _Runners(settings)
    token_range = _token_range(settings)
    capacity = resumed.capacity or await _capacity(settings, runners, pool)
    plan = _plan(settings, capacity, pool)
    lens = workload_prompt_lens([p.workload for p in plan])
    grid = calibration_grid(lens, settings.isolated_points) if lens else None
    decode_s = resumed.decode_iteration_s
    raw: list[tuple[_Planned, list[RequestRecord], Calibration | None]] = []
    todo = [p for p in plan if p.key not in resumed.runs]
    with Progress(sum(len(p.workload.requests) for p in todo), enabled=settings.progress) as progress:
        for planned in plan:
            done = resumed.runs.get(planned.key)
            if done is not None:
                raw.append((planned, done.records, done.calibration))
                continue
            where = f"{planned.target.label} @ {planned.workload.rate:.3g} req/s, seed {planned.seed}"
            progress.describe(f"{where}: starting")
            async with runners(planned.target) as runner:
                await runner.warmup(settings.warmup_requests, token_range=token_range)
                if decode_s is None:
                    progress.describe(f"{where}: timing a decode iteration")
                    decode_s = await runner.measure_decode_iteration(
                        settings.calibration_batch,
                        settings.calibration_prompt_len,
                        settings.calibration_tokens,
                        token_range,
                    )
                    if checkpoint is not None:
                        checkpoint.write_header(decode_s, capacity)
                calibration = None
                if grid is not None:
                    progress.describe(f"{where}: isolated TTFT before")
                    before = await measure_isolated_ttft(runner, grid, settings.isolated_trials, token_range)
                progress.describe(where)
                records = await runner.run(planned.workload, settings.drain_timeout_s, on_done=progress.update)
                if grid is not None:
                    progress.describe(f"{where}: isolated TTFT after")
                    after = await measure_isolated_ttft(runner, grid, settings.isolated_trials, token_range)
                    calibration = Calibration(before, after, Drift.between(before, after))
            records = _with_isolated(records, calibration)
            if checkpoint is not None:
                checkpoint.write_run(planned.key, records, calibration)
            raw.append((planned, records, calibration))
    assert decode_s is not None
    slo_s = settings.slo_s if settings.slo_s is not None else settings.slo_factor * decode_s
    runs = tuple(
        RunResult(
            label=p.target.label,
            policy=None if p.target.policy is None else p.target.policy.policy,
            granularity=None if p.target.policy is None else p.target.policy.granularity,
            rate=p.workload.rate,
            rate_of_capacity=p.rate_of_capacity,
            seed=p.seed,
            workload=p.workload.summary(),
            metrics=summarize(records, slo_s),
            calibration=calibration,
            requests=tuple(records),
        )
        for p, records, calibration in raw
    )
    return SweepResult(
        model=settings.model,
        target="engine" if settings.endpoint is None else settings.http_settings().url,
        slo_s=slo_s,
        slo_source="given" if settings.slo_s is not None else "measured",
        decode_iteration_s=decode_s,
        machine=machine_info(),
        settings=settings,
        started_at=started_at,
        wall_s=time.monotonic() - t0,
        capacity=capacity,
        dataset=None if dataset is None else dataset[0],
        runs=runs,
    )


def run_sweep(settings: SweepSettings, checkpoint: Checkpoint | None = None) -> SweepResult:
    """Run the sweep on a fresh event loop (for callers outside asyncio)."""
    return asyncio.run(run_sweep_async(settings, checkpoint))
