"""The application builder named in serve_config.yaml: YAML `args` -> validated settings -> deployments."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, cast

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Deployment

from deployments.faults import FAULT_INJECTION_ENV
from deployments.ingress import Ingress
from deployments.load import RoutingRules
from deployments.replica import EngineReplica
from deployments.request_router import PowerOfTwoRouter, QllmRequestRouter
from deployments.router import PriorityRouter
from deployments.settings import AppSettings

# Engines batch internally, so a replica takes many concurrent streams.
_MAX_ONGOING_PER_REPLICA = 512


def _deployment(cls: type, **options: Any) -> Deployment:
    return cast(Deployment, serve.deployment(cls)).options(name=cls.__name__, **options)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Build the qllm application from serve_config.yaml's `args` (see docs/configuration.md)."""
    settings = AppSettings.from_dict(args)
    scaling: dict[str, Any] = (
        {"autoscaling_config": settings.autoscaling} if settings.autoscaling else {"num_replicas": settings.replicas}
    )
    # Fault-injection tests switch the hooks on (engine replicas, router) where they build the app.
    hooks = (
        {"runtime_env": {"env_vars": {FAULT_INJECTION_ENV: "1"}}} if os.environ.get(FAULT_INJECTION_ENV) == "1" else {}
    )
    actor_options: dict[str, Any] = {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus, **hooks}
    engine_options: dict[str, Any] = {
        "max_ongoing_requests": _MAX_ONGOING_PER_REPLICA,
        "ray_actor_options": actor_options,
        # Serve replaces a replica after three failed checks in a row: a dead or stalled engine is gone in
        # about 6 s (plus `engine_stall_timeout_s` for a stall); the check itself reads two fields.
        "health_check_period_s": 2,
        "health_check_timeout_s": 10,
        "graceful_shutdown_timeout_s": 5,
        **scaling,
    }
    router = None
    if settings.routing == "priority":
        engine_options["request_router_config"] = RequestRouterConfig(
            request_router_class=QllmRequestRouter,  # type: ignore[arg-type]
            # The fallback ranking and admission apply the configured rules (request_router_kwargs are JSON).
            request_router_kwargs=dataclasses.asdict(RoutingRules.of(settings)),
            request_routing_stats_period_s=settings.stats_period_s,  # type: ignore[arg-type]
        )
        router = _deployment(
            PriorityRouter, num_replicas=1, max_ongoing_requests=100_000, ray_actor_options={"num_cpus": 0, **hooks}
        ).bind(settings)
    else:
        # Ray Serve's power of two choices (a subclass only so that benchmarks can pin background load).
        engine_options["request_router_config"] = RequestRouterConfig(
            request_router_class=PowerOfTwoRouter,  # type: ignore[arg-type]
        )
    engine = _deployment(EngineReplica, **engine_options).bind(settings, router)
    ingress = _deployment(
        Ingress,
        num_replicas=settings.ingress_replicas,
        max_ongoing_requests=10_000,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(settings, engine, router)
