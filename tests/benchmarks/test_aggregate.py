"""Across seeds: spreads, one point per (policy, rate), LS goodput; and the capacity probe's window maths."""

from __future__ import annotations

import pytest

from benchmarks.aggregate import Spread, goodputs, points
from benchmarks.capacity import capacity_from_records
from benchmarks.metrics import RequestRecord, percentile, summarize
from benchmarks.results import RunResult
from benchmarks.runners import BenchmarkError
from benchmarks.workload import WorkloadSummary

SLO = 0.5


def _records(ls_ttfts: list[float], be: int = 2) -> list[RequestRecord]:
    out = [RequestRecord(i, "ls", i, i, i + t, i + t + 1, 4, 8, isolated_ttft_s=0.1) for i, t in enumerate(ls_ttfts)]
    n = len(out)
    out += [RequestRecord(n + j, "be", j, j, j + 1.0, j + 2.0, 4, 8) for j in range(be)]
    return out


def _run(label: str, rate: float, seed: int, ls_ttfts: list[float]) -> RunResult:
    records = _records(ls_ttfts)
    summary = WorkloadSummary("test", rate, len(records), len(ls_ttfts), 2, 1.0, 8.0, 4.0)
    return RunResult(label, None, None, rate, None, seed, summary, summarize(records, SLO), None, tuple(records))


def test_spread_is_the_median_and_range_of_the_seeds_that_have_a_value() -> None:
    s = Spread.of([3.0, None, 1.0, 2.0])
    assert s is not None and (s.median, s.low, s.high, s.seeds, s.missing) == (2.0, 1.0, 3.0, 3, 1)
    assert Spread.of([None, None]) is None


def test_points_group_seeds_by_policy_and_rate() -> None:
    runs = [
        _run("qllm", 2.0, 0, [0.1, 0.3]),
        _run("fcfs", 1.0, 0, [0.2]),
        _run("qllm", 1.0, 1, [0.1]),
        _run("qllm", 1.0, 0, [0.3]),
        _run("qllm", 2.0, 1, [0.5, 0.5]),
    ]
    got = points(runs)
    assert [(p.label, p.rate, p.seeds) for p in got] == [
        ("qllm", 1.0, (0, 1)),
        ("qllm", 2.0, (0, 1)),
        ("fcfs", 1.0, (0,)),
    ]
    q2 = got[1]
    # LS slowdown p50 per seed: seed 0 has TTFTs 0.1 and 0.3 over 0.1 (p50 2x), seed 1 two at 5x.
    assert q2.ls_slowdown_p50 is not None
    assert (q2.ls_slowdown_p50.low, q2.ls_slowdown_p50.high) == pytest.approx((2.0, 5.0))
    assert q2.ls_slowdown_p99 is None  # 2 samples a seed: no p99
    assert q2.ls_ttft_samples.low == 2 and q2.unfinished.high == 0
    assert q2.ls_breakdown is None  # no engine timelines in these records


def test_goodput_is_the_highest_rate_met_in_every_seed_at_it_and_below() -> None:
    fast, slow = [0.1] * 10, [0.1] * 9 + [0.9]  # 100% and 90% LS SLO attainment
    runs = [
        _run("a", 1.0, 0, fast),
        _run("a", 1.0, 1, fast),
        _run("a", 2.0, 0, fast),
        _run("a", 2.0, 1, slow),  # one seed misses at 2: goodput 1
        _run("a", 4.0, 0, fast),
        _run("a", 4.0, 1, fast),  # met again at 4, but 2 already missed
        _run("b", 1.0, 0, slow),
        _run("c", 1.0, 0, fast),
        _run("c", 3.0, 0, fast),
    ]
    by_label = {g.label: g for g in goodputs(points(runs))}
    assert by_label["a"].rate == 1.0 and by_label["a"].highest_rate_tried == 4.0
    assert by_label["b"].rate is None
    assert by_label["c"].rate == 3.0


def _burst(first_tokens: list[float], finishes: list[float]) -> list[RequestRecord]:
    pairs = zip(first_tokens, finishes, strict=True)
    return [RequestRecord(i, "be", 0.0, 0.0, f, d, 4, 8) for i, (f, d) in enumerate(pairs)]


def test_capacity_is_the_completion_rate_between_the_bursts_quartiles() -> None:
    # Waves of two equal requests, a wave every 2 s: 16 requests finish in pairs at 2, 4, ..., 16 s.
    starts = [0.1 + 2 * (k // 2) for k in range(16)]
    records = _burst(starts, [s + 1.9 for s in starts])
    probe = capacity_from_records(records, "fcfs:iteration")
    # Completions 4 and 12 (6 s and 14 s) are a whole number of waves apart: 8 in 8 s, 1 req/s exactly.
    assert probe.completed_in_window == 8 and probe.window_s == pytest.approx(8.0)
    assert probe.rate_rps == pytest.approx(1.0) and probe.requests == 16


def test_capacity_probe_that_never_queued_or_did_not_finish_says_what_to_change() -> None:
    with pytest.raises(BenchmarkError, match="more than four times the engine's max_batch_size"):
        capacity_from_records(_burst([0.1] * 4, [2.0, 3.0, 4.0, 5.0]), "fcfs")  # all started at once
    four_waves = [0.1 + 2 * (k // 2) for k in range(8)]  # the third quartile falls in the last wave
    with pytest.raises(BenchmarkError, match="ran dry"):
        capacity_from_records(_burst(four_waves, [s + 1.9 for s in four_waves]), "fcfs")
    unfinished = [*_burst([0.1], [1.0]), RequestRecord(1, "be", 0.0, 0.0, 0.5, None, 2, 8, "timed out")]
    with pytest.raises(BenchmarkError, match="did not finish"):
        capacity_from_records(unfinished, "fcfs")


def test_pooled_percentiles_take_every_seeds_requests_so_a_p99_exists_where_no_seed_has_one() -> None:
    # Three seeds of 40 LS requests: no seed alone has the 100 samples of a p99; pooled, 120 do.
    runs = [_run("qllm", 1.0, seed, [0.1 * (1 + (i + seed) % 7) for i in range(40)]) for seed in range(3)]
    (point,) = points(runs)
    assert point.ls_slowdown_p99 is None
    pooled = point.pooled
    slowdowns = sorted(r.slowdown for run in runs for r in run.requests if r.slowdown is not None)
    assert pooled.ls_slowdown is not None and pooled.ls_slowdown.count == 120
    assert pooled.ls_slowdown.p99 == pytest.approx(percentile(slowdowns, 99))
    # Each record turns around 1 s after its first token, LS and BE alike.
    assert pooled.ls_turnaround is not None and pooled.ls_turnaround.p50 == pytest.approx(
        1.0 + percentile([0.1 * (1 + (i + s) % 7) for s in range(3) for i in range(40)], 50)
    )
    assert pooled.be_turnaround is not None and pooled.be_turnaround.count == 6
    assert pooled.ls_inter_token is None  # these records carry no token times
    assert point.passes is None and point.goodput_rps is None  # no engine counts, no TPOT SLO here
