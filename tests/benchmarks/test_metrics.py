"""Metrics maths on known inputs: percentiles (numpy's linear method), SLO attainment, throughput."""

from __future__ import annotations

import random

import numpy as np
import pytest

from benchmarks.metrics import (
    Breakdown,
    Distribution,
    EngineCounts,
    MetricsError,
    RequestRecord,
    min_samples,
    percentile,
    summarize,
)
from benchmarks.workload import Priority
from qllm_core.timeline import Timeline


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1, 2, 3, 4], 50, 2.5),
        ([1, 2, 3, 4], 90, 3.7),
        ([1, 2, 3, 4], 99, 3.97),
        ([4, 1, 3, 2], 0, 1.0),
        ([4, 1, 3, 2], 100, 4.0),
        ([7.5], 99, 7.5),
        ([10, 20], 25, 12.5),
    ],
)
def test_percentile_known_values(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_matches_numpy_linear() -> None:
    rng = random.Random(0)
    for n in (1, 2, 3, 10, 101):
        values = [rng.lognormvariate(0, 1) for _ in range(n)]
        for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q, method="linear")))


def test_percentile_rejects_undefined_input() -> None:
    with pytest.raises(MetricsError, match="at least one"):
        percentile([], 50)
    with pytest.raises(MetricsError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


def test_distribution_reports_a_percentile_only_from_enough_samples() -> None:
    d = Distribution.of([3.0, 1.0, 2.0])
    assert d is not None
    assert (d.count, d.mean, d.p50, d.max) == (3, 2.0, 2.0, 3.0)
    assert (d.p90, d.p99) == (None, None)  # 3 samples say nothing about the top 10% or 1%
    assert Distribution.of([]) is None
    rng = random.Random(1)
    for n, has_p90, has_p99 in [(9, False, False), (10, True, False), (99, True, False), (100, True, True)]:
        values = [rng.random() for _ in range(n)]
        d = Distribution.of(values)
        assert d is not None
        assert (d.p90 is not None, d.p99 is not None) == (has_p90, has_p99)
        if d.p99 is not None:
            assert d.p99 == pytest.approx(float(np.percentile(values, 99)))
    assert (min_samples(50), min_samples(90), min_samples(99), min_samples(99.9)) == (1, 10, 100, 1000)


def rec(
    i: int,
    priority: str,
    sent: float,
    first: float | None,
    done: float | None,
    tokens: int,
    error: str | None = None,
    timeline: Timeline | None = None,
    isolated: float | None = None,
) -> RequestRecord:
    return RequestRecord(i, priority, sent, sent, first, done, tokens, 10, error, timeline, isolated)  # type: ignore[arg-type]


def _timeline(ttft: float, queued: float, own: float, foreign: float, passes: int = 1) -> Timeline:
    return Timeline(ttft, queued, passes, own, foreign, shared_tokens=7 * passes, shared_requests=passes)


def test_slowdown_divides_ttft_by_the_isolated_ttft_of_its_prompt_length() -> None:
    records = [
        rec(0, "ls", 0.0, 0.3, 1.0, 4, isolated=0.1),  # 3x
        rec(1, "ls", 1.0, 1.1, 2.0, 4, isolated=0.1),  # 1x, the physical limit
        rec(2, "ls", 2.0, None, None, 0, "timed out", isolated=0.1),  # no first token: no slowdown
        rec(3, "be", 0.0, 2.0, 3.0, 4, isolated=0.5),  # 4x
        rec(4, "be", 0.0, 2.0, 3.0, 4),  # not calibrated
    ]
    assert [r.slowdown for r in records] == pytest.approx([3.0, 1.0, None, 4.0, None])  # type: ignore[list-item]
    m = summarize(records, slo_s=1.0)
    assert m.ls.slowdown is not None and m.be.slowdown is not None
    assert (m.ls.slowdown.count, m.ls.slowdown.p50, m.ls.slowdown.max) == (2, pytest.approx(2.0), pytest.approx(3.0))
    assert (m.be.slowdown.count, m.be.slowdown.mean) == (1, pytest.approx(4.0))
    assert summarize([rec(0, "ls", 0.0, 0.1, 0.2, 2)], slo_s=1.0).ls.slowdown is None


def test_breakdown_summarises_each_part_of_the_engine_timelines() -> None:
    records = [
        rec(0, "ls", 0.0, 0.50, 1.0, 2, timeline=_timeline(0.45, 0.20, 0.10, 0.30)),
        rec(1, "ls", 1.0, 1.25, 2.0, 2, timeline=_timeline(0.20, 0.05, 0.15, 0.00, passes=2)),
        rec(2, "ls", 2.0, 2.10, 3.0, 2),  # no timeline (an HTTP target): left out of the breakdown
    ]
    m = summarize(records, slo_s=1.0)
    b = m.ls.breakdown
    assert b is not None and b.ttft_s.count == 2
    assert b.own_pass_s.mean == pytest.approx(0.125) and b.foreign_pass_s.max == pytest.approx(0.30)
    assert b.other_s.mean == pytest.approx(((0.45 - 0.10 - 0.30) + (0.20 - 0.15)) / 2)
    assert b.prefill_passes.mean == pytest.approx(1.5) and b.shared_tokens.max == pytest.approx(14)
    assert m.be.breakdown is None and Breakdown.of([]) is None
    # Client lag: the client's TTFT over the engine's, per request with a timeline.
    assert m.client_lag is not None and m.client_lag.count == 2
    assert m.client_lag.mean == pytest.approx(((0.50 - 0.45) + (0.25 - 0.20)) / 2)


def test_summary_per_class_and_overall() -> None:
    records = [
        rec(0, "ls", 0.0, 0.1, 1.0, 10),
        rec(1, "ls", 1.0, 1.2, 2.0, 5),  # TTFT exactly at the SLO: met
        rec(2, "ls", 2.0, 2.3, 3.0, 8),
        rec(3, "ls", 2.5, None, None, 0, "timed out"),  # no token: a miss, not left out
        rec(4, "be", 0.5, 1.5, 4.0, 11),
        rec(5, "be", 1.0, 1.5, 2.0, 1),
    ]
    m = summarize(records, slo_s=0.2)
    assert (m.requests, m.completed, m.failed) == (6, 5, 1)
    assert m.duration_s == 4.0  # first send at 0, last finish at 4
    assert m.requests_per_s == pytest.approx(5 / 4)
    assert m.output_tokens_per_s == pytest.approx((10 + 5 + 8 + 11 + 1) / 4)
    assert m.errors == ("timed out",)
    ls, be = m.ls, m.be
    assert (ls.requests, ls.completed, ls.failed) == (4, 3, 1)
    assert ls.slo_attainment == pytest.approx(2 / 4)
    assert ls.ttft is not None and ls.ttft.count == 3
    assert ls.ttft.mean == pytest.approx(0.2) and ls.ttft.p50 == pytest.approx(0.2)
    assert ls.turnaround is not None and ls.turnaround.mean == pytest.approx(1.0)
    assert ls.tpot is not None
    assert ls.tpot.mean == pytest.approx((0.9 / 9 + 0.8 / 4 + 0.7 / 7) / 3)
    assert be.slo_attainment == 0.0
    assert be.ttft is not None and be.ttft.mean == pytest.approx(0.75)
    assert be.turnaround is not None and be.turnaround.mean == pytest.approx((3.5 + 1.0) / 2)
    assert be.tpot is not None and be.tpot.count == 1  # a single-token request has no TPOT
    assert m.of("ls") is ls and m.of("be") is be


def test_summary_of_a_class_without_requests_and_send_lag() -> None:
    late = RequestRecord(0, "be", 1.0, 1.25, 1.5, 2.0, 3, None)
    m = summarize([late], slo_s=1.0)
    assert m.ls.requests == 0 and m.ls.slo_attainment is None and m.ls.ttft is None
    assert m.max_send_lag_s == pytest.approx(0.25) and m.send_lag.mean == pytest.approx(0.25)
    assert m.be.ttft is not None and m.be.ttft.mean == pytest.approx(0.25)  # measured from the actual send


def test_summary_rejects_bad_input() -> None:
    with pytest.raises(MetricsError, match="slo_s"):
        summarize([rec(0, "ls", 0, 0.1, 0.2, 2)], slo_s=0)
    with pytest.raises(MetricsError, match="without requests"):
        summarize([], slo_s=1.0)


def _timed(i: int, priority: Priority, sent: float, times: list[float], error: str | None = None) -> RequestRecord:
    """A request whose tokens arrived at `times` (a failed one keeps what it got, with no finish)."""
    done = None if error else times[-1]
    return RequestRecord(
        i,
        priority,
        sent,
        sent,
        times[0],
        done,
        len(times),
        10,
        error,
        token_times_s=tuple(times),
    )


def test_inter_token_latency_pools_every_gap_of_the_completed_requests_of_a_class() -> None:
    records = [
        _timed(0, "ls", 0.0, [0.5, 0.6, 0.8, 1.4]),  # gaps 0.1, 0.2, 0.6: a stall TPOT averages away
        _timed(1, "ls", 0.0, [0.3, 0.4]),  # gap 0.1
        _timed(2, "ls", 0.0, [0.2, 0.9, 5.0], error="cut"),  # failed: its gaps are not an answer's
        _timed(3, "ls", 0.0, [0.7]),  # one token: no gap
        _timed(4, "be", 0.0, [1.0, 3.0]),
    ]
    assert records[0].inter_token_gaps_s == pytest.approx((0.1, 0.2, 0.6))
    assert records[2].inter_token_gaps_s == ()
    m = summarize(records, slo_s=1.0)
    itl = m.ls.inter_token
    assert itl is not None and itl.count == 4
    assert (itl.p50, itl.max) == (pytest.approx(0.15), pytest.approx(0.6))
    assert m.ls.tpot is not None and m.ls.tpot.max == pytest.approx(0.9 / 3)
    assert m.be.inter_token is not None and m.be.inter_token.mean == pytest.approx(2.0)


def test_goodput_counts_requests_meeting_the_ttft_and_tpot_slos_together() -> None:
    records = [
        _timed(0, "ls", 0.0, [0.1, 0.2, 0.3]),  # TTFT 0.1, TPOT 0.1: meets both
        _timed(1, "ls", 0.0, [0.6, 0.7]),  # TTFT 0.6: misses the TTFT SLO
        _timed(2, "ls", 0.0, [0.1, 0.5]),  # TPOT 0.4: misses the TPOT SLO
        _timed(3, "ls", 0.0, [0.2]),  # one token: TTFT alone decides, met
        _timed(4, "be", 0.0, [0.1, 0.15, 0.2, 0.25, 4.0]),  # TTFT 0.1, TPOT 0.975: misses
        _timed(5, "be", 0.0, [0.1, 0.2], error="cut"),  # failed: never good
    ]
    m = summarize(records, slo_s=0.5, tpot_slo_s=0.2)
    assert m.duration_s == pytest.approx(4.0)
    assert m.ls.goodput_rps == pytest.approx(2 / 4.0)
    assert m.be.goodput_rps == pytest.approx(0.0)
    assert m.goodput_rps == pytest.approx(2 / 4.0)
    assert (m.tpot_slo_s, summarize(records, slo_s=0.5).goodput_rps) == (0.2, None)  # no TPOT SLO: no goodput
    with pytest.raises(MetricsError, match="tpot_slo_s"):
        summarize(records, slo_s=0.5, tpot_slo_s=-1.0)


def test_engine_counts_of_a_run_are_the_difference_of_two_readings() -> None:
    before, after = EngineCounts(passes=10, preemptions=2, merges=1), EngineCounts(35, 7, 1)
    run = after.since(before)
    assert run == EngineCounts(25, 5, 0)
    m = summarize([_timed(0, "ls", 0.0, [0.1, 0.2])], slo_s=1.0, engine=run)
    assert m.engine == run
    assert summarize([_timed(0, "ls", 0.0, [0.1, 0.2])], slo_s=1.0).engine is None  # an HTTP target shows none
