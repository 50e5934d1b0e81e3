"""The request routers inside the ingress's handle (no Ray cluster): the PriorityRouter's ranking is
honoured, and without one the fallback applies the configured rules, queue bounds included."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID
from ray.serve.request_router import PendingRequest, RequestRouter

from deployments.load import BE, LS, RoutingRules
from deployments.protocol import PLACEMENT_KWARG, ClassLoad, Overloaded, PlacementHint, Rejected, ReplicaLoad
from deployments.request_router import PowerOfTwoRouter, QllmRequestRouter
from deployments.settings import AppSettings
from tests.deployments.test_router_metrics import report


@dataclass(frozen=True)
class _Id:
    unique_id: str


@dataclass(frozen=True)
class _Replica:
    """What a request router reads of Serve's RunningReplica."""

    replica_id: _Id
    routing_stats: dict[str, object]


def replica(load: ReplicaLoad | None, rid: str = "") -> _Replica:
    stats: dict[str, object] = {} if load is None else dict(load.as_routing_stats())
    return _Replica(_Id(rid or (load.replica_id if load else "new")), stats)


def make(cls: type[RequestRouter], **settings: object) -> RequestRouter:
    r = cls(
        deployment_id=DeploymentID(name="EngineReplica", app_name="qllm"), handle_source=DeploymentHandleSource.UNKNOWN
    )
    # What Serve does with app.py's request_router_kwargs.
    r.initialize_state(**dataclasses.asdict(RoutingRules.of(AppSettings(**settings))))  # type: ignore[arg-type]
    return r


async def choose(
    r: RequestRouter, candidates: list[_Replica], hint: PlacementHint | None
) -> tuple[list[str], PendingRequest]:
    pending = PendingRequest(args=[], kwargs={} if hint is None else {PLACEMENT_KWARG: hint}, metadata=None)  # type: ignore[arg-type]
    ranks = await r.choose_replicas(candidates, pending)  # type: ignore[arg-type]
    return [rank[0].replica_id.unique_id for rank in ranks], pending


def test_the_priority_routers_ranking_is_honoured_and_unreported_replicas_come_last() -> None:
    r = make(QllmRequestRouter)
    candidates = [replica(report("a")), replica(None, "new"), replica(report("b"))]
    order, _ = asyncio.run(choose(r, candidates, PlacementHint(LS, ("b", "a"), admitted=True)))
    assert order == ["b", "a", "new"]


def test_the_fallback_ranks_with_the_configured_slo_not_a_built_in_one() -> None:
    # 0.5 s TTFTs are fine under a 1 s SLO but miss a 0.3 s one: under the configured SLO, BE avoids "a".
    candidates = [replica(report("a", ls_ttft=(0.5, 0.5))), replica(report("b", be_running=6))]
    strict, _ = asyncio.run(choose(make(QllmRequestRouter, ls_ttft_slo_s=0.3), candidates, PlacementHint(BE)))
    lax, _ = asyncio.run(choose(make(QllmRequestRouter, ls_ttft_slo_s=1.0), candidates, PlacementHint(BE)))
    assert (strict, lax) == (["b", "a"], ["a", "b"])


def test_the_fallback_ages_ttfts_with_the_configured_window() -> None:
    slow = replica(report("a", ls_ttft=(3.0, 3.0)))  # observed 1 s ago
    candidates = [slow, replica(report("b", be_running=6))]
    short, _ = asyncio.run(choose(make(QllmRequestRouter, slo_window_s=0.5), candidates, PlacementHint(BE)))
    long, _ = asyncio.run(choose(make(QllmRequestRouter, slo_window_s=60.0), candidates, PlacementHint(BE)))
    assert (short, long) == (["a", "b"], ["b", "a"])


def _waiting_be(rid: str, waiting: int) -> ReplicaLoad:
    return ReplicaLoad(rid, ClassLoad(0, 0, ()), ClassLoad(waiting, 0, ()), 0.1, 4, time.time())


def test_the_fallback_rejects_a_request_beyond_the_configured_queue_bound() -> None:
    r = make(QllmRequestRouter, max_queued_be=5, be_hold_max_s=4.0)
    candidates = [replica(_waiting_be("a", 3)), replica(_waiting_be("b", 2))]

    async def scenario() -> tuple[PendingRequest, PendingRequest, PendingRequest]:
        _, full = await choose(r, candidates, PlacementHint(BE))
        _, admitted = await choose(r, candidates, PlacementHint(BE, ("a",), admitted=True))
        _, ls = await choose(r, candidates, PlacementHint(LS))
        return full, admitted, ls

    full, admitted, ls = asyncio.run(scenario())
    with pytest.raises(Overloaded) as raised:
        full.future.result()
    assert raised.value.answer == Rejected(BE, 4.0)
    assert not admitted.future.done() and not ls.future.done()  # the LS queue is empty; "admitted" was checked


def test_ls_placed_here_counts_until_the_replicas_report_shows_it() -> None:
    r = make(QllmRequestRouter)
    candidates = [replica(report("a")), replica(report("b"))]

    async def scenario() -> list[str]:
        firsts = []
        for _ in range(4):
            order, _ = await choose(r, candidates, PlacementHint(LS))
            firsts.append(order[0])
        return firsts

    # Same reports each time: each LS placed here is one more ahead of the next on that replica.
    assert asyncio.run(scenario()) in (["a", "b", "a", "b"], ["b", "a", "b", "a"])


def test_ls_beyond_the_configured_queue_bound_is_refused_here() -> None:
    r = make(QllmRequestRouter, max_queued_ls=3)
    waiting = ReplicaLoad("a", ClassLoad(3, 0, ()), ClassLoad(0, 0, ()), 0.1, 4, time.time())
    _, pending = asyncio.run(choose(r, [replica(waiting)], PlacementHint(LS)))
    with pytest.raises(Overloaded) as raised:
        pending.future.result()
    assert raised.value.answer == Rejected(LS, 1.0)


def test_power_of_two_goes_where_a_placement_pins_it() -> None:
    r = make(PowerOfTwoRouter)
    candidates = [replica(report("a")), replica(report("b"))]
    order, _ = asyncio.run(choose(r, candidates, PlacementHint(BE, ("b",), admitted=True)))
    assert order == ["b"]
