"""Across seeds: one `Point` per (target, rate) with each headline metric's median and range over the seeds,
and each target's LS goodput.

A per-seed value is computed within its own run (a p99 from that run's samples, missing below 100 of them),
then summarised over the seeds: the spread shows how much a figure owes to the draw. The LS breakdown pools
the seeds' timelines (means and p90s of more samples, not a spread).
LS goodput: the highest rate such that at it and at every lower rate, LS SLO attainment is at least
`GOODPUT_ATTAINMENT` in every seed.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from benchmarks.metrics import Breakdown, Distribution, RequestRecord, RunMetrics
from benchmarks.results import RunResult
from benchmarks.workload import Priority

GOODPUT_ATTAINMENT = 0.99


@dataclass(frozen=True)
class Spread:
    """A metric over seeds: the median, the lowest and highest seed, and how many seeds had no value."""

    median: float
    low: float
    high: float
    seeds: int
    """Seeds with a value."""
    missing: int
    """Seeds without one (too few samples, or none)."""

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Spread | None:
        """The spread of the values present; None when no seed has one."""
        present = [v for v in values if v is not None]
        if not present:
            return None
        return cls(statistics.median(present), min(present), max(present), len(present), len(values) - len(present))


@dataclass(frozen=True)
class Pooled:
    """What users felt at one target and rate, every seed's requests pooled (three seeds of 100 LS requests
    give a p99 from 300 samples, where one seed's p99 rests on its single slowest request)."""

    ls_slowdown: Distribution | None
    ls_tpot: Distribution | None
    ls_inter_token: Distribution | None
    ls_turnaround: Distribution | None
    be_turnaround: Distribution | None

    @classmethod
    def of(cls, runs: Sequence[RunResult]) -> Pooled:
        """The pooled distributions of these runs (one per seed)."""

        def pool(priority: Priority, values: Callable[[RequestRecord], Iterable[float | None]]) -> Distribution | None:
            records = (r for run in runs for r in run.requests if r.priority == priority)
            return Distribution.of([v for r in records for v in values(r) if v is not None])

        return cls(
            ls_slowdown=pool("ls", lambda r: (r.slowdown,)),
            ls_tpot=pool("ls", lambda r: (r.tpot_s,)),
            ls_inter_token=pool("ls", lambda r: r.inter_token_gaps_s),
            ls_turnaround=pool("ls", lambda r: (r.turnaround_s,)),
            be_turnaround=pool("be", lambda r: (r.turnaround_s,)),
        )


@dataclass(frozen=True)
class Point:
    """One target at one rate, over its seeds."""

    label: str
    rate: float
    rate_of_capacity: float | None
    seeds: tuple[int, ...]
    ls_requests: Spread
    ls_ttft_samples: Spread
    """LS requests with a first token, per seed: what the percentiles were taken from."""
    ls_slowdown_p50: Spread | None
    ls_slowdown_p90: Spread | None
    ls_slowdown_p99: Spread | None
    ls_ttft_p50_s: Spread | None
    ls_ttft_p99_s: Spread | None
    ls_slo_attainment: Spread | None
    ls_tpot_p99_s: Spread | None
    be_slowdown_p50: Spread | None
    be_slowdown_p99: Spread | None
    be_completed: Spread
    output_tokens_per_s: Spread
    requests_per_s: Spread
    ls_turnaround_mean_s: Spread | None
    be_turnaround_mean_s: Spread | None
    unfinished: Spread
    """Requests failed or not finished within the drain timeout, per seed."""
    client_lag_p99_s: Spread | None
    send_lag_p99_s: Spread | None
    drift_median: Spread | None
    """Median over the grid of isolated TTFT after / before the run, per seed."""
    ls_breakdown: Breakdown | None
    """The LS timelines of every seed, pooled."""
    pooled: Pooled
    ls_goodput_rps: Spread | None
    """LS requests per second meeting the TTFT and TPOT SLOs together, per seed."""
    goodput_rps: Spread | None
    passes: Spread | None
    """Forward passes of the run, per seed (in-process and child targets)."""
    preemptions: Spread | None
    merges: Spread | None


def _spread(runs: Sequence[RunResult], metric: Callable[[RunResult], float | None]) -> Spread | None:
    return Spread.of([metric(r) for r in runs])


def _counted(runs: Sequence[RunResult], metric: Callable[[RunResult], float]) -> Spread:
    spread = Spread.of([metric(r) for r in runs])
    assert spread is not None  # a point has at least one run, and a count always has a value
    return spread


def _p(d: Distribution | None, q: int) -> float | None:
    if d is None:
        return None
    return d.p50 if q == 50 else d.p90 if q == 90 else d.p99


def _metrics(metric: Callable[[RunMetrics], float | None]) -> Callable[[RunResult], float | None]:
    return lambda run: metric(run.metrics)


def point_of(runs: Sequence[RunResult]) -> Point:
    """The point of one target and rate from its runs (one per seed)."""
    first = runs[0]
    timelines = [r.timeline for run in runs for r in run.requests if r.priority == "ls" and r.timeline is not None]
    return Point(
        label=first.label,
        rate=first.rate,
        rate_of_capacity=first.rate_of_capacity,
        seeds=tuple(r.seed for r in runs),
        ls_requests=_counted(runs, lambda r: r.metrics.ls.requests),
        ls_ttft_samples=_counted(runs, lambda r: 0 if r.metrics.ls.ttft is None else r.metrics.ls.ttft.count),
        ls_slowdown_p50=_spread(runs, _metrics(lambda m: _p(m.ls.slowdown, 50))),
        ls_slowdown_p90=_spread(runs, _metrics(lambda m: _p(m.ls.slowdown, 90))),
        ls_slowdown_p99=_spread(runs, _metrics(lambda m: _p(m.ls.slowdown, 99))),
        ls_ttft_p50_s=_spread(runs, _metrics(lambda m: _p(m.ls.ttft, 50))),
        ls_ttft_p99_s=_spread(runs, _metrics(lambda m: _p(m.ls.ttft, 99))),
        ls_slo_attainment=_spread(runs, _metrics(lambda m: m.ls.slo_attainment)),
        ls_tpot_p99_s=_spread(runs, _metrics(lambda m: _p(m.ls.tpot, 99))),
        be_slowdown_p50=_spread(runs, _metrics(lambda m: _p(m.be.slowdown, 50))),
        be_slowdown_p99=_spread(runs, _metrics(lambda m: _p(m.be.slowdown, 99))),
        be_completed=_counted(runs, lambda r: r.metrics.be.completed),
        output_tokens_per_s=_counted(runs, lambda r: r.metrics.output_tokens_per_s),
        requests_per_s=_counted(runs, lambda r: r.metrics.requests_per_s),
        ls_turnaround_mean_s=_spread(
            runs, _metrics(lambda m: None if m.ls.turnaround is None else m.ls.turnaround.mean)
        ),
        be_turnaround_mean_s=_spread(
            runs, _metrics(lambda m: None if m.be.turnaround is None else m.be.turnaround.mean)
        ),
        unfinished=_counted(runs, lambda r: r.metrics.failed),
        client_lag_p99_s=_spread(runs, _metrics(lambda m: _p(m.client_lag, 99))),
        send_lag_p99_s=_spread(runs, _metrics(lambda m: _p(m.send_lag, 99))),
        drift_median=_spread(runs, lambda r: None if r.calibration is None else r.calibration.drift.median),
        ls_breakdown=Breakdown.of(timelines),
        pooled=Pooled.of(runs),
        ls_goodput_rps=_spread(runs, _metrics(lambda m: m.ls.goodput_rps)),
        goodput_rps=_spread(runs, _metrics(lambda m: m.goodput_rps)),
        passes=_spread(runs, _metrics(lambda m: None if m.engine is None else m.engine.passes)),
        preemptions=_spread(runs, _metrics(lambda m: None if m.engine is None else m.engine.preemptions)),
        merges=_spread(runs, _metrics(lambda m: None if m.engine is None else m.engine.merges)),
    )


def points(runs: Sequence[RunResult]) -> tuple[Point, ...]:
    """One point per (target, rate): targets in the order they first ran, rates ascending."""
    groups: dict[tuple[str, float], list[RunResult]] = {}
    for run in runs:
        groups.setdefault((run.label, run.rate), []).append(run)
    order = list(dict.fromkeys(run.label for run in runs))
    keys = sorted(groups, key=lambda k: (order.index(k[0]), k[1]))
    return tuple(point_of(sorted(groups[k], key=lambda r: r.seed)) for k in keys)


@dataclass(frozen=True)
class Goodput:
    """A target's LS goodput: the highest rate it sustains with LS SLO attainment >= `attainment` in every
    seed, at that rate and every lower one; None when even the lowest rate misses."""

    label: str
    rate: float | None
    rate_of_capacity: float | None
    attainment: float
    highest_rate_tried: float


def goodputs(all_points: Sequence[Point], attainment: float = GOODPUT_ATTAINMENT) -> tuple[Goodput, ...]:
    """Every target's LS goodput (see `Goodput`)."""
    out: list[Goodput] = []
    for label in dict.fromkeys(p.label for p in all_points):
        best: Point | None = None
        mine = sorted((p for p in all_points if p.label == label), key=lambda p: p.rate)
        for point in mine:
            met = point.ls_slo_attainment
            if met is None or met.missing or met.low < attainment:
                break
            best = point
        out.append(
            Goodput(
                label,
                None if best is None else best.rate,
                None if best is None else best.rate_of_capacity,
                attainment,
                mine[-1].rate,
            )
        )
    return tuple(out)
