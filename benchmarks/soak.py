"""Soak benchmark (not a test): minutes of mixed traffic on loopback; nothing may be lost, memory must stay flat.

The qllm app (two replicas) gets seeded Poisson traffic: LS and BE, streaming and not, completions and
chat, a few clients that hang up mid-stream and a few malformed requests. Every request must end as
completed (all its tokens), an explicit error (HTTP status and error code, or an error event in the
stream), or a deliberate hang-up; anything else (timeout, reset connection, a stream cut without an
error, a short answer) is *lost*. Engine replica memory (RSS) is sampled after a warm-up and at the end.

Run: `python -m benchmarks.soak --minutes 5 --out benchmarks/results/soak.json`
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
import psutil
from ray import serve

from benchmarks.json_form import write_result
from benchmarks.local_app import deploy, local_cluster
from benchmarks.script_args import add_out_argument, count, script_parser
from deployments.protocol import ReplicaLoad

REPLICA_PROCESS = "ServeReplica:qllm:EngineReplica"
WORDS = ["alpha", "beta", "gamma", "delta", "moe", "expert", "token", "layer", "route", "cache", "serve"]


@dataclass(frozen=True)
class Plan:
    """One request of the soak: what to send and what the client will do."""

    priority: str
    chat: bool
    stream: bool
    prompt_words: int
    max_tokens: int
    hang_up: bool
    """Close the connection after the first streamed token."""
    malformed: bool
    """Send an invalid temperature (expects 400)."""


def make_plan(rng: random.Random) -> Plan:
    """A random request: 25% LS, half streamed, 20% chat, 5% hang-ups (streams), 3% malformed."""
    stream = rng.random() < 0.5
    return Plan(
        priority="ls" if rng.random() < 0.25 else "be",
        chat=rng.random() < 0.2,
        stream=stream,
        prompt_words=rng.randint(4, 200),
        max_tokens=rng.randint(4, 64),
        hang_up=stream and rng.random() < 0.05,
        malformed=rng.random() < 0.03,
    )


def _body(plan: Plan, rng: random.Random) -> dict[str, Any]:
    text = " ".join(rng.choice(WORDS) for _ in range(plan.prompt_words))
    body: dict[str, Any] = {
        "max_tokens": plan.max_tokens,
        "priority": plan.priority,
        "ignore_eos": True,
        "stream": plan.stream,
        "temperature": -1.0 if plan.malformed else 0.0,
    }
    if plan.stream:
        body["stream_options"] = {"include_usage": True}
    if plan.chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    return body


def _error_cause(status: int, text: str) -> str:
    try:
        error = json.loads(text)["error"]
        return f"{status} {error.get('code') or error.get('type')}"
    except (ValueError, KeyError, TypeError):
        return f"{status} (no error object)"


async def send(client: httpx.AsyncClient, base: str, plan: Plan, rng: random.Random) -> tuple[str, str]:
    """Send one request; returns (outcome, detail) with outcome completed|errored|hung_up|lost."""
    path = "/v1/chat/completions" if plan.chat else "/v1/completions"
    try:
        async with client.stream("POST", f"{base}{path}", json=_body(plan, rng), timeout=180) as r:
            if r.status_code != 200:
                return "errored", _error_cause(r.status_code, (await r.aread()).decode(errors="replace"))
            if not plan.stream:
                usage = json.loads(await r.aread())["usage"]
                ok = usage["completion_tokens"] == plan.max_tokens
                return ("completed", "") if ok else ("lost", f"short answer {usage['completion_tokens']}")
            return await _read_stream(r, plan)
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return "lost", type(exc).__name__


async def _read_stream(r: httpx.Response, plan: Plan) -> tuple[str, str]:
    tokens, done = None, False
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        event = json.loads(line[6:])
        if "error" in event:
            return "errored", f"stream {event['error'].get('code')}"
        if plan.hang_up and event.get("choices"):
            return "hung_up", ""  # leaving the `async with` closes the connection mid-stream
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    if done and tokens == plan.max_tokens:
        return "completed", ""
    return "lost", f"stream ended (done={done}, tokens={tokens})"


def replica_rss() -> dict[int, int]:
    """Resident memory of each engine replica process, by pid."""
    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if REPLICA_PROCESS in " ".join(proc.info["cmdline"] or ()):
            found[proc.info["pid"]] = proc.memory_info().rss
    return found


@dataclass(frozen=True)
class RssSample:
    """Engine replica memory at one moment of a soak."""

    t_s: float
    rss: dict[int, int]
    """Resident bytes by replica process id."""


@dataclass(frozen=True)
class SoakRun:
    """What one stretch of traffic came to."""

    sent: int
    duration_s: float
    outcomes: dict[str, int]
    """completed, errored, hung_up, lost: how many of each."""
    causes: dict[str, int]
    """Each outcome with its detail (an error code, why a request was lost), counted."""
    rss_samples: tuple[RssSample, ...]

    @property
    def lost(self) -> int:
        """Requests that ended neither completed, with an explicit error, nor by a deliberate hang-up."""
        return self.outcomes.get("lost", 0)


async def soak(base: str, minutes: float, rate: float, max_requests: int, seed: int) -> SoakRun:
    """Open-loop Poisson traffic for `minutes` (at most `max_requests`), then wait for every answer."""
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    causes: Counter[str] = Counter()
    samples: list[RssSample] = []
    start = time.monotonic()

    async def one(plan: Plan, request_rng: random.Random) -> None:
        outcome, detail = await send(client, base, plan, request_rng)
        outcomes[outcome] += 1
        if detail:
            causes[f"{outcome}: {detail}"] += 1

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1000)) as client:
        tasks: list[asyncio.Task[None]] = []
        next_sample = 0.0
        while len(tasks) < max_requests and time.monotonic() - start < minutes * 60:
            elapsed = time.monotonic() - start
            if elapsed >= next_sample:
                samples.append(RssSample(round(elapsed, 1), replica_rss()))
                next_sample += 30.0
            plan = make_plan(rng)
            tasks.append(asyncio.create_task(one(plan, random.Random(rng.random()))))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    return SoakRun(len(tasks), round(time.monotonic() - start, 1), dict(outcomes), dict(causes), tuple(samples))


@dataclass(frozen=True)
class ReplicaAtEnd:
    """A replica's last report, without its recent TTFTs: what must be zero once every request has ended."""

    replica_id: str
    ls_waiting: int
    ls_running: int
    be_waiting: int
    be_running: int
    kv_usage: float

    @classmethod
    def of(cls, load: ReplicaLoad) -> ReplicaAtEnd:
        """From a replica's load report."""
        ls, be = load.ls, load.be
        return cls(load.replica_id, ls.waiting, ls.running, be.waiting, be.running, load.kv_usage)


def _mib(rss: int) -> float:
    return round(rss / 2**20, 1)


def main() -> None:
    """Warm up, soak, then report outcomes, engine state and replica memory growth."""
    parser = script_parser(__doc__)
    parser.add_argument("--model", default="tiny", help="engine model: tiny, bench or a checkpoint directory")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson)")
    parser.add_argument("--max-requests", type=count, default=2000)
    parser.add_argument("--max-queued-be", type=count, default=24, help="small, so some BE gets 429 at peaks")
    parser.add_argument("--seed", type=int, default=0)
    add_out_argument(parser, "soak.json")
    args = parser.parse_args()

    app_args = {
        "model_name": "qllm",
        "replicas": 2,
        "num_cpus": 1,
        "max_queued_be": args.max_queued_be,
        "engine": {"model": args.model, "device": "cpu", "kv_cache_tokens": 16384},
    }
    with local_cluster() as base:
        deploy(base, app_args)
        warm = asyncio.run(soak(base, minutes=0.5, rate=args.rate, max_requests=100, seed=args.seed + 1))
        time.sleep(5)
        rss_start = replica_rss()
        run = asyncio.run(soak(base, args.minutes, args.rate, args.max_requests, args.seed))
        time.sleep(5)  # replicas report their final, idle load
        rss_end = replica_rss()
        router = serve.get_deployment_handle("PriorityRouter", app_name="qllm")
        loads = [o.load for o in router.stats.remote().result(timeout_s=30).replicas.values()]
    growth = {str(p): round(100 * (rss_end[p] - rss_start[p]) / rss_start[p], 2) for p in rss_start if p in rss_end}
    summary = {"sent": run.sent, "outcomes": run.outcomes, "causes": run.causes, "lost": run.lost}
    print(json.dumps(summary | {"replica_rss_growth_pct": growth}))
    results = {
        "settings": vars(args),
        "warmup": {"sent": warm.sent, "outcomes": warm.outcomes},
        **summary,
        "duration_s": run.duration_s,
        "rss_samples": run.rss_samples,
        "engines_at_end": [ReplicaAtEnd.of(load) for load in loads],
        "replica_rss_mib": {str(p): {"start": _mib(rss_start[p]), "end": _mib(rss_end.get(p, 0))} for p in rss_start},
        "replica_rss_growth_pct": growth,
    }
    write_result(args.out, results)


if __name__ == "__main__":
    main()
