"""Workload generation and trace replay: settings are honoured within statistical bounds, seeds repeat."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from benchmarks.trace import TraceError, load_trace, write_trace
from benchmarks.workload import (
    LengthDistribution,
    LengthPair,
    PairPool,
    Workload,
    WorkloadError,
    WorkloadSettings,
    poisson_workload,
)

N = 3000
Z = 5.0  # bounds at 5 standard errors: a false failure for a fixed seed is practically impossible


@pytest.fixture(scope="module")
def big() -> Workload:
    settings = WorkloadSettings(
        num_requests=N,
        max_requests=N,
        ls_share=0.2,
        prompt_len=LengthDistribution(mean=220, cap=1024, sigma=1.2),
        max_tokens=LengthDistribution(mean=50, cap=128, sigma=0.5),
        seed=11,
    )
    return poisson_workload(settings, rate=10.0)


def test_arrivals_are_poisson_at_the_requested_rate(big: Workload) -> None:
    arrivals = [r.arrival_s for r in big.requests]
    gaps = [b - a for a, b in zip([0.0, *arrivals], arrivals, strict=False)]
    mean_gap = statistics.fmean(gaps)
    assert abs(mean_gap - 0.1) < Z * 0.1 / math.sqrt(N)
    # Exponential gaps: standard deviation equals the mean, and P(gap < mean * ln 2) = 1/2.
    assert statistics.pstdev(gaps) == pytest.approx(0.1, rel=0.1)
    below_median = sum(g < 0.1 * math.log(2) for g in gaps) / N
    assert abs(below_median - 0.5) < Z * math.sqrt(0.25 / N)
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    assert big.rate == 10.0 and len(big.requests) == N


def test_ls_share_matches(big: Workload) -> None:
    share = big.count("ls") / N
    assert abs(share - 0.2) < Z * math.sqrt(0.2 * 0.8 / N)
    assert big.count("ls") + big.count("be") == N


@pytest.mark.parametrize(("attr", "mean", "cap"), [("prompt_len", 220, 1024), ("max_tokens", 50, 128)])
def test_length_means_and_caps_match(big: Workload, attr: str, mean: int, cap: int) -> None:
    lengths = [r.prompt_len if attr == "prompt_len" else r.max_tokens for r in big.requests]
    values = [v for v in lengths if v is not None]
    assert len(values) == N
    sample_mean = statistics.fmean(values)
    assert abs(sample_mean - mean) < Z * statistics.stdev(values) / math.sqrt(N)
    assert min(values) >= 1 and max(values) <= cap
    if attr == "prompt_len":
        # Heavy tail: a few prompts hit the cap, yet the mean is still the configured one.
        assert 0 < sum(v == cap for v in values) < N * 0.1


def test_capped_mean_is_solved_exactly() -> None:
    dist = LengthDistribution(mean=220, cap=300, sigma=1.5)
    assert dist.capped_mean(dist.mu) == pytest.approx(220, rel=1e-9)
    # The naive location (uncapped mean 220) would fall well short once capped.
    assert dist.capped_mean(math.log(220) - 1.5**2 / 2) < 180


def test_prompt_tokens_stay_in_the_token_range() -> None:
    settings = WorkloadSettings(num_requests=200, token_low=10, token_high=20, seed=1)
    ids = [t for r in poisson_workload(settings, 5.0).requests for t in r.prompt_token_ids or ()]
    assert set(ids) == set(range(10, 20))


def test_same_seed_repeats_and_rates_only_rescale_time() -> None:
    settings = WorkloadSettings(num_requests=100, seed=3)
    a, b = poisson_workload(settings, 2.0), poisson_workload(settings, 2.0)
    assert a == b
    fast = poisson_workload(settings, 4.0)
    assert [r.arrival_s * 2 for r in fast.requests] == pytest.approx([r.arrival_s for r in a.requests])
    assert [(r.priority, r.max_tokens, r.prompt_token_ids) for r in fast.requests] == [
        (r.priority, r.max_tokens, r.prompt_token_ids) for r in a.requests
    ]
    other = poisson_workload(WorkloadSettings(num_requests=100, seed=4), 2.0)
    assert [r.priority for r in other.requests] != [r.priority for r in a.requests]


def test_duration_mode_counts_and_caps() -> None:
    w = poisson_workload(WorkloadSettings(duration_s=40.0, seed=2, prompt_len=LengthDistribution(8, 16)), 50.0)
    assert abs(len(w.requests) - 2000) < Z * math.sqrt(2000)
    assert w.span_s <= 40.0
    capped = poisson_workload(WorkloadSettings(duration_s=1000.0, max_requests=30), 50.0)
    assert len(capped.requests) == 30
    assert len(poisson_workload(WorkloadSettings(), 1.0).requests) == 50  # the default count


def test_settings_errors_say_what_to_fix() -> None:
    with pytest.raises(WorkloadError, match="not several"):
        WorkloadSettings(num_requests=5, duration_s=1.0)
    with pytest.raises(WorkloadError, match="not several"):
        WorkloadSettings(ls_requests=5, duration_s=1.0)
    with pytest.raises(WorkloadError, match="ls_share > 0"):
        WorkloadSettings(ls_requests=5, ls_share=0.0)
    with pytest.raises(WorkloadError, match="ls_share"):
        WorkloadSettings(ls_share=1.5)
    with pytest.raises(WorkloadError, match="below the cap"):
        LengthDistribution(mean=100, cap=50)
    with pytest.raises(WorkloadError, match="num_requests"):
        WorkloadSettings(num_requests=5000, max_requests=100)
    with pytest.raises(WorkloadError, match="rate"):
        poisson_workload(WorkloadSettings(), 0.0)


def test_ls_requests_mode_generates_until_that_many_ls_arrived() -> None:
    settings = WorkloadSettings(ls_requests=40, ls_share=0.2, seed=7)
    w = poisson_workload(settings, 5.0)
    assert w.count("ls") == 40
    assert w.requests[-1].priority == "ls"  # it stops at the 40th LS arrival
    assert len(poisson_workload(WorkloadSettings(ls_requests=40, max_requests=60, seed=7), 5.0).requests) == 60


def test_a_pair_pool_sets_the_lengths_and_caps_the_replies() -> None:
    pairs = (LengthPair(5, 300), LengthPair(12, 7), LengthPair(30, 64))
    pool = PairPool(pairs, "test pairs", max_tokens_cap=50)
    w = poisson_workload(WorkloadSettings(num_requests=300, seed=2, token_low=10, token_high=20), 4.0, pool)
    drawn = {(r.prompt_len, r.max_tokens) for r in w.requests}
    assert drawn == {(5, 50), (12, 7), (30, 50)}  # every pair drawn; replies over the cap ask for the cap
    assert all(10 <= t < 20 for r in w.requests for t in r.prompt_token_ids or ())
    assert "test pairs" in w.source
    assert poisson_workload(WorkloadSettings(num_requests=300, seed=2), 4.0, pool).requests[0].prompt_len in (5, 12, 30)


def test_a_pool_with_an_encoder_sends_the_real_prompt_ids() -> None:
    pool = PairPool((LengthPair(3, 9, "abc"),), "text", encode=lambda text: [ord(c) for c in text])
    (r,) = poisson_workload(WorkloadSettings(num_requests=1), 1.0, pool).requests
    assert r.prompt_token_ids == (97, 98, 99) and r.max_tokens == 9
    with pytest.raises(WorkloadError, match="no \\(prompt, reply\\) pairs"):
        PairPool((), "empty")


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_trace_replays_exactly(tmp_path: Path) -> None:
    trace = _write(
        tmp_path / "t.jsonl",
        [
            {"arrival_s": 1.5, "priority": "be", "prompt": "hello there", "max_tokens": 7},
            "",
            {"arrival_s": 0.25, "priority": "ls", "prompt_len": 12, "max_tokens": 3},
            {"arrival_s": 1.5, "priority": "latency_sensitive", "prompt": [5, 6, 7], "max_tokens": 1},
            {"arrival_s": 2.0, "priority": "BE", "prompt_len": 4, "max_tokens": 9},
        ],
    )
    w = load_trace(trace, seed=9, token_range=(3, 30))
    got = [(r.index, r.arrival_s, r.priority, r.max_tokens, r.prompt_text, r.prompt_len) for r in w.requests]
    assert got == [
        (0, 0.25, "ls", 3, None, 12),
        (1, 1.5, "be", 7, "hello there", None),  # equal times keep file order
        (2, 1.5, "ls", 1, None, 3),
        (3, 2.0, "be", 9, None, 4),
    ]
    assert w.requests[2].prompt_token_ids == (5, 6, 7)
    assert all(3 <= t < 30 for t in w.requests[0].prompt_token_ids or ())
    assert load_trace(trace, seed=9, token_range=(3, 30)) == w  # seeded prompt_len tokens repeat
    assert w.rate == pytest.approx(4 / 2.0)
    half = w.scaled_to(1.0)
    assert [r.arrival_s for r in half.requests] == pytest.approx([0.5, 3.0, 3.0, 4.0])
    assert half.rate == 1.0


def test_written_workload_round_trips(tmp_path: Path) -> None:
    w = poisson_workload(WorkloadSettings(num_requests=40, seed=5), 3.0)
    write_trace(w.requests, tmp_path / "w.jsonl")
    back = load_trace(tmp_path / "w.jsonl")
    assert [(r.arrival_s, r.priority, r.max_tokens, r.prompt_token_ids) for r in back.requests] == [
        (r.arrival_s, r.priority, r.max_tokens, r.prompt_token_ids) for r in w.requests
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"arrival_s": 1, "priority": "ls"', "not valid JSON"),
        ({"priority": "ls", "prompt_len": 3, "max_tokens": 1}, "missing field 'arrival_s'"),
        ({"arrival_s": 1, "priority": "urgent", "prompt_len": 3, "max_tokens": 1}, "priority must be"),
        ({"arrival_s": 1, "priority": "ls", "prompt": "x", "prompt_len": 3, "max_tokens": 1}, "exactly one"),
        ({"arrival_s": -1, "priority": "ls", "prompt_len": 3, "max_tokens": 1}, "arrival_s"),
        ({"arrival_s": 1, "priority": "ls", "prompt_len": 0, "max_tokens": 1}, "prompt_len"),
        ({"arrival_s": 1, "priority": "ls", "prompt_len": 2, "max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_trace_lines_name_file_and_line(tmp_path: Path, row: object, message: str) -> None:
    good = {"arrival_s": 0.5, "priority": "be", "prompt_len": 2, "max_tokens": 2}
    trace = _write(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(TraceError, match=message) as info:
        load_trace(trace)
    assert "bad.jsonl:2" in str(info.value)


def test_trace_without_a_time_span_is_rejected(tmp_path: Path) -> None:
    trace = _write(tmp_path / "burst.jsonl", [{"arrival_s": 0, "priority": "ls", "prompt_len": 2, "max_tokens": 2}])
    with pytest.raises(TraceError, match="no rate"):
        load_trace(trace)
    with pytest.raises(TraceError, match="cannot read"):
        load_trace(tmp_path / "missing.jsonl")
