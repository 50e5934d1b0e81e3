"""The router's metrics on a prometheus-client registry (no Ray cluster): what it exports after reports,
placements, holds and rejections."""

from __future__ import annotations

import asyncio
import time

from deployments.load import BE, LS
from deployments.metrics import ROUTER_METRICS
from deployments.protocol import ClassLoad, Placed, Rejected, ReplicaLoad, TtftObservation
from deployments.router import PriorityRouter
from deployments.settings import AppSettings
from qllm_core.metrics import PrometheusBackend, exported_names


def report(rid: str, ls_waiting: int = 0, be_running: int = 0, ls_ttft: tuple[float, ...] = (0.1,)) -> ReplicaLoad:
    """A replica's report taken now, its LS TTFTs observed a second ago."""
    now = time.time()
    samples = tuple(TtftObservation(now - 1.0, t) for t in ls_ttft)
    return ReplicaLoad(rid, ClassLoad(ls_waiting, 0, samples), ClassLoad(0, be_running, ()), 0.1, 4, now)


def _value(backend: PrometheusBackend, name: str, **labels: str) -> float | None:
    value = backend.registry.get_sample_value(name, labels)
    return None if value is None else float(value)


def test_reports_placements_and_attainment_are_exported() -> None:
    backend = PrometheusBackend()
    router = PriorityRouter(AppSettings(ls_ttft_slo_s=1.0), backend)

    async def scenario() -> Placed | Rejected:
        await router.report(report("a", ls_waiting=2, ls_ttft=(0.1, 0.2, 3.0, 0.4)))
        await router.report(report("b", be_running=3))
        return await router.admit(LS)

    placed = asyncio.run(scenario())
    assert _value(backend, "qllm_router_replicas") == 2
    assert _value(backend, "qllm_router_replica_load", replica="a", priority_class=LS.label) == 2
    assert _value(backend, "qllm_router_replica_load", replica="b", priority_class=BE.label) == 3
    assert _value(backend, "qllm_router_slo_attainment_ratio", replica="a", priority_class=LS.label) == 0.75
    assert isinstance(placed, Placed) and placed.ranking[0] == "b"  # no LS prompts wait there
    # Two waiting at a as reported, plus the one just placed on b.
    assert _value(backend, "qllm_router_queue_depth", priority_class=LS.label) == 3
    assert _value(backend, "qllm_router_placements_total", replica="b", priority_class=LS.label) == 1
    assert _value(backend, "qllm_router_placements_total", replica="a", priority_class=LS.label) is None
    # Every sample is one the specs announce.
    names = {s.name for m in backend.registry.collect() for s in m.samples if not s.name.endswith("_created")}
    assert names <= exported_names(ROUTER_METRICS)


def test_held_and_rejected_be_are_counted() -> None:
    backend = PrometheusBackend()
    router = PriorityRouter(AppSettings(max_queued_be=1, be_hold_max_s=0.3), backend)

    async def scenario() -> tuple[Placed | Rejected, Placed | Rejected, float | None]:
        await router.report(report("a", be_running=2 * 4))  # every batch slot taken: BE must wait
        held = asyncio.create_task(router.admit(BE))
        await asyncio.sleep(0.05)
        holding = _value(backend, "qllm_router_be_held")
        rejected = await router.admit(BE)  # the hold queue (max_queued_be=1) is full
        return await held, rejected, holding

    held, rejected, holding = asyncio.run(scenario())
    assert holding == 1
    assert isinstance(held, Placed) and held.held_s >= 0.25  # released by the hold bound, then placed
    assert rejected == Rejected(BE, 0.3)
    assert _value(backend, "qllm_router_be_holds_total") == 1
    assert _value(backend, "qllm_router_be_held") == 0
    assert _value(backend, "qllm_router_rejected_total", priority_class=BE.label) == 1
    # The placed request counts as queued until the replica's next report shows it.
    assert _value(backend, "qllm_router_queue_depth", priority_class=BE.label) == 1


def test_a_replica_that_stopped_reporting_is_forgotten() -> None:
    backend = PrometheusBackend()
    router = PriorityRouter(AppSettings(stats_period_s=0.05), backend)

    async def scenario() -> tuple[set[str], Placed | Rejected]:
        await router.report(report("dead", be_running=3))
        await asyncio.sleep(0.25)  # silent for 5 periods (the limit is 4)
        await router.report(report("alive"))
        return set((await router.stats()).replicas), await router.admit(BE)

    known, placed = asyncio.run(scenario())
    assert known == {"alive"}
    assert placed == Placed(("alive",), 0.0)
    assert _value(backend, "qllm_router_replica_load", replica="dead", priority_class=BE.label) == 0
    assert _value(backend, "qllm_router_replicas") == 1
