"""End to end on the tiny model: the CLI runs 2 rates x 2 policies and writes JSON, Markdown and PNGs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

from benchmarks.cli import build_parser, main
from benchmarks.report import JSON_NAME, MARKDOWN_NAME
from benchmarks.sweep import SweepSettings, SweepSettingsError, parse_policies
from benchmarks.workload import LengthDistribution, WorkloadSettings, poisson_workload

WORKLOAD = WorkloadSettings(
    num_requests=6,
    ls_share=0.5,
    prompt_len=LengthDistribution(24, 64),
    max_tokens=LengthDistribution(6, 12, sigma=0.5),  # the CLI's default spreads
    seed=3,
)
ARGS = [
    "--model=tiny",
    "--device=cpu",
    "--policies=fcfs,qllm:layer",
    "--rates=20,40",
    "--num-requests=6",
    "--ls-share=0.5",
    "--prompt-len-mean=24",
    "--prompt-len-cap=64",
    "--max-tokens-mean=6",
    "--max-tokens-cap=12",
    "--seed=3",
    "--warmup-requests=1",
    "--calibration-batch=4",
    "--calibration-tokens=6",
    "--drain-timeout-s=60",
    "--no-progress",
    "--quiet",
]


def _strict_json(path: Path) -> dict[str, Any]:
    def reject(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "out"
    assert main([*ARGS, f"--out={out}"]) == 0
    return out


def test_json_has_one_record_per_rate_and_policy(sweep_dir: Path) -> None:
    data = _strict_json(sweep_dir / JSON_NAME)
    meta = data["meta"]
    assert meta["model"] == "tiny" and meta["target"] == "engine"
    assert {"platform", "cpu_count", "torch"} <= set(meta["machine"]) and meta["machine"]["torch"]
    assert meta["slo_source"] == "measured"
    assert meta["decode_iteration_s"] > 0
    assert meta["slo_s"] == pytest.approx(10 * meta["decode_iteration_s"])
    assert meta["settings"]["rates"] == [20.0, 40.0]
    assert meta["settings"]["engine_overrides"] == {"device": "cpu"}
    records = data["records"]
    assert sorted((r["label"], r["rate"]) for r in records) == [
        ("fcfs:iteration", 20.0),
        ("fcfs:iteration", 40.0),
        ("qllm:layer", 20.0),
        ("qllm:layer", 40.0),
    ]
    for r in records:
        # Every request of the seeded workload was sent on schedule and produced exactly max_tokens tokens.
        expected = poisson_workload(WORKLOAD, r["rate"]).requests
        m = r["metrics"]
        assert (m["requests"], m["completed"], m["failed"]) == (6, 6, 0), m["errors"]
        assert m["ls"]["requests"] == sum(s.priority == "ls" for s in expected) == r["workload"]["ls"]
        assert m["slo_s"] == meta["slo_s"]
        assert m["requests_per_s"] > 0 and m["output_tokens_per_s"] > 0
        assert len(r["requests"]) == 6
        for got, spec in zip(r["requests"], expected, strict=True):
            assert got["priority"] == spec.priority
            assert got["scheduled_s"] == pytest.approx(spec.arrival_s)
            assert got["output_tokens"] == spec.max_tokens
            assert got["prompt_tokens"] == spec.prompt_len
            assert got["sent_s"] <= got["first_token_s"] <= got["finished_s"]
        ttfts = [q["first_token_s"] - q["sent_s"] for q in r["requests"] if q["priority"] == "ls"]
        assert m["ls"]["ttft"]["mean"] == pytest.approx(sum(ttfts) / len(ttfts))
        attained = sum(t <= meta["slo_s"] for t in ttfts) / len(ttfts)
        assert m["ls"]["slo_attainment"] == pytest.approx(attained)


def test_markdown_has_a_row_per_record(sweep_dir: Path) -> None:
    text = (sweep_dir / MARKDOWN_NAME).read_text(encoding="utf-8")
    data = _strict_json(sweep_dir / JSON_NAME)
    assert f"{data['meta']['slo_s'] * 1000:.1f} ms" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| Policy | Rate")
    for label, rate in [("fcfs:iteration", 20), ("fcfs:iteration", 40), ("qllm:layer", 20), ("qllm:layer", 40)]:
        assert any(row.startswith(f"| {label} | {rate} | 6/6 |") for row in rows), rows
    assert len(rows) == 5


@pytest.mark.parametrize("name", ["ls_ttft.png", "throughput.png", "turnaround.png"])
def test_plots_are_real_pngs(sweep_dir: Path, name: str) -> None:
    path = sweep_dir / name
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = np.asarray(imread(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400
    assert float(pixels[..., :3].std()) > 0.01  # something was drawn, not a blank canvas
    # Each policy gets its own line colour: more than a few distinct colours.
    rgb = (pixels[..., :3] * 255).astype(np.uint32)
    assert len(np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])) > 20


def test_every_option_is_documented(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    options = {s for a in parser._actions for s in a.option_strings}
    for flag in (
        "--model",
        "--policies",
        "--rates",
        "--duration",
        "--num-requests",
        "--ls-share",
        "--slo-ms",
        "--seed",
        "--trace",
        "--endpoint",
        "--out",
        "--max-tokens-cap",
        "--prompt-len-cap",
    ):
        assert flag in options
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "--slo-ms" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rates=0"], "every rate must be a positive number"),
        (["--policies=bogus"], "policy='bogus' is unknown"),
        (["--policies=qllm:sometimes"], "granularity='sometimes' is unknown"),
        (["--trace=t.jsonl", "--num-requests=5"], "a trace sets its own requests"),
        (["--num-requests=5", "--duration=3"], "not allowed with argument"),
        (["--endpoint=ftp://x"], "http:// or https://"),
        (["--engine-config=[1]"], "must be a JSON object"),
        (["--max-tokens-mean=500"], "below the cap"),
    ],
)
def test_bad_options_exit_with_a_message(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--no-progress"])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_trace_settings_replay_as_recorded_or_rescaled(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    rows = [{"arrival_s": t, "priority": p, "prompt_len": 4, "max_tokens": 2} for t, p in [(0.5, "ls"), (2.0, "be")]]
    trace.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    (as_recorded,) = SweepSettings(trace=trace, policies=parse_policies("fcfs")).workloads()
    assert as_recorded.rate == 1.0 and [r.arrival_s for r in as_recorded.requests] == [0.5, 2.0]
    scaled = SweepSettings(trace=trace, rates=(2.0, 4.0), policies=parse_policies("qllm:expert")).workloads()
    assert [w.rate for w in scaled] == [2.0, 4.0]
    assert [r.arrival_s for r in scaled[1].requests] == [0.125, 0.5]
    assert [r.priority for r in scaled[0].requests] == ["ls", "be"]


def test_policy_names_take_their_default_granularity() -> None:
    assert [p.label for p in parse_policies("fcfs, priority,qllm,qllm:expert")] == [
        "fcfs:iteration",
        "priority:iteration",
        "qllm:layer",
        "qllm:expert",
    ]
    with pytest.raises(SweepSettingsError, match="repeat"):
        SweepSettings(policies=parse_policies("qllm,qllm:layer"))
