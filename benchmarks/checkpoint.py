"""A sweep's progress on disk, so a sweep longer than one sitting can be stopped and resumed.

`OUT/checkpoint.jsonl` holds a header line (the settings, the decode iteration the SLO comes from, the
saturation rate) and one line per finished run (its target, seed and rate, every request's record and the
calibration around it), each flushed as it is written. Rerunning the same command with `--resume` keeps
those runs and makes the rest: a run cut off part way is made again, whole. Metrics are computed from the
records at the end, as in a sweep made in one go.

The seeds may change between sittings: each run's workload is drawn from its own seed and the other
settings alone, so a sweep can be extended by seeds, or reported over the seeds it finished by resuming
with those (the saturation rate stays the one probed in the first sitting).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.calibration import Calibration, Drift, IsolatedTtft
from benchmarks.capacity import CapacityProbe
from benchmarks.metrics import RequestRecord
from benchmarks.results import record_dict
from benchmarks.sweep_settings import SweepSettings, SweepSettingsError, jsonable
from qllm_core.timeline import Timeline

CHECKPOINT_NAME = "checkpoint.jsonl"
_UNCHECKED_SETTINGS = ("progress", "seeds")
"""Settings that may differ between the sittings of one sweep (they do not shape any one run's results)."""

RunKey = tuple[str, int, float]
"""(target label, seed, rate) of one run."""


@dataclass(frozen=True)
class DoneRun:
    """A run read back from the checkpoint."""

    records: list[RequestRecord]
    calibration: Calibration | None


@dataclass
class Resumed:
    """What a checkpoint holds: the sweep-wide measurements and the runs already made."""

    decode_iteration_s: float | None = None
    capacity: CapacityProbe | None = None
    runs: dict[RunKey, DoneRun] = field(default_factory=dict)


def _settings_dict(settings: SweepSettings) -> dict[str, Any]:
    values = settings.to_dict()
    for name in _UNCHECKED_SETTINGS:
        values.pop(name, None)
    values["workload"].pop("seed", None)  # replaced by each run's own seed
    return values


def _record(row: dict[str, Any]) -> RequestRecord:
    t = row["timeline"]
    timeline = None
    if t is not None:
        timeline = Timeline(
            t["ttft_s"],
            t["queued_s"],
            t["prefill_passes"],
            t["own_pass_s"],
            t["foreign_pass_s"],
            t["shared_tokens"],
            t["shared_requests"],
        )
    return RequestRecord(
        index=row["index"],
        priority=row["priority"],
        scheduled_s=row["scheduled_s"],
        sent_s=row["sent_s"],
        first_token_s=row["first_token_s"],
        finished_s=row["finished_s"],
        output_tokens=row["output_tokens"],
        prompt_tokens=row["prompt_tokens"],
        error=row["error"],
        timeline=timeline,
        isolated_ttft_s=row["isolated_ttft_s"],
    )


def _isolated(row: dict[str, Any]) -> IsolatedTtft:
    return IsolatedTtft(tuple(row["prompt_lens"]), tuple(row["ttft_s"]), row["trials"])


def _calibration(row: dict[str, Any] | None) -> Calibration | None:
    if row is None:
        return None
    before, after = _isolated(row["before"]), _isolated(row["after"])
    return Calibration(before, after, Drift.between(before, after))


def _capacity(row: dict[str, Any] | None) -> CapacityProbe | None:
    return None if row is None else CapacityProbe(**row)


class Checkpoint:
    """Reads and appends `OUT/checkpoint.jsonl` (see the module docstring)."""

    def __init__(self, out_dir: Path, settings: SweepSettings) -> None:
        self.path = out_dir / CHECKPOINT_NAME
        self._settings = settings

    def exists(self) -> bool:
        """Whether an earlier sitting left a checkpoint here."""
        return self.path.is_file()

    def load(self) -> Resumed:
        """What the checkpoint holds; SweepSettingsError when it was written by other settings."""
        resumed = Resumed()
        if not self.exists():
            return resumed
        lines = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for n, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):
                    # A line cut off when the last sitting was stopped: dropped, and that run made again.
                    self.path.write_text("".join(f"{kept}\n" for kept in lines[:-1]), encoding="utf-8")
                    break
                raise SweepSettingsError(f"{self.path}:{n} is not valid JSON; the checkpoint is damaged") from None
            if row["kind"] == "header":
                if row["settings"] != _settings_dict(self._settings):
                    raise SweepSettingsError(
                        f"{self.path} was written by a sweep with other settings; resume with the same command "
                        "line, or give another --out"
                    )
                resumed.decode_iteration_s = row["decode_iteration_s"]
                resumed.capacity = _capacity(row["capacity"])
            else:
                key = (row["label"], row["seed"], row["rate"])
                resumed.runs[key] = DoneRun([_record(r) for r in row["requests"]], _calibration(row["calibration"]))
        return resumed

    def _append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
            f.flush()

    def write_header(self, decode_iteration_s: float, capacity: CapacityProbe | None) -> None:
        """Record the sweep-wide measurements, once, before the first run is written."""
        settings = _settings_dict(self._settings)
        self._append(
            {
                "kind": "header",
                "settings": settings,
                "decode_iteration_s": decode_iteration_s,
                "capacity": jsonable(capacity),
            }
        )

    def write_run(self, key: RunKey, records: list[RequestRecord], calibration: Calibration | None) -> None:
        """Record one finished run."""
        label, seed, rate = key
        self._append(
            {
                "kind": "run",
                "label": label,
                "seed": seed,
                "rate": rate,
                "requests": [record_dict(r) for r in records],
                "calibration": jsonable(calibration),
            }
        )
