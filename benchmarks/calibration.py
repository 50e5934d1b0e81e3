"""Isolated TTFT by prompt length: what a request's TTFT would be on the idle target, the denominator of
its slowdown.

Measured on the same target right before each run and again right after it (the VM drifts: a decode
iteration measured 65 ms in one run and 96 ms in the next). Cheap by design: a grid of prompt lengths
spanning the run's prompts (`calibration_grid`: geometric steps, since TTFT grows about linearly and short
prompts are the common case), each sent alone `trials` times with lengths interleaved so drift spreads
over all of them, the minimum kept (the least disturbed measurement), and piecewise-linear interpolation
between grid points (`IsolatedTtft.at`; beyond the ends, the end segments extended).
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from benchmarks.runners import BenchmarkError, Runner, probe_specs
from benchmarks.workload import Workload

PROBE_MAX_TOKENS = 2
"""Tokens each probe asks for: the first is what is timed; a second keeps the first output an ordinary one
(a one-token request's first output is also its last, which does the finishing work before it is sent)."""
PROBE_DRAIN_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class IsolatedTtft:
    """Isolated TTFT (seconds) at each grid length, the minimum of `trials` probes."""

    prompt_lens: tuple[int, ...]
    ttft_s: tuple[float, ...]
    trials: int

    def __post_init__(self) -> None:
        if not self.prompt_lens or len(self.prompt_lens) != len(self.ttft_s):
            raise ValueError("an isolated-TTFT calibration needs one TTFT per grid length, and at least one")
        if list(self.prompt_lens) != sorted(set(self.prompt_lens)):
            raise ValueError("grid lengths must be increasing")

    def at(self, prompt_len: int) -> float:
        """Piecewise-linear interpolation between grid points (the end segments extended beyond them)."""
        xs, ys = self.prompt_lens, self.ttft_s
        if len(xs) == 1:
            return ys[0]
        i = min(max(bisect.bisect_right(xs, prompt_len), 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        value = y0 + (y1 - y0) * (prompt_len - x0) / (x1 - x0)
        return max(value, min(ys))  # an extended segment must not promise less than the fastest probe


@dataclass(frozen=True)
class Drift:
    """How the isolated TTFT moved over a run: after / before, per grid length."""

    ratios: tuple[float, ...]
    median: float
    low: float
    high: float

    @classmethod
    def between(cls, before: IsolatedTtft, after: IsolatedTtft) -> Drift:
        """The drift from `before` to `after` (same grid)."""
        if before.prompt_lens != after.prompt_lens:
            raise ValueError("drift compares calibrations on the same grid")
        ratios = tuple(a / b for a, b in zip(after.ttft_s, before.ttft_s, strict=True))
        return cls(ratios, statistics.median(ratios), min(ratios), max(ratios))


@dataclass(frozen=True)
class Calibration:
    """A run's isolated TTFT before it (what slowdowns divide by) and after it (to show the drift)."""

    before: IsolatedTtft
    after: IsolatedTtft
    drift: Drift


def calibration_grid(prompt_lens: Iterable[int], points: int) -> tuple[int, ...]:
    """At most `points` lengths from the shortest prompt to the longest, in geometric steps (both ends in)."""
    lens = sorted(set(prompt_lens))
    if not lens:
        raise ValueError("no prompt lengths to calibrate for (a text-only trace has none)")
    low, high = lens[0], lens[-1]
    if low == high:
        return (low,)
    points = max(points, 2)
    ratio = (high / low) ** (1.0 / (points - 1))
    return tuple(sorted({low, high, *(round(low * ratio**k) for k in range(1, points - 1))}))


def workload_prompt_lens(workloads: Sequence[Workload]) -> list[int]:
    """Every known prompt length in these workloads (text prompts have none until tokenized)."""
    return [n for w in workloads for r in w.requests if (n := r.prompt_len) is not None]


async def measure_isolated_ttft(
    runner: Runner, grid: Sequence[int], trials: int, token_range: tuple[int, int]
) -> IsolatedTtft:
    """Send one probe at a time, each grid length once per trial round, and keep each length's minimum."""
    if trials < 1:
        raise BenchmarkError("isolated-TTFT calibration needs at least one trial")
    best = [math.inf] * len(grid)
    for trial in range(trials):
        for i, n in enumerate(grid):
            (spec,) = probe_specs(1, n, PROBE_MAX_TOKENS, token_range, seed=trial)
            (record,) = await runner.run(Workload((spec,), 1.0, "calibration"), PROBE_DRAIN_TIMEOUT_S)
            ttft = record.ttft_s
            if ttft is None:
                raise BenchmarkError(f"{runner.label}: isolated-TTFT probe of {n} tokens failed: {record.error}")
            best[i] = min(best[i], ttft)
    return IsolatedTtft(tuple(grid), tuple(best), trials)
