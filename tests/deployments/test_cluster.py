"""A real cluster, not one process: two Ray nodes on loopback, serve_config.yaml deployed with `serve deploy`.

Each node offers one CPU and an engine replica takes one, so the two replicas land one per node. The tiny
model answers greedily the same on both; when the worker node dies (killed, as when its machine fails: a
graceful stop would drain it and let every stream finish), the streams it was serving end with an explicit
error, the app keeps answering from the head node, and requests that had no token yet are placed again.
The cluster is this test's own (its own temp dir and ports, stopped by signalling the `ray start`
processes it started), so the in-process cluster the other tests share is left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deployments.conftest import _free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HEAD_ONLY = "qllm_test_head"
"""A custom resource only the head node has: the ingress and the router are pinned to it (with the HTTP
proxy), so killing the worker node takes an engine replica away and nothing else."""
# Loopback addresses, one per node. Not 127.0.0.1: `ray start` replaces that one (and "localhost") with the
# machine's outward address, while every 127.x.y.z is on the loopback interface and taken as given.
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
GREEDY = {"prompt": "the same prompt on every node", "max_tokens": 12, "temperature": 0, "ignore_eos": True}


class Cluster:
    """`ray start --block` processes, one per node on its own loopback address."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.gcs_port = _free_port()
        self.dashboard = f"http://127.0.0.1:{_free_port()}"
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        # The repository's code on every worker of both nodes, installed or not.
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        # Token authentication, as Ray sets up for a new local cluster, said outright so that the `ray` and
        # `serve` commands run here present the token too (the head node writes one if there is none).
        self.env["RAY_AUTH_MODE"] = "token"
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, ip: str, head: bool) -> None:
        """Start a node at a loopback address: the head (GCS, dashboard, HEAD_ONLY resource) or a worker."""
        ports = (
            "node-manager",
            "object-manager",
            "dashboard-agent-listen",
            "dashboard-agent-grpc",
            "runtime-env-agent",
        )
        cmd = [
            str(BIN / "ray"),
            "start",
            "--block",
            f"--node-ip-address={ip}",
            "--num-cpus=1",
            "--num-gpus=0",
            f"--object-store-memory={200 * 1024**2}",
            f"--temp-dir={self.root}",
            "--disable-usage-stats",
            f"--metrics-export-port={_free_port()}",
            *(f"--{p}-port={_free_port()}" for p in ports),
        ]
        if head:
            cmd += [
                "--head",
                f"--port={self.gcs_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}",
                f"--ray-client-server-port={_free_port()}",
                f"--resources={json.dumps({HEAD_ONLY: 1})}",
            ]
        else:
            cmd.append(f"--address={HEAD_IP}:{self.gcs_port}")
        with (self.root / f"{name}.out").open("wb") as out:
            self.nodes[name] = subprocess.Popen(  # noqa: S603 (fixed argv, no shell)
                cmd, env=self.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT
            )

    def kill(self, name: str) -> None:
        """Kill a node at once, as a machine failure would: SIGKILL to `ray start --block`, whose child
        processes the kernel ends with it (Ray's fate sharing); the node's workers follow their raylet."""
        proc = self.nodes.pop(name)
        proc.kill()
        proc.wait()

    def end_leftovers(self) -> list[int]:
        """End any process of this cluster still running (its command line names the cluster's temp dir)."""
        left = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):
                if str(self.root).encode() in cmdline.read_bytes():
                    left.append(int(cmdline.parent.name))
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left

    def cli(self, *args: str, timeout: float = 120) -> str:
        """Run a `ray` or `serve` command against this cluster's dashboard; its standard output."""
        done = subprocess.run(  # noqa: S603 (fixed argv, no shell)
            [str(BIN / args[0]), *args[1:], "--address", self.dashboard],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
        return done.stdout

    def alive_nodes(self) -> list[dict[str, Any]]:
        """The cluster's live nodes, as `ray list nodes` gives them."""
        return json.loads(self.cli("ray", "list", "nodes", "--format", "json", "--filter", "state=ALIVE"))

    def engine_replicas(self) -> dict[str, str]:
        """The live engine replicas: replica id -> node id."""
        out = self.cli("ray", "list", "actors", "--format", "json", "--filter", "state=ALIVE", "--limit", "1000")
        return {
            a["name"].rsplit("#", 1)[1]: a["node_id"]
            for a in json.loads(out)
            if a.get("name", "").startswith("SERVE_REPLICA::qllm#EngineReplica#")
        }

    def replica_that_served(self, request_id: str) -> str:
        """The replica named in a request's log line (the ingress writes it when the request ends)."""
        lines = self.ingress_log_lines(f"request_id={request_id} ")
        assert len(lines) == 1, lines
        return lines[0].split(" replica=", 1)[1].split()[0]

    def ingress_log_lines(self, needle: str) -> list[str]:
        """Lines of the ingress replicas' logs (on the head node) that contain `needle`."""
        logs = self.root / "session_latest" / "logs" / "serve"
        return [
            line
            for path in sorted(logs.glob("replica_qllm_Ingress_*.log"))
            for line in path.read_text(errors="replace").splitlines()
            if needle in line
        ]


def _until(what: str, check: Any, timeout: float, every: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, AssertionError, ValueError):  # not there yet
            if result := check():
                return result
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s")


def _config(root: Path, http_port: int) -> Path:
    """serve_config.yaml as committed, but for two nodes on one machine: one HTTP proxy (a proxy per node
    would bind the same address and port twice) on a free port, and the control plane on the head."""
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    config["http_options"] = {**config["http_options"], "host": "127.0.0.1", "port": http_port}
    config["proxy_location"] = "HeadOnly"
    head = {"num_cpus": 0, "resources": {HEAD_ONLY: 0.01}}
    (app,) = config["applications"]
    app["deployments"] = [{"name": name, "ray_actor_options": head} for name in ("Ingress", "PriorityRouter")]
    path = root / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Cluster, str]]:
    """A head and a worker node with the app deployed on both; the app's base URL."""
    # Short: Ray puts Unix sockets under it, and their paths may not exceed 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="qllm-ray-", dir="/tmp"))
    nodes = Cluster(root)
    try:
        nodes.start("head", HEAD_IP, head=True)
        _until("the head node", nodes.alive_nodes, 120)
        nodes.start("worker", WORKER_IP, head=False)
        _until("two nodes", lambda: len(nodes.alive_nodes()) == 2, 120)
        http_port = _free_port()
        nodes.cli("serve", "deploy", str(_config(root, http_port)))
        base = f"http://127.0.0.1:{http_port}"
        _until("the app", lambda: httpx.get(f"{base}/health", timeout=5).status_code == 200, 300)
        yield nodes, base
    finally:
        for name in list(nodes.nodes)[::-1]:
            nodes.kill(name)  # a graceful stop drains for up to 30 s; nothing here needs keeping
        if left := nodes.end_leftovers():
            print(f"ended {len(left)} processes the cluster's stop left behind: {left}")
        shutil.rmtree(root, ignore_errors=True)


async def _greedy_round(base: str) -> list[httpx.Response]:
    async with httpx.AsyncClient() as client:  # at once: the router spreads what it places between reports
        posts = [client.post(f"{base}/v1/completions", json=GREEDY, timeout=60) for _ in range(4)]
        return list(await asyncio.gather(*posts))


async def _stream(client: httpx.AsyncClient, base: str, started: asyncio.Event) -> dict[str, Any]:
    body = {"prompt": "a long answer", "max_tokens": 300, "ignore_eos": True, "stream": True}
    result: dict[str, Any] = {"id": None, "error": None, "done": False}
    async with client.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                result["done"] = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    result["error"] = event["error"]
                else:
                    result["id"] = event["id"]
                    started.set()
    return result


async def _kill_under_load(
    nodes: Cluster, base: str
) -> tuple[list[dict[str, Any]], list[httpx.Response], list[httpx.Response]]:
    """Long streams on both replicas; the worker node killed while long prompts are in their prefill; then
    new requests."""
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=50)) as client:
        streams = []
        for _ in range(6):  # one by one, each seen streaming, so that the router spreads them over both nodes
            started = asyncio.Event()
            streams.append(asyncio.create_task(_stream(client, base, started)))
            await asyncio.wait_for(started.wait(), timeout=60)
        # Long prompts have no token until their prefill ends: those on the worker when it dies are placed again.
        prefilling = [_post(client, base, [5] * 1500) for _ in range(4)]
        await asyncio.sleep(0.3)  # they reach the replicas
        nodes.kill("worker")
        after = [_post(client, base, "short") for _ in range(6)]
        return (
            list(await asyncio.gather(*streams)),
            list(await asyncio.gather(*prefilling)),
            list(await asyncio.gather(*after)),
        )


def _post(client: httpx.AsyncClient, base: str, prompt: str | list[int]) -> asyncio.Task[httpx.Response]:
    body = {"prompt": prompt, "max_tokens": 4, "ignore_eos": True}
    return asyncio.create_task(client.post(f"{base}/v1/completions", json=body, timeout=120))


def test_replicas_on_two_nodes_answer_alike_and_the_app_survives_losing_one(cluster: tuple[Cluster, str]) -> None:
    nodes, base = cluster
    (head_node,) = [n["node_id"] for n in nodes.alive_nodes() if n["is_head_node"]]
    replicas = _until("an engine replica on each node", lambda: _one_per_node(nodes.engine_replicas()), 300)
    (worker_replica,) = [rid for rid, node in replicas.items() if node != head_node]
    (head_replica,) = set(replicas) - {worker_replica}

    # Greedy output is the same on both nodes: rounds until both replicas have answered (both are loaded).
    texts: set[str] = set()
    served: set[str] = set()
    for _ in range(15):
        responses = asyncio.run(_greedy_round(base))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        texts |= {r.json()["choices"][0]["text"] for r in responses}
        for r in responses:
            served.add(_until("its log line", lambda r=r: nodes.replica_that_served(r.json()["id"]), 30, every=0.5))
        if served == set(replicas):
            break
    assert served == set(replicas), f"answered by {served}; replicas {replicas}"
    assert len(texts) == 1, texts

    placed_before = len(nodes.ingress_log_lines("replica failed before the first token"))
    streams, prefilling, after = asyncio.run(_kill_under_load(nodes, base))
    cut = set()
    for s in streams:  # every stream ended with [DONE]: whole if its replica lived, else after an error event
        assert s["done"], s
        if nodes.replica_that_served(s["id"]) == worker_replica:
            assert s["error"] is not None and s["error"]["code"] == "replica_failed", s
            cut.add(s["id"])
        else:
            assert s["error"] is None, s
    assert 0 < len(cut) < len(streams), "the streams must have been spread over both nodes"
    for r in prefilling:  # whole (placed again if its prefill was cut), or an explicit 503 if cut after a token
        assert r.status_code in (200, 503), r.text
        assert r.status_code == 200 or r.json()["error"]["code"] == "replica_failed", r.text
    # Sent after the node died: no token anywhere yet, so however they were placed, they are answered.
    assert [r.status_code for r in after] == [200] * len(after), [r.text for r in after]
    placed_again = len(nodes.ingress_log_lines("replica failed before the first token")) - placed_before
    print(f"long prompts during the kill: {[r.status_code for r in prefilling]}; {placed_again} placed again")

    for _ in range(4):  # and the app keeps answering, from the head node's replica
        r = httpx.post(f"{base}/v1/completions", json=GREEDY, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] in texts
    _until("the dead node's replica gone", lambda: set(nodes.engine_replicas()) == {head_replica}, 120)


def _one_per_node(replicas: dict[str, str]) -> dict[str, str] | None:
    return replicas if len(replicas) == 2 and len(set(replicas.values())) == 2 else None
