"""Isolated-TTFT calibration maths: the grid, piecewise-linear interpolation, drift, and the minimum of
trials (on a scripted runner, so no timing is asserted)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator, Callable

import pytest

from benchmarks.calibration import Drift, IsolatedTtft, calibration_grid, measure_isolated_ttft
from benchmarks.metrics import RequestRecord
from benchmarks.runners import BenchmarkError, Runner, StreamEvent
from benchmarks.workload import RequestSpec, Workload


def test_grid_spans_the_prompts_in_geometric_steps() -> None:
    grid = calibration_grid([40, 3, 900, 17, 3], points=5)
    assert grid[0] == 3 and grid[-1] == 900 and len(grid) == 5
    ratios = [b / a for a, b in itertools.pairwise(grid)]
    assert max(ratios) / min(ratios) < 1.2  # about equal steps on a log scale
    assert calibration_grid([5, 6], points=8) == (5, 6)  # never more points than distinct lengths
    assert calibration_grid([64, 64], points=8) == (64,)
    with pytest.raises(ValueError, match="no prompt lengths"):
        calibration_grid([], points=8)


def test_interpolation_is_piecewise_linear_and_exact_on_the_grid() -> None:
    iso = IsolatedTtft((10, 100, 1000), (0.02, 0.05, 0.50), trials=3)
    assert [iso.at(n) for n in (10, 100, 1000)] == pytest.approx([0.02, 0.05, 0.50])
    assert iso.at(55) == pytest.approx(0.035)  # halfway between 10 and 100
    assert iso.at(550) == pytest.approx(0.275)
    assert iso.at(1100) == pytest.approx(0.55)  # the last segment extended
    assert iso.at(1) == pytest.approx(0.02)  # never below the fastest probe
    assert IsolatedTtft((64,), (0.03,), 3).at(500) == 0.03
    with pytest.raises(ValueError, match="increasing"):
        IsolatedTtft((100, 10), (0.1, 0.2), 3)


def test_drift_is_after_over_before_per_grid_length() -> None:
    before = IsolatedTtft((10, 100, 1000), (0.02, 0.05, 0.50), 3)
    after = IsolatedTtft((10, 100, 1000), (0.03, 0.05, 0.40), 3)
    d = Drift.between(before, after)
    assert d.ratios == pytest.approx((1.5, 1.0, 0.8))
    assert (d.median, d.low, d.high) == pytest.approx((1.0, 0.8, 1.5))
    with pytest.raises(ValueError, match="same grid"):
        Drift.between(before, IsolatedTtft((10,), (0.1,), 3))


class ScriptedRunner(Runner):
    """Answers `run` with a TTFT chosen by a script of (prompt length, call number); streams nothing."""

    label = "scripted"

    def __init__(self, ttft: Callable[[int, int], float | None]) -> None:
        self.ttft = ttft
        self.sent: list[int] = []

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def stream(self, spec: RequestSpec) -> AsyncIterator[StreamEvent]:
        raise AssertionError("not used")
        yield StreamEvent(0)  # pragma: no cover

    async def run(
        self, workload: Workload, drain_timeout_s: float = 120.0, on_done: Callable[[], None] | None = None
    ) -> list[RequestRecord]:
        (spec,) = workload.requests
        n = spec.prompt_len or 0
        self.sent.append(n)
        ttft = self.ttft(n, len(self.sent))
        first = None if ttft is None else 1.0 + ttft
        record = RequestRecord(0, spec.priority, 0.0, 1.0, first, first, 2, n, None if ttft else "failed")
        return [dataclasses.replace(record, finished_s=None) if ttft is None else record]


async def test_each_length_keeps_its_fastest_trial_and_lengths_are_interleaved() -> None:
    # Trial k (calls 1-3, 4-6, 7-9) is slow for a different length each time; the minimum drops it.
    slow = {1: 10, 5: 20, 9: 40}
    runner = ScriptedRunner(lambda n, call: n / 1000 + (1.0 if slow.get(call) == n else 0.0))
    iso = await measure_isolated_ttft(runner, (10, 20, 40), trials=3, token_range=(3, 500))
    assert runner.sent == [10, 20, 40] * 3
    assert iso.ttft_s == pytest.approx((0.010, 0.020, 0.040)) and iso.trials == 3


async def test_a_failed_probe_stops_the_calibration() -> None:
    runner = ScriptedRunner(lambda n, call: None if n == 20 else 0.01)
    with pytest.raises(BenchmarkError, match="probe of 20 tokens failed"):
        await measure_isolated_ttft(runner, (10, 20), trials=2, token_range=(3, 500))
