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

from deployments.load import BE, LS, Outlook, ReplicaLoad, at_risk, attainment, outlook, rank
from deployments.settings import AppSettings

# A replica that has not reported for this many periods is treated as gone.
_STALE_PERIODS = 4


@dataclass
class _Replica:
    load: ReplicaLoad
    placed: dict[str, int] = field(default_factory=lambda: {LS: 0, BE: 0})


class PriorityRouter:
    """A Ray Serve deployment class (one replica; decorated in app.py)."""

    def __init__(self, settings: AppSettings) -> None:
        self._s = settings
        self._replicas: dict[str, _Replica] = {}
        self._held: deque[asyncio.Future[None]] = deque()
        self._counters: dict[str, int] = {"placed_ls": 0, "placed_be": 0, "held_be": 0, "rejected": 0}

    # ---- replica reports --------------------------------------------------------------------------------
    def report(self, load: dict[str, Any]) -> None:
        """A replica's periodic load report; placements made since its last report are now in its numbers."""
        parsed = ReplicaLoad.from_dict(load)
        self._replicas[parsed.replica_id] = _Replica(parsed)
        self._release_held()

    def forget(self, replica_id: str) -> None:
        """Drop a replica known to be gone."""
        self._replicas.pop(replica_id, None)

    # ---- admission and placement ----------------------------------------------------------------------
    async def admit(self, priority: str) -> dict[str, Any]:
        """Rank replicas for a request; holds BE while no replica can take it without hurting LS.

        Returns {"ranking": [...], "held_s": float} or {"overloaded": True, "retry_after_s": float}.
        """
        if priority == LS:
            queued_ls = sum(r.load.ls_waiting + r.placed[LS] for r in self._replicas.values())
            if queued_ls >= self._s.max_queued_ls:
                self._counters["rejected"] += 1
                return {"overloaded": True, "retry_after_s": 1.0}
            return self._place(LS, 0.0)
        if not self._can_take_be():
            if len(self._held) >= self._s.max_queued_be:
                self._counters["rejected"] += 1
                return {"overloaded": True, "retry_after_s": self._s.be_hold_max_s}
            start = time.monotonic()
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._held.append(waiter)
            self._counters["held_be"] += 1
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
        return {"ranking": ranking, "held_s": held_s}

    def _outlooks(self) -> list[Outlook]:
        fresh_after = time.time() - _STALE_PERIODS * self._s.stats_period_s
        return [
            outlook(r.load, r.placed[LS], r.placed[BE], self._s.ls_ttft_slo_s, self._s.slo_window)
            for r in self._replicas.values()
            if r.load.reported_at >= fresh_after
        ]

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
    def stats(self) -> dict[str, Any]:
        """Queue depth, SLO attainment per replica and class, placement counters."""
        slo = {LS: self._s.ls_ttft_slo_s, BE: self._s.be_ttft_slo_s}
        replicas = {}
        for rid, r in self._replicas.items():
            o = outlook(r.load, r.placed[LS], r.placed[BE], self._s.ls_ttft_slo_s, self._s.slo_window)
            replicas[rid] = {
                "load": r.load.to_dict(),
                "predicted_ls_ttft_s": o.predicted_ls_ttft_s,
                "be_spare": o.be_spare,
                "at_risk": at_risk(o, self._s.ls_ttft_slo_s, self._s.slo_target),
                "attainment": {
                    LS: attainment(r.load.recent_ls_ttft_s, slo[LS], self._s.slo_window),
                    BE: attainment(r.load.recent_be_ttft_s, slo[BE], self._s.slo_window),
                },
            }
        return {"held_be": len(self._held), "replicas": replicas, **self._counters}

    def check_health(self) -> None:
        """Serve's health check."""
