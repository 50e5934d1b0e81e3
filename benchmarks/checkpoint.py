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
from typing import Any, Literal

from benchmarks.calibration import Calibration
from benchmarks.capacity import CapacityProbe
from benchmarks.json_form import JsonFormError, from_dict, jsonable
from benchmarks.metrics import EngineCounts, RequestRecord
from benchmarks.sweep_settings import SweepSettings, SweepSettingsError

CHECKPOINT_NAME = "checkpoint.jsonl"
_UNCHECKED_SETTINGS = ("progress", "seeds", "tpot_slo_s", "tpot_slo_factor")
"""Settings that may differ between the sittings of one sweep (they do not shape any one run's records)."""

RunKey = tuple[str, int, float]
"""(target label, seed, rate) of one run."""


@dataclass(frozen=True)
class _Header:
    """The first line: the settings the runs were made with and the sweep-wide measurements."""

    settings: dict[str, Any]
    decode_iteration_s: float
    capacity: CapacityProbe | None
    kind: Literal["header"] = "header"


@dataclass(frozen=True)
class DoneRun:
    """One finished run, as a line of the checkpoint."""

    label: str
    seed: int
    rate: float
    requests: tuple[RequestRecord, ...]
    calibration: Calibration | None
    engine: EngineCounts | None = None
    """None in lines written before engine counts were kept, or from an HTTP target."""
    kind: Literal["run"] = "run"

    @property
    def key(self) -> RunKey:
        """Which run this is."""
        return self.label, self.seed, self.rate


_LINES: dict[str, type[_Header] | type[DoneRun]] = {"header": _Header, "run": DoneRun}


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


def _line(row: Any) -> _Header | DoneRun:
    """One checkpoint line from its JSON value, by its `kind`."""
    kind = _LINES.get(str(row.get("kind"))) if isinstance(row, dict) else None
    if kind is None:
        raise JsonFormError("a checkpoint line is an object whose kind is 'header' or 'run'")
    return from_dict(kind, row)


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
        for n, text in enumerate(lines, 1):
            try:
                line = _line(json.loads(text))
            except json.JSONDecodeError:
                if n == len(lines):
                    # A line cut off when the last sitting was stopped: dropped, and that run made again.
                    self.path.write_text("".join(f"{kept}\n" for kept in lines[:-1]), encoding="utf-8")
                    break
                raise SweepSettingsError(f"{self.path}:{n} is not valid JSON; the checkpoint is damaged") from None
            except JsonFormError as exc:
                raise SweepSettingsError(f"{self.path}:{n}: {exc}; the checkpoint is damaged") from None
            if isinstance(line, DoneRun):
                resumed.runs[line.key] = line
                continue
            if line.settings != _settings_dict(self._settings):
                raise SweepSettingsError(
                    f"{self.path} was written by a sweep with other settings; resume with the same command "
                    "line, or give another --out"
                )
            resumed.decode_iteration_s, resumed.capacity = line.decode_iteration_s, line.capacity
        return resumed

    def _append(self, line: _Header | DoneRun) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(jsonable(line), allow_nan=False) + "\n")
            f.flush()

    def write_header(self, decode_iteration_s: float, capacity: CapacityProbe | None) -> None:
        """Record the sweep-wide measurements, once, before the first run is written."""
        self._append(_Header(_settings_dict(self._settings), decode_iteration_s, capacity))

    def write_run(self, run: DoneRun) -> None:
        """Record one finished run."""
        self._append(run)
