"""The JSON form of the benchmarks' dataclasses: built back by field name, with nested types, refusing what
does not fit; and a checkpoint line written before a field existed still read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.calibration import Calibration, Drift, IsolatedTtft
from benchmarks.checkpoint import Checkpoint, DoneRun
from benchmarks.json_form import JsonFormError, from_dict, jsonable, write_json
from benchmarks.metrics import EngineCounts, RequestRecord
from benchmarks.sweep_settings import EngineHost, SweepSettings
from qllm_core.timeline import Timeline


def _record() -> RequestRecord:
    timeline = Timeline(0.4, 0.1, 2, 0.25, 0.1, shared_tokens=30, shared_requests=3)
    return RequestRecord(7, "ls", 0.0, 0.1, 0.5, 1.0, 3, 12, None, timeline, 0.2, (0.5, 0.75, 1.0))


def test_a_record_survives_the_round_trip_with_its_nested_timeline_and_token_times() -> None:
    record = _record()
    row = json.loads(json.dumps(jsonable(record)))
    row["ttft_s"] = record.ttft_s  # derived values written for readers are properties: accepted and dropped
    row["timeline"]["other_s"] = 0.05
    back = from_dict(RequestRecord, row)
    assert back == record
    assert isinstance(back.timeline, Timeline) and isinstance(back.token_times_s, tuple)


def test_from_dict_builds_by_name_not_by_position() -> None:
    row = jsonable(_record().timeline)
    shuffled = dict(reversed(list(row.items())))  # a positional rebuild would swap every field
    assert from_dict(Timeline, shuffled) == _record().timeline


def test_from_dict_converts_enums_paths_and_tuples_from_the_type_hints() -> None:
    settings = SweepSettings(engine_host=EngineHost.CHILD, trace=Path("t.jsonl"), rates=None, seeds=(1, 2))
    back = from_dict(SweepSettings, json.loads(json.dumps(jsonable(settings))))
    assert back == settings
    assert back.engine_host is EngineHost.CHILD and back.trace == Path("t.jsonl") and back.seeds == (1, 2)


def test_from_dict_refuses_an_unknown_key_a_missing_field_and_a_non_object() -> None:
    row = jsonable(EngineCounts(3, 1, 0))
    with pytest.raises(JsonFormError, match="EngineCounts has no field 'restarts'"):
        from_dict(EngineCounts, {**row, "restarts": 1})
    del row["merges"]
    with pytest.raises(JsonFormError, match="merges"):
        from_dict(EngineCounts, row)
    with pytest.raises(JsonFormError, match="expected a JSON object"):
        from_dict(EngineCounts, [3, 1, 0])


def test_write_json_refuses_nan_rather_than_writing_a_file_json_parsers_reject(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="JSON compliant"):
        write_json(tmp_path / "x.json", {"value": float("nan")})
    assert json.loads(write_json(tmp_path / "sub" / "y.json", EngineCounts(1, 2, 3)).read_text()) == {
        "passes": 1,
        "preemptions": 2,
        "merges": 3,
        "resumes": 0,
    }


def test_a_checkpoint_run_written_before_token_times_and_engine_counts_is_still_read(tmp_path: Path) -> None:
    settings = SweepSettings()
    checkpoint = Checkpoint(tmp_path, settings)
    iso = IsolatedTtft((8, 64), (0.01, 0.05), 2)
    calibration = Calibration(iso, iso, Drift.between(iso, iso))
    checkpoint.write_header(0.02, None)
    checkpoint.write_run(DoneRun("fcfs:iteration", 0, 2.0, (_record(),), calibration, EngineCounts(9, 0, 0)))
    old = jsonable(DoneRun("qllm:layer", 0, 2.0, (_record(),), None))
    del old["engine"]
    del old["requests"][0]["token_times_s"]
    with checkpoint.path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(old) + "\n")
    runs = checkpoint.load().runs
    assert runs[("fcfs:iteration", 0, 2.0)].engine == EngineCounts(9, 0, 0)
    assert runs[("fcfs:iteration", 0, 2.0)].calibration == calibration
    (request,) = runs[("qllm:layer", 0, 2.0)].requests
    assert runs[("qllm:layer", 0, 2.0)].engine is None and request.token_times_s == ()
