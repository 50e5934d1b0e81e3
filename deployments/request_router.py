"""Ray Serve request routers for the engine replicas: the hook inside the ingress's handle that picks the
replica each request goes to.

`QllmRequestRouter` (routing: priority) places LS requests itself, with no round trip to the
PriorityRouter: it ranks and admits them by the rules of `deployments.load`, with the configured values
(Serve passes them to `initialize_state` from `request_router_kwargs`), on the load each replica reports
through `record_routing_stats` plus the placements it made since. BE requests carry the PriorityRouter's
ranking, which it honours; when the PriorityRouter cannot be reached, BE is ranked and admitted here the
same way as LS, so requests keep flowing and the queue bounds still hold.

`PowerOfTwoRouter` (routing: power_of_two) is Ray Serve's default router, the baseline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

# Ray Serve's default router, by the path its own RequestRouterConfig names it (ray[serve] is pinned).
from ray import serve
from ray.serve._private.common import ReplicaID
from ray.serve._private.replica_result import ReplicaResult
from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.exceptions import RayServeException
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from deployments.load import LS, PlacementLog, RoutingRules, outlooks, queued, rank
from deployments.metrics import PLACEMENTS, REJECTED, RayBackend
from deployments.protocol import PLACEMENT_KWARG, Overloaded, PlacementHint, Rejected, ReplicaLoad
from qllm_core.metrics import MetricFamily


class QllmRequestRouter(RequestRouter):
    """Ranks replicas by the PriorityRouter's decision when the request carries one, else by reported load
    under the same rules (and then admits it too)."""

    _rules: RoutingRules
    _log: PlacementLog
    _counters: _Counters | None

    def initialize_state(self, **rules: Any) -> None:
        """Serve calls this with `request_router_kwargs`: the application's `RoutingRules`, as plain values."""
        self._rules = RoutingRules(**rules)
        self._log = PlacementLog()
        self._counters = _router_counters()

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        """Serve calls this once a replica accepted the request: placements made here (every LS request, and BE
        while the PriorityRouter is down) count in the router's placement counter, as the PriorityRouter's do."""
        hint = placement_of(pending_request)
        if hint is not None and not hint.admitted and self._counters is not None:
            self._counters.placements.labels(replica_id.unique_id, hint.priority.label).inc()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Return candidates best first, one per rank, so Serve tries them in that order."""
        hint = placement_of(pending_request)
        ranking = hint.ranking if hint is not None else ()
        if not ranking:
            ranking = self._rank_here(candidate_replicas, hint, pending_request)
        if hint is not None and ranking and pending_request is not None and not pending_request.future.done():
            # Serve goes to the first rank unless that replica is at max_ongoing_requests (then this is asked
            # again, and the request may count twice until the next report: the safe side).
            self._log.add(ranking[0], hint.priority, time.time(), hint.sequences)
        if pending_request is not None:
            # Once these ranks are tried, Serve should back off before asking again.
            pending_request.routing_context.should_backoff = True
        return [[r] for r in ranked(candidate_replicas, ranking)]

    def _rank_here(
        self, candidates: list[RunningReplica], hint: PlacementHint | None, pending_request: PendingRequest | None
    ) -> tuple[str, ...]:
        """Rank by reported load and this router's placements since; a request the PriorityRouter did not
        admit is admitted here, on the same counts (other handles' placements since the reports are not
        seen: the bound may lag one report period)."""
        loads = [load for r in candidates if (load := ReplicaLoad.from_routing_stats(r.routing_stats))]
        self._log.keep_only({load.replica_id for load in loads})
        reports = [(load, self._log.unreported(load)) for load in loads]
        priority = LS if hint is None else hint.priority  # no hint: not a generate call (ping), any will do
        if hint is not None and not hint.admitted and queued(priority, reports) >= self._rules.max_queued(priority):
            if self._counters is not None:
                self._counters.rejected.labels(priority.label).inc()
            _reject(pending_request, Rejected(priority, self._rules.retry_after_s(priority)))
        return rank(priority, outlooks(reports, self._rules, time.time()))


class PowerOfTwoRouter(PowerOfTwoChoicesRequestRouter):
    """Ray Serve's default power-of-two-choices router, unchanged for every request the ingress sends (it
    gives no ranking in this mode). A request whose placement names replicas goes to them: benchmarks pin
    background load on one replica so, the same way under either routing mode."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """The named replicas when the placement names some that run, else Serve's power of two choices."""
        hint = placement_of(pending_request)
        if hint is not None and hint.ranking:
            pinned = ranked(candidate_replicas, hint.ranking, others=False)
            if pinned:
                return [[r] for r in pinned]
        return await super().choose_replicas(candidate_replicas, pending_request)


@dataclass(frozen=True)
class _Counters:
    """The router's counters this request router adds to: the PriorityRouter's placement and 429 counts."""

    placements: MetricFamily
    rejected: MetricFamily


def _router_counters() -> _Counters | None:
    """The placement and rejection counters, labelled with the application of the Serve replica whose handle
    this router is in (the ingress); None in a handle outside Serve (a driver script), which has no
    application to label them with and no metrics port scraped for it."""
    try:
        app = serve.get_replica_context().app_name
    except RayServeException:
        return None
    backend = RayBackend(serve_tags=False, fixed_tags={"application": app})
    return _Counters(backend.make(PLACEMENTS), backend.make(REJECTED))


def placement_of(pending_request: PendingRequest | None) -> PlacementHint | None:
    """The request's placement hint; None for a call that carries none."""
    if pending_request is None:
        return None
    hint = pending_request.kwargs.get(PLACEMENT_KWARG)
    return hint if isinstance(hint, PlacementHint) else None


def ranked(candidates: list[RunningReplica], ranking: tuple[str, ...], others: bool = True) -> list[RunningReplica]:
    """The candidates in the ranking's order, then (with `others`) those it does not name (new replicas that
    have not reported yet)."""
    by_id = {r.replica_id.unique_id: r for r in candidates}
    ordered = [by_id[rid] for rid in ranking if rid in by_id]
    return ordered + [r for r in candidates if r not in ordered] if others else ordered


def _reject(pending_request: PendingRequest | None, answer: Rejected) -> None:
    """Fail the request's routing: the handle's response raises `Overloaded` to the ingress (a 429). Serve
    stops routing a request whose future is done once it next looks at the candidates returned."""
    if pending_request is not None and not pending_request.future.done():
        pending_request.future.set_exception(Overloaded(answer))
