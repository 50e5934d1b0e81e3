"""Metrics maths on known inputs: percentiles (numpy's linear method), SLO attainment, throughput."""

from __future__ import annotations

import random

import numpy as np
import pytest

from benchmarks.metrics import Distribution, MetricsError, RequestRecord, percentile, summarize


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


def test_distribution() -> None:
    d = Distribution.of([3.0, 1.0, 2.0])
    assert d is not None
    assert (d.count, d.mean, d.p50, d.max) == (3, 2.0, 2.0, 3.0)
    assert (d.p90, d.p99) == pytest.approx((2.8, 2.98))
    assert Distribution.of([]) is None


def rec(
    i: int,
    priority: str,
    sent: float,
    first: float | None,
    done: float | None,
    tokens: int,
    error: str | None = None,
) -> RequestRecord:
    return RequestRecord(i, priority, sent, sent, first, done, tokens, 10, error)  # type: ignore[arg-type]


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
    assert m.max_send_lag_s == pytest.approx(0.25)
    assert m.be.ttft is not None and m.be.ttft.mean == pytest.approx(0.25)  # measured from the actual send


def test_summary_rejects_bad_input() -> None:
    with pytest.raises(MetricsError, match="slo_s"):
        summarize([rec(0, "ls", 0, 0.1, 0.2, 2)], slo_s=0)
    with pytest.raises(MetricsError, match="without requests"):
        summarize([], slo_s=1.0)
