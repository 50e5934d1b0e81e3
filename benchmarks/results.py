"""What a sweep produced: one `RunResult` per (target, rate, seed) and the `SweepResult` around them, with
their JSON form (see `benchmarks.report` for the file's layout)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from benchmarks.calibration import Calibration
from benchmarks.capacity import CapacityProbe
from benchmarks.json_form import jsonable
from benchmarks.machine import Machine
from benchmarks.metrics import RequestRecord, RunMetrics
from benchmarks.sharegpt import DatasetSummary
from benchmarks.sweep_settings import SweepSettings
from benchmarks.workload import WorkloadSummary


def record_dict(record: RequestRecord) -> dict[str, Any]:
    """One request in results.json: what the client saw, with the derived `ttft_s`, `isolated_ttft_s`,
    `slowdown` and `client_lag_s`, and the engine's `timeline` (its parts, `other_s` included) or null."""
    row: dict[str, Any] = jsonable(record)
    row["ttft_s"] = record.ttft_s
    row["slowdown"] = record.slowdown
    row["client_lag_s"] = record.client_lag_s
    if record.timeline is not None:
        row["timeline"]["other_s"] = record.timeline.other_s
    return row


@dataclass(frozen=True)
class RunResult:
    """One target at one rate and seed: the offered workload, the metrics and every request's record."""

    label: str
    policy: str | None
    granularity: str | None
    rate: float
    rate_of_capacity: float | None
    """The rate as a fraction of the saturation rate (with `rates_of_capacity`), else None."""
    seed: int
    workload: WorkloadSummary
    metrics: RunMetrics
    calibration: Calibration | None
    """Isolated TTFT by prompt length before and after the run; None when no prompt length was known."""
    requests: tuple[RequestRecord, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy."""
        row = {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "requests"}
        row["requests"] = [record_dict(r) for r in self.requests]
        return row


@dataclass(frozen=True)
class SweepResult:
    """Every run of a sweep with what is needed to read it: model, SLO, machine, workload and settings."""

    model: str
    target: str
    """"engine" (in process) or the endpoint URL."""
    slo_s: float
    slo_source: str
    """"given" or "measured" (slo_factor x decode_iteration_s)."""
    tpot_slo_s: float
    """The TPOT SLO of goodput: given, or tpot_slo_factor x decode_iteration_s."""
    decode_iteration_s: float
    machine: Machine
    settings: SweepSettings
    started_at: str
    wall_s: float
    capacity: CapacityProbe | None
    """The saturation rate `rates_of_capacity` scaled (None without them)."""
    dataset: DatasetSummary | None
    runs: tuple[RunResult, ...]

    def meta(self) -> dict[str, Any]:
        """Everything but the runs, JSON-friendly."""
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "runs"}
