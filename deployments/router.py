"""PriorityRouter: the control plane. Admits requests per class, tracks SLOs, decides where they land.

It never carries tokens. Replicas report their load every `stats_period_s`; the ingress asks `admit`
before sending a BE request, and gets back replica ids ranked best first (the request router inside
Ray Serve's handle honours that ranking). BE waits here, strictly first in first out, while every
replica's LS SLO is at risk or all capacity is taken, but never longer than `be_hold_max_s`. LS is
never held: `admit` answers it at once, but the ingress does not ask, its request router places LS by
the same rules without this round trip. Its state is rebuilt from the next round of replica reports
if it restarts.

Every method is a coroutine: Ray Serve runs plain methods in a thread pool, and the replica table and
the held requests' futures belong to the event loop that `admit` runs on, so all of it stays there.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass

from ray import serve

from deployments import faults
from deployments.load import BE, LS, PlacementLog, RoutingRules, Unreported, can_take_be, outlooks, queued, rank
from deployments.metrics import RayBackend, RouterMetrics
from deployments.protocol import AdmitAnswer, Outlook, Placed, Rejected, ReplicaLoad, RouterStats
from deployments.settings import AppSettings
from qllm_core.metrics import MetricsBackend
from qllm_core.request import PriorityClass

# A replica that has not reported for this many periods is treated as gone.
_STALE_PERIODS = 4


@dataclass
class _Replica:
    load: ReplicaLoad
    received_at: float
    """When its report arrived (this process's monotonic clock)."""


@dataclass
class _Held:
    since: float
    answer: asyncio.Future[Placed]
    sequences: int = 1


class PriorityRouter:
    """A Ray Serve deployment class (one replica; decorated in app.py)."""

    def __init__(self, settings: AppSettings, metrics_backend: MetricsBackend | None = None) -> None:
        self._rules = RoutingRules.of(settings)
        self._stale_after_s = _STALE_PERIODS * settings.stats_period_s
        self._replicas: dict[str, _Replica] = {}
        self._log = PlacementLog()
        self._held: deque[_Held] = deque()
        self._placed = {LS: 0, BE: 0}
        self._be_holds = 0
        self._rejected = 0
        if metrics_backend is None:
            # Plain Ray metrics: Serve's would claim the `replica` label, which here names the target replica.
            app = serve.get_replica_context().app_name
            metrics_backend = RayBackend(serve_tags=False, fixed_tags={"application": app})
        self._metrics = RouterMetrics(metrics_backend)

    # ---- replica reports --------------------------------------------------------------------------------
    async def report(self, load: ReplicaLoad) -> None:
        """A replica's periodic load report: placements it shows stop counting here, and held BE requests
        are released for as much capacity as it frees."""
        self._replicas[load.replica_id] = _Replica(load, time.monotonic())
        self._release_held()
        self._export_load(load)

    # ---- admission and placement ----------------------------------------------------------------------
    async def admit(self, priority: PriorityClass, sequences: int = 1) -> AdmitAnswer:
        """Rank replicas for a call of `sequences` engine requests, or reject it when its class's queue is
        full (queues count sequences, as replicas report them). LS is answered at once; BE is held while no
        replica can take it without hurting LS, and behind every BE held before it."""
        if self._queued(priority) >= self._rules.max_queued(priority):
            return self._reject(priority)
        if priority is LS or (not self._held and self._be_has_room()):
            return self._place(priority, 0.0, sequences)
        return await self._hold(sequences)

    async def _hold(self, sequences: int) -> Placed:
        held = _Held(time.monotonic(), asyncio.get_running_loop().create_future(), sequences)
        self._held.append(held)
        self._be_holds += 1
        self._metrics.be_holds.inc()
        self._export_queues()
        try:
            await asyncio.wait_for(asyncio.shield(held.answer), self._rules.be_hold_max_s)
        except TimeoutError:
            # Held as long as allowed: placed now whatever the load (BE never starves here). Every request
            # still held ahead of it is older, so it goes first.
            while not held.answer.done():
                self._release_next()
        finally:
            with contextlib.suppress(ValueError):  # the caller gave up while it was held
                self._held.remove(held)
            self._export_queues()
        return held.answer.result()

    def _release_held(self) -> None:
        """Place held BE requests, oldest first, while some replica can take BE: each placement counts
        before the next is considered."""
        while self._held and self._be_has_room():
            self._release_next()

    def _release_next(self) -> None:
        held = self._held.popleft()
        if not held.answer.done():
            held.answer.set_result(self._place(BE, time.monotonic() - held.since, held.sequences))

    def _place(self, priority: PriorityClass, held_s: float, sequences: int) -> Placed:
        ranking = rank(priority, self._outlooks())
        if ranking:
            self._log.add(ranking[0], priority, time.time(), sequences)
        self._placed[priority] += 1
        # With no reports yet, Serve's own routing picks the replica.
        self._metrics.placements.labels(ranking[0] if ranking else "unknown", priority.label).inc()
        self._export_queues()
        return Placed(ranking, held_s)

    def _reject(self, priority: PriorityClass) -> Rejected:
        self._rejected += 1
        self._metrics.rejected.labels(priority.label).inc()
        return Rejected(priority, self._rules.retry_after_s(priority))

    def _be_has_room(self) -> bool:
        view = self._outlooks()
        # Nothing known (startup, or the router just restarted): do not hold work back.
        return not view or any(can_take_be(o) for o in view)

    def _queued(self, priority: PriorityClass) -> int:
        """Requests of a class waiting: at the replicas as reported, placed since, and (BE) held here."""
        waiting = queued(priority, self._reports())
        return waiting + sum(h.sequences for h in self._held) if priority is BE else waiting

    def _reports(self) -> list[tuple[ReplicaLoad, Unreported]]:
        self._forget_silent()
        return [(r.load, self._log.unreported(r.load)) for r in self._replicas.values()]

    def _outlooks(self) -> list[Outlook]:
        return outlooks(self._reports(), self._rules, time.time())

    def _forget_silent(self) -> None:
        """Drop replicas that stopped reporting (dead, or replaced): they take no placements and no longer
        count in queue depths or stats. A replica that was only slow comes back with its next report."""
        fresh_after = time.monotonic() - self._stale_after_s
        for rid in [rid for rid, r in self._replicas.items() if r.received_at < fresh_after]:
            del self._replicas[rid]
            for cls in (LS, BE):
                self._metrics.replica_load.labels(rid, cls.label).set(0)
        self._log.keep_only(self._replicas)

    # ---- observability ----------------------------------------------------------------------------------
    def _export_load(self, load: ReplicaLoad) -> None:
        m = self._metrics
        for cls in (LS, BE):
            m.replica_load.labels(load.replica_id, cls.label).set(load.of(cls).waiting + load.of(cls).running)
        for o in self._outlooks():
            if o.replica_id != load.replica_id:
                continue
            for cls, ratio in ((LS, o.ls_attainment), (BE, o.be_attainment)):
                if ratio is not None:
                    m.slo_attainment.labels(load.replica_id, cls.label).set(ratio)
        m.replicas.set(len(self._replicas))
        self._export_queues()

    def _export_queues(self) -> None:
        for cls in (LS, BE):
            self._metrics.queue_depth.labels(cls.label).set(self._queued(cls))
        self._metrics.be_held.set(len(self._held))

    async def stats(self) -> RouterStats:
        """Each replica's outlook (its load, predicted LS TTFT, BE spare, attainment, risk) and the counters."""
        return RouterStats(
            replicas={o.replica_id: o for o in self._outlooks()},
            be_held=len(self._held),
            placed_ls=self._placed[LS],
            placed_be=self._placed[BE],
            be_holds=self._be_holds,
            rejected=self._rejected,
        )

    async def hang(self, seconds: float) -> None:
        """Fault injection: this router hangs (its event loop blocked) for `seconds`, answering nothing.
        Refused unless $QLLM_FAULT_INJECTION=1 in its environment (deployments/faults.py)."""
        faults.require_enabled()
        faults.hang_event_loop(seconds)

    async def check_health(self) -> None:
        """Serve's health check (a coroutine like every method here, so it never runs in Serve's threads)."""
