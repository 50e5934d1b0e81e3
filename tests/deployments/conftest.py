"""One real local Ray cluster and one running qllm application per pytest session, on 127.0.0.1."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest
import ray
from ray import serve

from deployments.app import build_app

APP_ARGS = {
    "model_name": "qllm-tiny",
    "replicas": 2,
    "num_cpus": 1,
    "stats_period_s": 0.2,
    "ls_ttft_slo_s": 2.0,
    "be_hold_max_s": 3.0,
    "engine": {"model": "tiny", "device": "cpu", "kv_cache_tokens": 16384, "policy": "qllm", "granularity": "layer"},
}


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
            running = 0 if engine is None else engine.replica_states.get("RUNNING", 0)
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
