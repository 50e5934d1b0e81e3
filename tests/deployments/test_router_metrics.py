"""The router's metrics on a prometheus-client registry (no Ray cluster): what it exports after reports,
placements, holds and rejections."""

from __future__ import annotations

import asyncio
import time

from deployments.load import BE, LS, ReplicaLoad
from deployments.metrics import ROUTER_METRICS
from deployments.router import PriorityRouter
from deployments.settings import AppSettings
from qllm_core.metrics import PrometheusBackend, exported_names


def _report(
    rid: str, ls_waiting: int = 0, be_running: int = 0, ls_ttft: tuple[float, ...] = (0.1,), age_s: float = 0.0
) -> dict:
    load = ReplicaLoad(rid, ls_waiting, 0, 0, be_running, 0.1, 4, ls_ttft, (), reported_at=time.time() - age_s)
    return load.to_dict()


def _value(backend: PrometheusBackend, name: str, **labels: str) -> float | None:
    value = backend.registry.get_sample_value(name, labels)
    return None if value is None else float(value)


def test_reports_placements_and_attainment_are_exported() -> None:
    backend = PrometheusBackend()
    router = PriorityRouter(AppSettings(ls_ttft_slo_s=1.0), backend)
    router.report(_report("a", ls_waiting=2, ls_ttft=(0.1, 0.2, 3.0, 0.4)))
    router.report(_report("b", be_running=3))

    assert _value(backend, "qllm_router_replicas") == 2
    assert _value(backend, "qllm_router_replica_load", replica="a", priority_class=LS) == 2
    assert _value(backend, "qllm_router_replica_load", replica="b", priority_class=BE) == 3
    assert _value(backend, "qllm_router_slo_attainment_ratio", replica="a", priority_class=LS) == 0.75
    assert _value(backend, "qllm_router_queue_depth", priority_class=LS) == 2

    placed = asyncio.run(router.admit(LS))
    target = placed["ranking"][0]
    assert target == "b"  # no LS prompts wait there
    assert _value(backend, "qllm_router_placements_total", replica="b", priority_class=LS) == 1
    assert _value(backend, "qllm_router_placements_total", replica="a", priority_class=LS) is None
    # Every sample is one the specs announce.
    names = {s.name for m in backend.registry.collect() for s in m.samples if not s.name.endswith("_created")}
    assert names <= exported_names(ROUTER_METRICS)


def test_held_and_rejected_be_are_counted() -> None:
    backend = PrometheusBackend()
    settings = AppSettings(max_queued_be=1, be_hold_max_s=0.3)
    router = PriorityRouter(settings, backend)
    router.report(_report("a", be_running=2 * 4))  # every batch slot taken: BE must wait

    async def scenario() -> tuple[dict, dict, float | None]:
        held = asyncio.create_task(router.admit(BE))
        await asyncio.sleep(0.05)
        holding = _value(backend, "qllm_router_be_held")
        rejected = await router.admit(BE)  # the hold queue (max_queued_be=1) is full
        return await held, rejected, holding

    held, rejected, holding = asyncio.run(scenario())
    assert holding == 1
    assert held["held_s"] >= 0.25  # released by the hold bound, then placed
    assert rejected == {"overloaded": True, "retry_after_s": 0.3}
    assert _value(backend, "qllm_router_be_holds_total") == 1
    assert _value(backend, "qllm_router_be_held") == 0
    assert _value(backend, "qllm_router_rejected_total", priority_class=BE) == 1
    # The placed request counts as queued until the replica's next report shows it.
    assert _value(backend, "qllm_router_queue_depth", priority_class=BE) == 1


def test_a_replica_that_stopped_reporting_is_forgotten() -> None:
    backend = PrometheusBackend()
    router = PriorityRouter(AppSettings(stats_period_s=0.5), backend)
    router.report(_report("dead", be_running=3, age_s=2.5))  # silent for 5 periods (the limit is 4)
    router.report(_report("alive"))
    assert set(router.stats()["replicas"]) == {"alive"}
    assert asyncio.run(router.admit(BE))["ranking"] == ["alive"]
    assert _value(backend, "qllm_router_replica_load", replica="dead", priority_class=BE) == 0
    assert _value(backend, "qllm_router_replicas") == 1
