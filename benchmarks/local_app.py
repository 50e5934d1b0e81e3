"""A local Ray cluster with the qllm application on 127.0.0.1, for the benchmarks that need the whole app."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import ray
from ray import serve

from deployments.app import build_app


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(base: str, timeout: float = 300.0) -> None:
    """Until the app's /health answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError("the application did not become healthy")


@contextmanager
def local_cluster() -> Iterator[str]:
    """Start Ray and Serve on loopback; yields the HTTP base URL. Deploy apps with `deploy`."""
    port = free_port()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def deploy(base: str, app_args: dict[str, Any], name: str = "qllm") -> None:
    """Run the qllm application with `app_args` at `/` and wait until it is healthy."""
    serve.run(build_app(app_args), name=name, route_prefix="/", blocking=False)
    wait_healthy(base)
