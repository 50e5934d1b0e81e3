"""QllmRequestRouter: Ray Serve's public request-router hook, honouring the PriorityRouter's ranking.

Ray Serve calls `choose_replicas` inside the ingress's handle for every request to the engine
replicas. The ingress passes the PriorityRouter's ranking as the `placement` keyword argument; this
router turns it into Serve's ranked candidate lists. Without a ranking (the PriorityRouter could not
be reached), it ranks by the load each replica reports through `record_routing_stats`, with the same
rules (`deployments.load`), so requests keep flowing.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from deployments.load import LS, ReplicaLoad, outlook, rank

PLACEMENT_KWARG = "placement"
# Used when a replica has not reported yet: an LS TTFT objective to scale predictions against.
_FALLBACK_SLO_S = 1.0


class QllmRequestRouter(RequestRouter):
    """Ranks replicas by the PriorityRouter's decision, else by their reported load."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Return candidates best first, one per rank, so Serve tries them in that order."""
        if pending_request is not None:
            # Once these ranks are tried, Serve should back off before asking again.
            pending_request.routing_context.should_backoff = True
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        placement = _placement(pending_request)
        ranking = placement.get("ranking") or self._fallback_ranking(candidate_replicas, placement)
        ordered = [by_id[rid] for rid in ranking if rid in by_id]
        ordered += [r for r in candidate_replicas if r not in ordered]  # new replicas not reported yet
        return [[r] for r in ordered]

    @staticmethod
    def _fallback_ranking(candidates: list[RunningReplica], placement: dict[str, Any]) -> list[str]:
        outlooks = []
        for replica in candidates:
            stats = replica.routing_stats
            if stats:
                outlooks.append(outlook(ReplicaLoad.from_dict(stats), 0, 0, _FALLBACK_SLO_S, 200))
        return rank(placement.get("priority", LS), outlooks)


def _placement(pending_request: PendingRequest | None) -> dict[str, Any]:
    if pending_request is None:
        return {}
    value = pending_request.kwargs.get(PLACEMENT_KWARG)
    return value if isinstance(value, dict) else {}
