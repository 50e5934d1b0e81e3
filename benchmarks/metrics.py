"""Metrics of one run, per class (LS, BE) and overall, from client-side timestamps of each request.

Definitions (all times in seconds, measured by the client on one monotonic clock):

- TTFT: first token received - request sent. Over the requests that received a token.
- SLO attainment: the fraction of *all* requests of the class whose TTFT <= slo (inclusive); a request
  that failed or never got a token counts as a miss, so overload cannot improve the score.
- Turnaround (end to end): last token received - request sent. Over completed requests.
- TPOT (time per output token): (last token - first token) / (output tokens - 1). Over completed
  requests with at least two output tokens.
- Inter-token latency: every gap between two consecutive output tokens of a completed request, pooled
  over the class (`RequestRecord.token_times_s`; a chunk carrying several tokens stamps them alike, so its
  extra tokens show as gaps of 0). TPOT is a request's mean gap; this shows the stalls inside it.
- Goodput: requests per second (over the duration) that completed with TTFT <= slo and TPOT <= tpot_slo
  (a one-token request has no TPOT and needs the TTFT alone); None without a TPOT SLO.
- Slowdown: TTFT / the isolated TTFT of the same prompt length on the idle target (`isolated_ttft_s`,
  measured around the run by `benchmarks.calibration`): what the scheduler cost the request; 1 is the limit.
- Duration: first request sent -> last completed request finished (the makespan).
- Throughput: completed requests / duration and output tokens of completed requests / duration.
- Send lag: actual send - scheduled send (how faithfully the client offered the load).
- Client lag: TTFT the client saw - TTFT the engine recorded (`Timeline.ttft_s`): the time between the
  engine's clock and the client's at both ends (handing the request in, handing the token back), where an
  engine thread and the client compete for one process.
- Engine counts (in-process and child targets): the forward passes completed, preemptions and merges of
  the run, the engine's running totals (`EngineStats`) read before and after it (`EngineCounts`).

Percentiles use linear interpolation between closest ranks, numpy's default (`method="linear"`,
Hyndman & Fan type 7): sort the n values, take rank h = (n - 1) * q / 100 and interpolate between the
values at floor(h) and ceil(h). A percentile q is reported only from at least 100 / (100 - q) samples
(`min_samples`: 10 for p90, 100 for p99; the median from any), else it is missing (None) and the count
says why.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from benchmarks.checks import positive
from benchmarks.workload import Priority
from qllm_core.timeline import Timeline

if TYPE_CHECKING:
    from qllm_core.stats import EngineStats


class MetricsError(ValueError):
    """Metrics were asked of data they are not defined on (an empty list, a quantile out of range)."""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) by linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise MetricsError("percentile of no values is undefined; pass at least one value")
    if not (isinstance(q, int | float) and 0 <= q <= 100):
        raise MetricsError(f"percentile q must be in [0, 100], got {q!r}")
    ordered = sorted(values)
    h = (len(ordered) - 1) * q / 100.0
    lo = math.floor(h)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (h - lo) * (ordered[hi] - ordered[lo])


def min_samples(q: float) -> int:
    """Fewest samples a q-th percentile is reported from: one sample must lie beyond it (100 for p99)."""
    return 1 if q <= 50 else math.ceil(100.0 / (100.0 - q) - 1e-9)


def reported_percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile, or None from fewer than `min_samples(q)` values."""
    return percentile(values, q) if values and len(values) >= min_samples(q) else None


@dataclass(frozen=True)
class Distribution:
    """Mean and percentiles of a sample; a percentile is None when the sample is too small for it."""

    count: int
    mean: float
    p50: float
    p90: float | None
    p99: float | None
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution | None:
        """The distribution of `values`; None when there are none."""
        if not values:
            return None
        return cls(
            count=len(values),
            mean=math.fsum(values) / len(values),
            p50=percentile(values, 50),
            p90=reported_percentile(values, 90),
            p99=reported_percentile(values, 99),
            max=max(values),
        )


@dataclass(frozen=True)
class RequestRecord:
    """What the client saw of one request. Times are seconds since the run started."""

    index: int
    priority: Priority
    scheduled_s: float
    """When the workload said it should be sent."""
    sent_s: float
    """When it was sent (later than scheduled when the client falls behind)."""
    first_token_s: float | None
    finished_s: float | None
    """When its last token arrived; None when it failed or did not finish in time."""
    output_tokens: int
    prompt_tokens: int | None
    error: str | None = None
    timeline: Timeline | None = None
    """Where its time to first token went, as the engine recorded it (in-process runners only)."""
    isolated_ttft_s: float | None = None
    """TTFT of its prompt length on the idle target (see `benchmarks.calibration`); None when not measured."""
    token_times_s: tuple[float, ...] = ()
    """When each output token arrived (a chunk carrying several stamps them alike); empty in records written
    before these were kept."""

    @property
    def completed(self) -> bool:
        """True when it finished without error."""
        return self.finished_s is not None and self.error is None

    @property
    def ttft_s(self) -> float | None:
        """Time to first token, None without one."""
        return None if self.first_token_s is None else self.first_token_s - self.sent_s

    @property
    def slowdown(self) -> float | None:
        """TTFT over the isolated TTFT of its prompt length; None without either."""
        ttft, isolated = self.ttft_s, self.isolated_ttft_s
        return None if ttft is None or not isolated else ttft / isolated

    @property
    def client_lag_s(self) -> float | None:
        """TTFT the client saw minus the TTFT the engine recorded; None without a timeline."""
        ttft = self.ttft_s
        return None if ttft is None or self.timeline is None else ttft - self.timeline.ttft_s

    @property
    def turnaround_s(self) -> float | None:
        """Send to last token, for completed requests."""
        return self.finished_s - self.sent_s if self.completed and self.finished_s is not None else None

    @property
    def tpot_s(self) -> float | None:
        """Mean time between output tokens, for completed requests with at least two."""
        if not self.completed or self.output_tokens < 2 or self.first_token_s is None or self.finished_s is None:
            return None
        return (self.finished_s - self.first_token_s) / (self.output_tokens - 1)

    @property
    def inter_token_gaps_s(self) -> tuple[float, ...]:
        """The gaps between consecutive output tokens, for completed requests (none without two tokens)."""
        if not self.completed:
            return ()
        times = self.token_times_s
        return tuple(b - a for a, b in itertools.pairwise(times))

    def meets(self, ttft_slo_s: float, tpot_slo_s: float) -> bool:
        """Completed with TTFT <= `ttft_slo_s` and TPOT <= `tpot_slo_s` (a one-token request: TTFT alone)."""
        ttft, tpot = self.ttft_s, self.tpot_s
        return self.completed and ttft is not None and ttft <= ttft_slo_s and (tpot is None or tpot <= tpot_slo_s)


@dataclass(frozen=True)
class EngineCounts:
    """The engine's running totals of work (`EngineStats`), or over one run the difference of two readings."""

    passes: int
    """Forward passes completed."""
    preemptions: int
    """Passes suspended for more urgent work (each is resumed later, merged into, or dropped)."""
    merges: int
    """Running passes joined into a suspended one."""
    resumes: int = 0
    """Suspended passes run again (0 in readings taken before the engine counted them)."""

    @classmethod
    def of(cls, stats: EngineStats) -> EngineCounts:
        """The totals in an engine's stats snapshot."""
        return cls(stats.passes_completed, stats.preemptions, stats.merges, stats.resumes)

    def since(self, before: EngineCounts) -> EngineCounts:
        """What happened between `before` and this reading."""
        return EngineCounts(
            self.passes - before.passes,
            self.preemptions - before.preemptions,
            self.merges - before.merges,
            self.resumes - before.resumes,
        )


@dataclass(frozen=True)
class Breakdown:
    """Where a class's time to first token went, one distribution per part of `Timeline` (seconds; the last
    three are counts). TTFT = own + foreign + other passes; `queued_s` overlaps them (arrival to first pass)."""

    ttft_s: Distribution
    queued_s: Distribution
    own_pass_s: Distribution
    foreign_pass_s: Distribution
    other_s: Distribution
    prefill_passes: Distribution
    shared_tokens: Distribution
    shared_requests: Distribution

    @classmethod
    def of(cls, timelines: Sequence[Timeline]) -> Breakdown | None:
        """The breakdown of these timelines; None when there are none."""
        if not timelines:
            return None

        def dist(values: list[float]) -> Distribution:
            d = Distribution.of(values)
            assert d is not None
            return d

        return cls(
            ttft_s=dist([t.ttft_s for t in timelines]),
            queued_s=dist([t.queued_s for t in timelines]),
            own_pass_s=dist([t.own_pass_s for t in timelines]),
            foreign_pass_s=dist([t.foreign_pass_s for t in timelines]),
            other_s=dist([t.other_s for t in timelines]),
            prefill_passes=dist([float(t.prefill_passes) for t in timelines]),
            shared_tokens=dist([float(t.shared_tokens) for t in timelines]),
            shared_requests=dist([float(t.shared_requests) for t in timelines]),
        )


@dataclass(frozen=True)
class ClassMetrics:
    """One class's results."""

    requests: int
    completed: int
    failed: int
    """Failed or not finished in time."""
    slo_attainment: float | None
    """Fraction of this class's requests with TTFT <= slo; None when the class has no requests."""
    ttft: Distribution | None
    slowdown: Distribution | None
    """TTFT over the isolated TTFT of the same prompt length; None without a calibration."""
    turnaround: Distribution | None
    tpot: Distribution | None
    output_tokens: int
    breakdown: Breakdown | None
    """Where its TTFT went, over the requests with an engine timeline (in-process runners)."""
    inter_token: Distribution | None = None
    """Every gap between consecutive output tokens of its completed requests, pooled (None in results written
    before token times were kept)."""
    goodput_rps: float | None = None
    """Its requests per second meeting the TTFT and TPOT SLOs together; None without a TPOT SLO."""


@dataclass(frozen=True)
class RunMetrics:
    """The results of one run: per class, and throughput overall."""

    slo_s: float
    requests: int
    completed: int
    failed: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    max_send_lag_s: float
    """Largest delay between a request's scheduled and actual send: how faithfully the load was offered."""
    send_lag: Distribution
    client_lag: Distribution | None
    """Client TTFT minus engine TTFT over the requests with a timeline (see the module docstring)."""
    ls: ClassMetrics
    be: ClassMetrics
    errors: tuple[str, ...]
    """Distinct error messages (at most 5)."""
    tpot_slo_s: float | None = None
    """The TPOT SLO of goodput (with slo_s on TTFT); None when goodput was not asked for."""
    goodput_rps: float | None = None
    """Requests per second of every class meeting the TTFT and TPOT SLOs together; None without a TPOT SLO."""
    engine: EngineCounts | None = None
    """Passes, preemptions and merges of the run; None when the target does not show them (HTTP)."""

    def of(self, priority: Priority) -> ClassMetrics:
        """The metrics of one class."""
        return self.ls if priority == "ls" else self.be


@dataclass(frozen=True)
class Slo:
    """The service levels a run is judged against."""

    ttft_s: float
    tpot_s: float | None = None
    """None: no goodput (it needs both)."""

    def __post_init__(self) -> None:
        positive("slo_s", self.ttft_s, MetricsError, unit="seconds")
        if self.tpot_s is not None:
            positive("tpot_slo_s", self.tpot_s, MetricsError, unit="seconds")

    def goodput(self, records: Sequence[RequestRecord], duration_s: float) -> float | None:
        """Requests per second meeting both SLOs; None without a TPOT SLO, 0 over an empty duration."""
        if self.tpot_s is None:
            return None
        met = sum(r.meets(self.ttft_s, self.tpot_s) for r in records)
        return met / duration_s if duration_s > 0 else 0.0


def class_metrics(records: Sequence[RequestRecord], slo: Slo, duration_s: float) -> ClassMetrics:
    """Metrics of one class's records (see the module docstring for the definitions)."""
    ttfts = [t for r in records if (t := r.ttft_s) is not None]
    done = [r for r in records if r.completed]
    return ClassMetrics(
        requests=len(records),
        completed=len(done),
        failed=len(records) - len(done),
        slo_attainment=sum(1 for t in ttfts if t <= slo.ttft_s) / len(records) if records else None,
        ttft=Distribution.of(ttfts),
        slowdown=Distribution.of([s for r in records if (s := r.slowdown) is not None]),
        turnaround=Distribution.of([t for r in done if (t := r.turnaround_s) is not None]),
        tpot=Distribution.of([t for r in done if (t := r.tpot_s) is not None]),
        inter_token=Distribution.of([gap for r in done for gap in r.inter_token_gaps_s]),
        goodput_rps=slo.goodput(records, duration_s),
        output_tokens=sum(r.output_tokens for r in done),
        breakdown=Breakdown.of([r.timeline for r in records if r.timeline is not None]),
    )


def summarize(
    records: Sequence[RequestRecord],
    slo_s: float,
    tpot_slo_s: float | None = None,
    engine: EngineCounts | None = None,
) -> RunMetrics:
    """Per-class and overall metrics of one run; `engine`: the run's engine counts, when read."""
    slo = Slo(slo_s, tpot_slo_s)
    if not records:
        raise MetricsError("a run without requests has no metrics")
    done = [r for r in records if r.completed]
    start = min(r.sent_s for r in records)
    end = max((r.finished_s for r in done if r.finished_s is not None), default=start)
    duration = end - start
    tokens = sum(r.output_tokens for r in done)
    errors = sorted({r.error for r in records if r.error is not None})
    send_lag = Distribution.of([max(0.0, r.sent_s - r.scheduled_s) for r in records])
    assert send_lag is not None
    return RunMetrics(
        slo_s=float(slo_s),
        tpot_slo_s=tpot_slo_s,
        requests=len(records),
        completed=len(done),
        failed=len(records) - len(done),
        duration_s=duration,
        requests_per_s=len(done) / duration if duration > 0 else 0.0,
        output_tokens_per_s=tokens / duration if duration > 0 else 0.0,
        goodput_rps=slo.goodput(records, duration),
        engine=engine,
        max_send_lag_s=send_lag.max,
        send_lag=send_lag,
        client_lag=Distribution.of([lag for r in records if (lag := r.client_lag_s) is not None]),
        ls=class_metrics([r for r in records if r.priority == "ls"], slo, duration),
        be=class_metrics([r for r in records if r.priority == "be"], slo, duration),
        errors=tuple(errors[:5]),
    )
