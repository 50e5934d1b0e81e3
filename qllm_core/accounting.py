"""Time accounting, in one place: the engine's busy clock, every request timestamp, the TTFT window the
replicas report, and the latency metrics (queue wait, TTFT, time per output token, end to end).

The busy clock is one running total of the time spent inside forward passes; each pass keeps its own run
time, and each request the busy clock at its arrival and the run time of the passes that carried it. A
request's time in other requests' passes is then a subtraction (`TimelineMarks.timeline`), with no
per-step work for requests that wait.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from qllm_core.metrics import EngineMetrics
from qllm_core.request import FinishReason, PriorityClass, Request
from qllm_core.stats import TtftSample
from qllm_core.timeline import Timeline


class TimeAccounts:
    """The busy clock and each request's times; every latency metric is recorded here."""

    def __init__(self, metrics: EngineMetrics, ttft_window: int) -> None:
        self._metrics = metrics
        self.busy_s = 0.0
        """Time spent advancing passes so far."""
        self._last_run = (0.0, 0.0)
        """When the latest advance started and ended: a request that arrived during it waited for part of it."""
        self.recent_ttft: dict[PriorityClass, deque[TtftSample]] = {c: deque(maxlen=ttft_window) for c in PriorityClass}
        self._be_since: float | None = None
        """Since when queued BE work has seen no BE work advance (None: no BE queued)."""

    # ---- the busy clock --------------------------------------------------------------------------------
    def arrived(self, request: Request) -> None:
        """A request was admitted. Commands are taken between steps: the part of the latest advance after
        its arrival is time it waited, so it counts as busy time after its arrival."""
        started, ended = self._last_run
        request.marks.busy_at_arrival = self.busy_s - max(0.0, ended - max(request.arrival, started))

    def ran(self, started: float, ended: float) -> float:
        """The engine advanced a pass from `started` to `ended`; returns the time it took."""
        self._last_run = (started, ended)
        elapsed = ended - started
        self.busy_s += elapsed
        return elapsed

    def be_advanced(self, at: float) -> None:
        """A unit of a pass holding BE requests ran until `at`: BE work progressed."""
        self._be_since = at

    def be_queue_seen(self, now: float, be_queued: bool) -> None:
        """The engine looked at the BE queue at `now`: the stall clock starts when queued BE work is first
        seen and stops when none is queued."""
        if not be_queued:
            self._be_since = None
        elif self._be_since is None:
            self._be_since = now

    def be_stalled_s(self, now: float) -> float:
        """How long queued BE work has gone without any BE work advancing (0 with no BE queued): what BE ages
        on, its own progress rather than time queued."""
        return 0.0 if self._be_since is None else now - self._be_since

    # ---- passes ----------------------------------------------------------------------------------------
    def pass_started(self, requests: list[Request], fed: list[int], prompts: list[bool], now: float) -> None:
        """A pass starts over `requests`, each feeding `fed` tokens, `prompts` marking those whose prompt (or
        part of it) is among them."""
        total = sum(fed)
        for request, n, prompt in zip(requests, fed, prompts, strict=True):
            if request.times.first_scheduled is None:
                request.times.first_scheduled = now
                self._metrics.queue_wait.labels(request.priority.label).observe(now - request.arrival)
            if prompt:
                marks = request.marks
                marks.prefill_passes += 1
                marks.shared_tokens += total - n
                marks.shared_requests += len(requests) - 1

    @staticmethod
    def credit(requests: Iterable[Request], run_s: float) -> None:
        """Requests leave a pass that ran `run_s`: that time counts as their own (their timelines)."""
        for request in requests:
            request.marks.own_pass_s += run_s

    # ---- tokens and the end ----------------------------------------------------------------------------
    def token(self, request: Request, now: float) -> Timeline | None:
        """A request got a token at `now`; on its first, the TTFT is recorded and its breakdown returned."""
        times = request.times
        times.tokens.append(now)
        if times.first_token is not None:
            return None
        times.first_token = now
        ttft = now - request.arrival
        cls = request.priority
        self._metrics.ttft.labels(cls.label).observe(ttft)
        self.recent_ttft[cls].append(TtftSample(now, ttft))
        scheduled = times.first_scheduled
        queued = (scheduled if scheduled is not None else now) - request.arrival
        return request.marks.timeline(ttft, queued, self.busy_s)

    def finished(self, request: Request, reason: FinishReason, now: float) -> None:
        """A request ended at `now`: its end-to-end time and time per output token."""
        request.times.finished = now
        cls = request.priority.label
        self._metrics.requests.labels(cls, reason.value).inc()
        self._metrics.e2e.labels(cls).observe(now - request.arrival)
        tokens = request.times.tokens
        if len(tokens) > 1:
            self._metrics.tpot.labels(cls).observe((tokens[-1] - tokens[0]) / (len(tokens) - 1))
