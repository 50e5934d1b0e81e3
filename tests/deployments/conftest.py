"""One real local Ray cluster and one running qllm application per pytest session, on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
import ray
from ray import serve
from ray.serve.schema import ReplicaState

from deployments.app import build_app
from deployments.faults import FAULT_INJECTION_ENV

APP_ARGS = {
    "model_name": "qllm-tiny",
    "replicas": 2,
    "num_cpus": 1,
    "stats_period_s": 0.2,
    "ls_ttft_slo_s": 2.0,
    "be_hold_max_s": 3.0,
    "engine": {"model": "tiny", "device": "cpu", "kv_cache_tokens": 16384, "policy": "qllm", "granularity": "layer"},
}

STALL_BOUND_S = 10.0
"""`engine_stall_timeout_s` of the fault-injection app: far above a tiny model's longest step on a loaded CPU,
short enough for a staged stall to be replaced within a test."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def engine_replica_actors(app: str = "qllm") -> list[str]:
    """Names of `app`'s live EngineReplica actors (Serve keeps them in the 'serve' namespace)."""
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if f":{app}#EngineReplica#" in a["name"] and a["namespace"] == "serve"
    )


def wait_healthy(base: str, replicas: int, timeout: float = 120.0, app: str = "qllm") -> None:
    """Until /health answers and `replicas` engine replicas of `app` run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ok = httpx.get(f"{base}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            ok = False
        status = serve.status().applications.get(app)
        running = 0
        if status is not None:
            engine = status.deployments.get("EngineReplica")
            running = 0 if engine is None else engine.replica_states.get(ReplicaState.RUNNING, 0)
        if ok and running == replicas:
            return
        time.sleep(0.5)
    raise AssertionError(f"the app did not become healthy with {replicas} replicas in {timeout}s")


@pytest.fixture(scope="session")
def ray_metrics_port() -> int:
    """The port where this session's Ray node serves its metrics export (127.0.0.1)."""
    return _free_port()


@pytest.fixture(scope="session")
def serve_app(ray_metrics_port: int) -> Iterator[str]:
    """Base URL of the running application (http://127.0.0.1:PORT)."""
    port = _free_port()
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        log_to_driver=False,
        namespace="qllm-tests",
        _metrics_export_port=ray_metrics_port,
        # Export every second (Ray's floor) rather than every 10 s, so the Prometheus test waits less.
        _system_config={"metrics_report_interval_ms": 1000},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(APP_ARGS), name="qllm", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, APP_ARGS["replicas"])  # type: ignore[arg-type]
    yield base
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def faulty_app(serve_app: str) -> Iterator[str]:
    """A second application on the session's cluster ("faulty", two replicas), built with the engine
    replicas' fault hooks on (deployments/faults.py); its base URL."""
    os.environ[FAULT_INJECTION_ENV] = "1"
    try:
        app = build_app({**APP_ARGS, "replicas": 2, "engine_stall_timeout_s": STALL_BOUND_S})
    finally:
        del os.environ[FAULT_INJECTION_ENV]
    serve.run(app, name="faulty", route_prefix="/faulty", blocking=False)
    base = f"{serve_app}/faulty"
    wait_healthy(base, replicas=2, app="faulty")
    yield base
    serve.delete("faulty")


def wait_replaced(base: str, victim: str, within_s: float, app: str) -> None:
    """Until Serve has replaced the engine replica `victim` (a part of its actor name) of `app` and the app is
    healthy with two replicas again; fails after `within_s` without a replacement."""
    deadline = time.monotonic() + within_s
    while any(victim in name for name in engine_replica_actors(app)):
        assert time.monotonic() < deadline, f"Serve did not replace replica {victim} of {app} in {within_s} s"
        time.sleep(0.5)
    wait_healthy(base, replicas=2, app=app)
