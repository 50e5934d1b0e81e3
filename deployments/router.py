"""PriorityRouter: the control plane. Admits requests per class, tracks SLOs, decides where they land.

It never carries tokens. Replicas report their load every `stats_period_s`; the ingress asks `admit`
before sending a request, and gets back replica ids ranked best first (the request router inside
Ray Serve's handle honours that ranking). LS is answered at once; BE waits here, first in first out,
while every replica's LS SLO is at risk or all capacity is taken, but never longer than
`be_hold_max_s`. Its state is rebuilt from the next round of replica reports if it restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from deployments.load import BE, LS, Outlook, ReplicaLoad, at_risk, attainment, outlook, rank
from deployments.metrics import RayBackend, RouterMetrics
from deployments.settings import AppSettings
from qllm_core.metrics import MetricsBackend

# A replica that has not reported for this many periods is treated as gone.
_STALE_PERIODS = 4


@dataclass
class _Replica:
    load: ReplicaLoad
    placed: dict[str, int] = field(default_factory=lambda: {LS: 0, BE: 0})


class PriorityRouter:
    """A Ray Serve deployment class (one replica; decorated in app.py)."""

    def __init__(self, settings: AppSettings, metrics_backend: MetricsBackend | None = None) -> None:
        self._s = settings
        self._replicas: dict[str, _Replica] = {}
        self._held: deque[asyncio.Future[None]] = deque()
        self._counters: dict[str, int] = {"placed_ls": 0, "placed_be": 0, "held_be": 0, "rejected": 0}
        if metrics_backend is None:
            # Plain Ray metrics: Serve's would claim the `replica` label, which here names the target replica.
            app = serve.get_replica_context().app_name
            metrics_backend = RayBackend(serve_tags=False, fixed_tags={"application": app})
        self._metrics = RouterMetrics(metrics_backend)

    # ---- replica reports --------------------------------------------------------------------------------
    def report(self, load: dict[str, Any]) -> None:
        """A replica's periodic load report; placements made since its last report are now in its numbers."""
        parsed = ReplicaLoad.from_dict(load)
        self._replicas[parsed.replica_id] = _Replica(parsed)
        self._release_held()
        self._export_load(parsed)

    # ---- admission and placement ----------------------------------------------------------------------
    async def admit(self, priority: str) -> dict[str, Any]:
        """Rank replicas for a request; holds BE while no replica can take it without hurting LS.

        Returns {"ranking": [...], "held_s": float} or {"overloaded": True, "retry_after_s": float}.
        """
        if priority == LS:
            if self._queued(LS) >= self._s.max_queued_ls:
                return self._reject(LS, 1.0)
            return self._place(LS, 0.0)
        if self._queued(BE) >= self._s.max_queued_be:
            return self._reject(BE, self._s.be_hold_max_s)
        if not self._can_take_be():
            start = time.monotonic()
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._held.append(waiter)
            self._counters["held_be"] += 1
            self._metrics.be_holds.inc()
            self._export_queues()
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(waiter), self._s.be_hold_max_s)
            finally:
                if waiter in self._held:
                    self._held.remove(waiter)
            return self._place(BE, time.monotonic() - start)
        return self._place(BE, 0.0)

    def _place(self, priority: str, held_s: float) -> dict[str, Any]:
        outlooks = self._outlooks()
        ranking = rank(priority, outlooks)
        if ranking:
            self._replicas[ranking[0]].placed[priority] += 1
        self._counters["placed_ls" if priority == LS else "placed_be"] += 1
        # With no reports yet, Serve's own routing picks the replica.
        self._metrics.placements.labels(ranking[0] if ranking else "unknown", priority).inc()
        self._export_queues()
        return {"ranking": ranking, "held_s": held_s}

    def _queued(self, priority: str) -> int:
        """Requests of a class waiting: at the replicas as reported, placed since, and (BE) held here."""
        self._forget_silent()
        known = self._replicas.values()
        if priority == LS:
            return sum(r.load.ls_waiting + r.placed[LS] for r in known)
        return sum(r.load.be_waiting + r.placed[BE] for r in known) + len(self._held)

    def _reject(self, priority: str, retry_after_s: float) -> dict[str, Any]:
        self._counters["rejected"] += 1
        self._metrics.rejected.labels(priority).inc()
        return {"overloaded": True, "retry_after_s": retry_after_s}

    def _outlooks(self) -> list[Outlook]:
        self._forget_silent()
        return [
            outlook(r.load, r.placed[LS], r.placed[BE], self._s.ls_ttft_slo_s, self._s.slo_window)
            for r in self._replicas.values()
        ]

    def _forget_silent(self) -> None:
        """Drop replicas that stopped reporting (dead, or replaced): they take no placements and no longer
        count in queue depths or stats. A replica that was only slow comes back with its next report."""
        fresh_after = time.time() - _STALE_PERIODS * self._s.stats_period_s
        for rid in [rid for rid, r in self._replicas.items() if r.load.reported_at < fresh_after]:
            del self._replicas[rid]
            for cls in (LS, BE):
                self._metrics.replica_load.labels(rid, cls).set(0)

    def _can_take_be(self) -> bool:
        outlooks = self._outlooks()
        if not outlooks:
            return True  # nothing known (startup, or the router just restarted): do not hold work back
        return any(o.be_spare > 0 and not at_risk(o, self._s.ls_ttft_slo_s, self._s.slo_target) for o in outlooks)

    def _release_held(self) -> None:
        while self._held and self._can_take_be():
            waiter = self._held.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return  # one at a time: its placement counts before the next is considered

    # ---- observability ----------------------------------------------------------------------------------
    def _attainment(self, load: ReplicaLoad) -> dict[str, float | None]:
        """Per class, the share of a replica's recent TTFTs within the class SLO (None before any)."""
        return {
            LS: attainment(load.recent_ls_ttft_s, self._s.ls_ttft_slo_s, self._s.slo_window),
            BE: attainment(load.recent_be_ttft_s, self._s.be_ttft_slo_s, self._s.slo_window),
        }

    def _export_load(self, load: ReplicaLoad) -> None:
        m = self._metrics
        m.replica_load.labels(load.replica_id, LS).set(load.ls_waiting + load.ls_running)
        m.replica_load.labels(load.replica_id, BE).set(load.be_waiting + load.be_running)
        for cls, ratio in self._attainment(load).items():
            if ratio is not None:
                m.slo_attainment.labels(load.replica_id, cls).set(ratio)
        self._forget_silent()
        m.replicas.set(len(self._replicas))
        self._export_queues()

    def _export_queues(self) -> None:
        self._metrics.queue_depth.labels(LS).set(self._queued(LS))
        self._metrics.queue_depth.labels(BE).set(self._queued(BE))
        self._metrics.be_held.set(len(self._held))

    def stats(self) -> dict[str, Any]:
        """Queue depth, SLO attainment per replica and class, placement counters."""
        replicas = {}
        self._forget_silent()
        for rid, r in self._replicas.items():
            o = outlook(r.load, r.placed[LS], r.placed[BE], self._s.ls_ttft_slo_s, self._s.slo_window)
            replicas[rid] = {
                "load": r.load.to_dict(),
                "predicted_ls_ttft_s": o.predicted_ls_ttft_s,
                "be_spare": o.be_spare,
                "at_risk": at_risk(o, self._s.ls_ttft_slo_s, self._s.slo_target),
                "attainment": self._attainment(r.load),
            }
        return {"held_be": len(self._held), "replicas": replicas, **self._counters}

    def check_health(self) -> None:
        """Serve's health check."""
