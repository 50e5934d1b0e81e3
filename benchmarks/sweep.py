"""A sweep: every policy (or one HTTP endpoint) at every arrival rate, on the same seeded workloads.

Order of work: for each target, build it (an engine in this process, or an HTTP session), warm it up,
then run each rate's workload in turn; the engine is shut down before the next target loads, so only
one model is in memory. The SLO is given, or measured once at the start as `slo_factor` x one decode
iteration of the first target (the paper sets its 3 s LS TTFT SLO to about 10x a decode iteration).
Metrics are computed after all runs, once the SLO is known.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import math
import os
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.metrics import RequestRecord, RunMetrics, summarize
from benchmarks.progress import Progress
from benchmarks.runners import EngineRunner, HttpRunner, HttpSettings, Runner
from benchmarks.workload import Workload, WorkloadSettings, load_trace, poisson_workload

if TYPE_CHECKING:
    from qllm_core import EngineConfig

DEFAULT_GRANULARITY = {"fcfs": "iteration", "priority": "iteration", "qllm": "layer"}
"""Granularity of a policy named without one: the baselines switch only between iterations."""

_RESERVED_ENGINE_KEYS = ("model", "policy", "granularity")


class SweepSettingsError(ValueError):
    """A sweep setting is invalid or inconsistent; the message says what to change."""


@dataclass(frozen=True)
class PolicySpec:
    """A scheduling policy and its preemption granularity, written "policy[:granularity]"."""

    policy: str
    granularity: str

    def __post_init__(self) -> None:
        if not self.policy or not self.granularity:
            raise SweepSettingsError("a policy needs a name and a granularity, e.g. 'qllm:layer'")

    @property
    def label(self) -> str:
        """The name used in reports ("qllm:layer")."""
        return f"{self.policy}:{self.granularity}"

    @classmethod
    def parse(cls, text: str) -> PolicySpec:
        """Parse "fcfs", "priority", "qllm" or "qllm:expert" (a bare name takes its default granularity)."""
        name, _, granularity = text.strip().partition(":")
        if not name:
            raise SweepSettingsError(f"empty policy in {text!r}; write e.g. 'fcfs' or 'qllm:expert'")
        return cls(name, granularity or DEFAULT_GRANULARITY.get(name, "layer"))


def parse_policies(text: str) -> tuple[PolicySpec, ...]:
    """Parse a comma-separated list of policies."""
    return tuple(PolicySpec.parse(p) for p in text.split(",") if p.strip())


def parse_rates(text: str) -> tuple[float, ...]:
    """Parse a comma-separated list of arrival rates (requests per second)."""
    try:
        return tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise SweepSettingsError(f"rates must be comma-separated numbers, got {text!r}") from None


def _positive(name: str, value: object, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(float(value)) or value <= 0:
        what = "a positive integer" if integer else "a positive number"
        raise SweepSettingsError(f"{name} must be {what}, got {value!r}")


@dataclass(frozen=True)
class SweepSettings:
    """Everything a sweep needs. Targets are `policies` run in this process, or `endpoint` over HTTP."""

    model: str = "tiny"
    """In process: "tiny", "bench" or a checkpoint directory. Over HTTP: the `model` field sent."""
    policies: tuple[PolicySpec, ...] = (PolicySpec("fcfs", "iteration"), PolicySpec("qllm", "layer"))
    rates: tuple[float, ...] | None = None
    """Arrival rates (requests/s). None: (1, 2, 4, 8), or with a trace its own recorded timing."""
    workload: WorkloadSettings = field(default_factory=WorkloadSettings)
    trace: Path | None = None
    """Replay this JSONL trace instead of generating Poisson arrivals (rescaled to each rate, if any)."""
    endpoint: str | None = None
    endpoint_label: str = "endpoint"
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    engine_overrides: Mapping[str, Any] = field(default_factory=dict)
    """Further `EngineConfig` fields for in-process runs (device, dtype, max_batch_size, ...)."""
    slo_s: float | None = None
    """LS TTFT SLO; None measures it as slo_factor x one decode iteration."""
    slo_factor: float = 10.0
    calibration_batch: int = 8
    calibration_prompt_len: int = 64
    calibration_tokens: int = 16
    warmup_requests: int = 2
    drain_timeout_s: float = 120.0
    """After a run's last arrival, wait at most this long for its requests; the rest count as failed."""
    progress: bool = True

    def __post_init__(self) -> None:
        if self.rates is None and self.trace is None:
            object.__setattr__(self, "rates", (1.0, 2.0, 4.0, 8.0))
        if self.rates is not None:
            if not self.rates:
                raise SweepSettingsError("give at least one rate")
            for rate in self.rates:
                _positive("every rate", rate)
            if len(set(self.rates)) != len(self.rates):
                raise SweepSettingsError(f"rates repeat: {self.rates}; list each once")
        if self.trace is not None and (self.workload.duration_s is not None or self.workload.num_requests is not None):
            raise SweepSettingsError("a trace sets its own requests; leave out num_requests and duration")
        if self.slo_s is not None:
            _positive("slo_s", self.slo_s)
        for name in ("slo_factor", "drain_timeout_s"):
            _positive(name, getattr(self, name))
        for name in ("calibration_batch", "calibration_prompt_len"):
            _positive(name, getattr(self, name), integer=True)
        if isinstance(self.calibration_tokens, bool) or not isinstance(self.calibration_tokens, int):
            raise SweepSettingsError("calibration_tokens must be an integer >= 2")
        if self.calibration_tokens < 2:
            raise SweepSettingsError("calibration_tokens must be >= 2 (a decode gap needs two tokens)")
        if isinstance(self.warmup_requests, bool) or not isinstance(self.warmup_requests, int):
            raise SweepSettingsError("warmup_requests must be an integer >= 0")
        if self.warmup_requests < 0:
            raise SweepSettingsError("warmup_requests must be >= 0")
        if self.endpoint is not None:
            if self.engine_overrides:
                raise SweepSettingsError("engine settings do not apply to an HTTP endpoint; set them on the server")
            self.http_settings()  # validates the URL and the extra body
            return
        if self.extra_body:
            raise SweepSettingsError("extra_body applies only to an HTTP endpoint")
        if not self.policies:
            raise SweepSettingsError("give at least one policy, e.g. 'fcfs,qllm:layer'")
        labels = [p.label for p in self.policies]
        if len(set(labels)) != len(labels):
            raise SweepSettingsError(f"policies repeat: {labels}; list each once")
        clash = sorted(set(_RESERVED_ENGINE_KEYS) & set(self.engine_overrides))
        if clash:
            raise SweepSettingsError(f"engine settings may not set {clash}; use model and policies instead")
        for spec in self.policies:
            self.engine_config(spec)  # raises qllm_core's ConfigError (a ValueError) naming the bad field

    def engine_config(self, spec: PolicySpec) -> EngineConfig:
        """The engine settings of one policy."""
        from qllm_core import EngineConfig

        values = {"model": self.model, "policy": spec.policy, "granularity": spec.granularity}
        return EngineConfig.from_dict({**values, **self.engine_overrides})

    def http_settings(self) -> HttpSettings:
        """The HTTP runner settings (only with an endpoint)."""
        if self.endpoint is None:
            raise SweepSettingsError("no endpoint is set")
        return HttpSettings(self.endpoint, self.model, self.endpoint_label, dict(self.extra_body))

    def workloads(self) -> list[Workload]:
        """One workload per rate (all from the same seed), or the trace as recorded."""
        if self.trace is not None:
            w = self.workload
            base = load_trace(self.trace, seed=w.seed, token_range=(w.token_low, w.token_high))
            return [base] if self.rates is None else [base.scaled_to(r) for r in self.rates]
        assert self.rates is not None
        return [poisson_workload(self.workload, rate) for rate in self.rates]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy (for the results file)."""
        return _jsonable(dataclasses.asdict(self))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass(frozen=True)
class RunResult:
    """One target at one rate: the offered workload, the metrics and every request's record."""

    label: str
    policy: str | None
    granularity: str | None
    rate: float
    workload: dict[str, Any]
    metrics: RunMetrics
    requests: tuple[RequestRecord, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy."""
        return _jsonable(dataclasses.asdict(self))


@dataclass(frozen=True)
class SweepResult:
    """Every run of a sweep with what is needed to read it: model, SLO, machine and settings."""

    model: str
    target: str
    """"engine" (in process) or the endpoint URL."""
    slo_s: float
    slo_source: str
    """"given" or "measured" (slo_factor x decode_iteration_s)."""
    decode_iteration_s: float
    machine: dict[str, Any]
    settings: dict[str, Any]
    started_at: str
    wall_s: float
    runs: tuple[RunResult, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy; `records` holds one entry per rate x target."""
        meta = {k: v for k, v in dataclasses.asdict(self).items() if k != "runs"}
        return {"meta": _jsonable(meta), "records": [r.to_dict() for r in self.runs]}


def machine_info() -> dict[str, Any]:
    """Where the client ran: platform, CPUs, Python and torch (and the GPU, if torch sees one)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        # Containers often pin fewer cores than the host has.
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    try:
        import torch
    except ImportError:
        info["torch"] = None
        return info
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


@dataclass(frozen=True)
class _Target:
    label: str
    policy: PolicySpec | None


def _targets(settings: SweepSettings) -> list[_Target]:
    if settings.endpoint is not None:
        return [_Target(settings.endpoint_label, None)]
    return [_Target(p.label, p) for p in settings.policies]


def _runner(settings: SweepSettings, target: _Target) -> Runner:
    if target.policy is None:
        return HttpRunner(settings.http_settings())
    return EngineRunner(settings.engine_config(target.policy), target.label)


async def run_sweep_async(settings: SweepSettings) -> SweepResult:
    """Run the sweep (see the module docstring); returns every run's metrics and records."""
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    t0 = time.monotonic()
    workloads = settings.workloads()
    targets = _targets(settings)
    token_range = (settings.workload.token_low, settings.workload.token_high)
    decode_s: float | None = None
    raw: list[tuple[_Target, Workload, list[RequestRecord]]] = []
    total = len(targets) * sum(len(w.requests) for w in workloads)
    with Progress(total, enabled=settings.progress) as progress:
        for target in targets:
            progress.describe(f"{target.label}: starting")
            async with _runner(settings, target) as runner:
                await runner.warmup(settings.warmup_requests, token_range=token_range)
                if decode_s is None:
                    progress.describe(f"{target.label}: timing a decode iteration")
                    decode_s = await runner.measure_decode_iteration(
                        settings.calibration_batch,
                        settings.calibration_prompt_len,
                        settings.calibration_tokens,
                        token_range,
                    )
                for workload in workloads:
                    progress.describe(f"{target.label} @ {workload.rate:g} req/s")
                    records = await runner.run(workload, settings.drain_timeout_s, on_done=progress.update)
                    raw.append((target, workload, records))
    assert decode_s is not None
    slo_s = settings.slo_s if settings.slo_s is not None else settings.slo_factor * decode_s
    runs = tuple(
        RunResult(
            label=target.label,
            policy=None if target.policy is None else target.policy.policy,
            granularity=None if target.policy is None else target.policy.granularity,
            rate=workload.rate,
            workload=workload.summary(),
            metrics=summarize(records, slo_s),
            requests=tuple(records),
        )
        for target, workload, records in raw
    )
    return SweepResult(
        model=settings.model,
        target="engine" if settings.endpoint is None else settings.http_settings().url,
        slo_s=slo_s,
        slo_source="given" if settings.slo_s is not None else "measured",
        decode_iteration_s=decode_s,
        machine=machine_info(),
        settings=settings.to_dict(),
        started_at=started_at,
        wall_s=time.monotonic() - t0,
        runs=runs,
    )


def run_sweep(settings: SweepSettings) -> SweepResult:
    """Run the sweep on a fresh event loop (for callers outside asyncio)."""
    return asyncio.run(run_sweep_async(settings))
