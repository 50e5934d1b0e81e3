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

from benchmarks.calibration import (
    Calibration,
    Drift,
    IsolatedTtft,
    calibration_grid,
    measure_isolated_ttft,
    workload_prompt_lens,
)
from benchmarks.capacity import CapacityProbe, probe_capacity
from benchmarks.checkpoint import Checkpoint, DoneRun, Resumed, RunKey
from benchmarks.child_runner import ChildRunner
from benchmarks.engine_runner import EngineRunner
from benchmarks.machine import machine_info
from benchmarks.metrics import RequestRecord, summarize
from benchmarks.progress import Progress
from benchmarks.results import RunResult, SweepResult
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
    if ds is None or ds.replayed:  # a replayed trace brings its own lengths and arrivals
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


def _with_isolated(records: list[RequestRecord], calibration: Calibration | None) -> tuple[RequestRecord, ...]:
    if calibration is None:
        return tuple(records)
    return tuple(
        r if r.prompt_tokens is None else dataclasses.replace(r, isolated_ttft_s=calibration.before.at(r.prompt_tokens))
        for r in records
    )


@dataclass
class _Sitting:
    """What the runs of one sitting share: the settings, runners, the calibration grid, the progress bar and
    the decode iteration (measured on the first run's target unless the checkpoint holds it)."""

    settings: SweepSettings
    runners: _Runners
    grid: tuple[int, ...] | None
    progress: Progress
    checkpoint: Checkpoint | None
    capacity: CapacityProbe | None
    decode_s: float | None

    async def run(self, planned: _Planned) -> DoneRun:
        """Make one run: warm-up, (the decode iteration,) isolated TTFT before, the workload, isolated TTFT after."""
        where = f"{planned.target.label} @ {planned.workload.rate:.3g} req/s, seed {planned.seed}"
        self.progress.describe(f"{where}: starting")
        async with self.runners(planned.target) as runner:
            await runner.warmup(self.settings.warmup_requests, token_range=_token_range(self.settings))
            if self.decode_s is None:
                self.progress.describe(f"{where}: timing a decode iteration")
                self.decode_s = await self._decode_iteration(runner)
            before = await self._isolated(runner, f"{where}: isolated TTFT before")
            self.progress.describe(where)
            counts_before = await runner.engine_counts()
            records = await runner.run(planned.workload, self.settings.drain_timeout_s, on_done=self.progress.update)
            counts_after = await runner.engine_counts()
            after = await self._isolated(runner, f"{where}: isolated TTFT after")
        calibration = None
        if before is not None and after is not None:
            calibration = Calibration(before, after, Drift.between(before, after))
        engine = None if counts_before is None or counts_after is None else counts_after.since(counts_before)
        label, seed, rate = planned.key
        done = DoneRun(label, seed, rate, _with_isolated(records, calibration), calibration, engine)
        if self.checkpoint is not None:
            self.checkpoint.write_run(done)
        return done

    async def _decode_iteration(self, runner: Runner) -> float:
        s = self.settings
        decode_s = await runner.measure_decode_iteration(
            s.calibration_batch, s.calibration_prompt_len, s.calibration_tokens, _token_range(s)
        )
        if self.checkpoint is not None:
            self.checkpoint.write_header(decode_s, self.capacity)
        return decode_s

    async def _isolated(self, runner: Runner, what: str) -> IsolatedTtft | None:
        if self.grid is None:
            return None
        self.progress.describe(what)
        s = self.settings
        return await measure_isolated_ttft(runner, self.grid, s.isolated_trials, _token_range(s))


def _run_result(planned: _Planned, done: DoneRun, slo_s: float, tpot_slo_s: float) -> RunResult:
    policy = planned.target.policy
    return RunResult(
        label=planned.target.label,
        policy=None if policy is None else policy.policy,
        granularity=None if policy is None else policy.granularity,
        rate=planned.workload.rate,
        rate_of_capacity=planned.rate_of_capacity,
        seed=planned.seed,
        workload=planned.workload.summary(),
        metrics=summarize(done.requests, slo_s, tpot_slo_s, done.engine),
        calibration=done.calibration,
        requests=done.requests,
    )


async def run_sweep_async(settings: SweepSettings, checkpoint: Checkpoint | None = None) -> SweepResult:
    """Run the sweep (see the module docstring); returns every run's metrics and records."""
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    t0 = time.monotonic()
    resumed = checkpoint.load() if checkpoint is not None else Resumed()
    dataset = _dataset(settings)
    pool = None if dataset is None else dataset[1]
    runners = _Runners(settings)
    capacity = resumed.capacity or await _capacity(settings, runners, pool)
    plan = _plan(settings, capacity, pool)
    lens = workload_prompt_lens([p.workload for p in plan])
    grid = calibration_grid(lens, settings.isolated_points) if lens else None
    todo = sum(len(p.workload.requests) for p in plan if p.key not in resumed.runs)
    done: list[DoneRun] = []
    with Progress(todo, enabled=settings.progress) as progress:
        sitting = _Sitting(settings, runners, grid, progress, checkpoint, capacity, resumed.decode_iteration_s)
        for planned in plan:
            done.append(resumed.runs.get(planned.key) or await sitting.run(planned))
    decode_s = sitting.decode_s
    assert decode_s is not None
    slo_s = settings.slo_s if settings.slo_s is not None else settings.slo_factor * decode_s
    tpot_slo_s = settings.tpot_slo_s if settings.tpot_slo_s is not None else settings.tpot_slo_factor * decode_s
    return SweepResult(
        model=settings.model,
        target="engine" if settings.endpoint is None else settings.http_settings().url,
        slo_s=slo_s,
        slo_source="given" if settings.slo_s is not None else "measured",
        tpot_slo_s=tpot_slo_s,
        decode_iteration_s=decode_s,
        machine=machine_info(),
        settings=settings,
        started_at=started_at,
        wall_s=time.monotonic() - t0,
        capacity=capacity,
        dataset=None if dataset is None else dataset[0],
        runs=tuple(_run_result(p, d, slo_s, tpot_slo_s) for p, d in zip(plan, done, strict=True)),
    )


def run_sweep(settings: SweepSettings, checkpoint: Checkpoint | None = None) -> SweepResult:
    """Run the sweep on a fresh event loop (for callers outside asyncio)."""
    return asyncio.run(run_sweep_async(settings, checkpoint))
