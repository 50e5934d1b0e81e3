"""Router benchmark (not a test): the PriorityRouter against Ray Serve's power-of-two-choices router.

Two engine replicas on one local Ray cluster, under a skewed load: one replica also carries a few long
BE prompts kept in flight on it alone (a tenant with long documents), pinned there through the request
router the same way under either mode. On top, each seed's Poisson mix of LS and BE requests goes over
HTTP to each routing mode in turn, each run on a freshly deployed application. Per run: LS TTFT p50 and
p99, LS SLO attainment, throughput of the HTTP BE requests; across seeds: mean, min and max, and whether
the PriorityRouter met the target in every seed (LS attainment at least 5 points above power of two, LS
p99 lower, BE throughput not more than 5% below).

Run: `python -m benchmarks.router_bench --seeds 0 1 2` (writes benchmarks/results/router_bench.json).
In pieces: `--modes priority --seeds 1 --keep` adds runs to those already in the file (same settings).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
from ray import serve

from benchmarks.local_app import deploy, local_cluster
from benchmarks.metrics import RunMetrics, summarize
from benchmarks.runners import HttpRunner, HttpSettings
from benchmarks.workload import LengthDistribution, WorkloadSettings, poisson_workload
from deployments.protocol import GenerateRequest, PlacementHint, Prompt, StreamError
from qllm_core.params import SamplingParams
from qllm_core.request import PriorityClass
from qllm_core.stats import EngineStats

MODES = ("power_of_two", "priority")
APP = "qllm"
# The target, per seed.
MIN_ATTAINMENT_GAIN = 0.05
MAX_BE_LOSS = 0.05
# The long prompts start this long before the measured requests, so the skewed replica is already busy.
_SKEW_LEAD_S = 5.0


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench", help="engine model: tiny, bench or a checkpoint directory")
    parser.add_argument("--rate", type=float, default=1.2, help="HTTP requests per second")
    parser.add_argument("--ls-requests", type=int, default=100, help="LS requests per run (arrivals until then)")
    parser.add_argument("--ls-share", type=float, default=0.4)
    parser.add_argument("--slo-s", type=float, default=1.0, help="LS TTFT SLO")
    parser.add_argument("--skew-prompt", type=int, default=3500, help="tokens of each long BE prompt")
    parser.add_argument("--skew-concurrency", type=int, default=1, help="long BE prompts in flight on one replica")
    parser.add_argument("--skew-max-tokens", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--keep", action="store_true", help="keep the file's other runs (same settings only)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/router_bench.json"))
    return parser.parse_args()


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """What must match for runs to be compared (and merged with --keep)."""
    keys = ("model", "rate", "ls_requests", "ls_share", "slo_s", "skew_prompt", "skew_concurrency", "skew_max_tokens")
    return {k: getattr(args, k) for k in keys} | {"replicas": 2}


def _replica_ids() -> list[str]:
    """The engine replicas' ids, as request routers name them (the tail of Serve's actor names)."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"]
    return sorted(n.rsplit("#", 1)[1] for n in names if f"{APP}#EngineReplica#" in n)


async def _skew(pinned: str, args: argparse.Namespace, seed: int, stop: asyncio.Event) -> dict[str, int]:
    """Keep `skew_concurrency` long BE prompts in flight on the pinned replica alone until `stop`: closed
    loop, so the skew is the same amount of work however fast the machine is."""
    handle = serve.get_deployment_handle("EngineReplica", app_name=APP).options(stream=True)
    rng = random.Random(seed)
    counts = {"completed": 0, "failed": 0}
    hint = PlacementHint(PriorityClass.BEST_EFFORT, (pinned,), admitted=True)
    params = SamplingParams(max_tokens=args.skew_max_tokens, temperature=0.0, ignore_eos=True)

    async def loop(worker: int) -> None:
        n = 0
        while not stop.is_set():
            tokens = tuple(rng.randrange(3, 500) for _ in range(args.skew_prompt))
            request = GenerateRequest(f"skew-{worker}-{n}", PriorityClass.BEST_EFFORT, Prompt(token_ids=tokens), params)
            stream = handle.generate.remote(request, placement=hint)
            try:
                async for item in stream:  # type: ignore[union-attr]
                    if isinstance(item, StreamError):
                        counts["failed"] += 1
                        break
                else:
                    counts["completed"] += 1
            finally:
                stream.cancel()  # type: ignore[union-attr]
            n += 1

    workers = [asyncio.create_task(loop(w)) for w in range(args.skew_concurrency)]
    await stop.wait()
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    return counts


async def _per_replica(replica_ids: list[str], slo_s: float) -> dict[str, dict[str, Any]]:
    """What each engine saw of LS (its own TTFTs, from the request's arrival at the replica): how many
    LS requests each replica served and how many met the SLO there."""
    handle = serve.get_deployment_handle("EngineReplica", app_name=APP)
    out = {}
    for rid in replica_ids:
        hint = PlacementHint(PriorityClass.LATENCY_SENSITIVE, (rid,), admitted=True)
        stats: EngineStats = await handle.stats.remote(placement=hint)  # type: ignore[misc]
        ttfts = stats.classes[PriorityClass.LATENCY_SENSITIVE.label].recent_ttft_s
        met = sum(t <= slo_s for t in ttfts)
        out[rid] = {"ls_served": len(ttfts), "ls_met_at_engine": met, "ls_max_engine_ttft_s": max(ttfts, default=None)}
    return out


async def _run(base: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    workload = poisson_workload(
        WorkloadSettings(
            ls_share=args.ls_share,
            prompt_len=LengthDistribution(mean=220, cap=1024, sigma=1.0),
            max_tokens=LengthDistribution(mean=32, cap=64, sigma=0.5),
            ls_requests=args.ls_requests,
            seed=seed,
        ),
        args.rate,
    )
    http = HttpSettings(endpoint=base, model="bench", label="endpoint", extra_body={"ignore_eos": True})
    replica_ids = _replica_ids()
    pinned = replica_ids[0]
    async with HttpRunner(http) as runner:
        await runner.warmup(requests=4)
        stop = asyncio.Event()
        skew = asyncio.create_task(_skew(pinned, args, seed, stop))
        await asyncio.sleep(_SKEW_LEAD_S)
        try:
            records = await runner.run(workload, drain_timeout_s=300.0)
        finally:
            stop.set()
            skew_counts = await skew
    metrics = summarize(records, args.slo_s)
    be_tokens = sum(r.output_tokens for r in records if r.completed and r.priority == "be")
    replicas = await _per_replica(replica_ids, args.slo_s)
    return {
        "seed": seed,
        "skewed_replica": pinned,
        "skew": skew_counts,
        "replicas": replicas,
        **_summary(metrics, be_tokens),
    }


def _summary(metrics: RunMetrics, be_tokens: int) -> dict[str, Any]:
    ls = metrics.ls
    return {
        "ls_requests": ls.requests,
        "ls_failed": ls.failed,
        "ls_attainment": ls.slo_attainment,  # a request without a first token counts as a miss
        "ls_ttft_p50_s": ls.ttft.p50 if ls.ttft else None,  # percentiles: of the requests answered
        "ls_ttft_p99_s": ls.ttft.p99 if ls.ttft else None,
        "be_requests": metrics.be.requests,
        "be_failed": metrics.be.failed,
        "be_tokens_per_s": be_tokens / metrics.duration_s,
        "metrics": asdict(metrics),
    }


def _spread(values: list[float | None]) -> dict[str, float] | None:
    known = [v for v in values if v is not None]
    if not known:
        return None
    return {"mean": statistics.fmean(known), "min": min(known), "max": max(known)}


def _verdicts(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per seed with both modes: the PriorityRouter's gain over power of two, and whether it met the target
    (an LS request it left unanswered misses it too)."""
    by = {(r["seed"], r["mode"]): r for r in runs}
    out = []
    for seed in sorted({r["seed"] for r in runs}):
        if (seed, "priority") not in by or (seed, "power_of_two") not in by:
            continue
        p, b = by[(seed, "priority")], by[(seed, "power_of_two")]
        gain = p["ls_attainment"] - b["ls_attainment"]
        p99_change = (
            None if None in (p["ls_ttft_p99_s"], b["ls_ttft_p99_s"]) else p["ls_ttft_p99_s"] - b["ls_ttft_p99_s"]
        )
        be_change = p["be_tokens_per_s"] / b["be_tokens_per_s"] - 1 if b["be_tokens_per_s"] else None
        met = (
            gain >= MIN_ATTAINMENT_GAIN
            and p99_change is not None
            and p99_change < 0
            and be_change is not None
            and be_change >= -MAX_BE_LOSS
            and p["ls_failed"] == 0
        )
        out.append(
            {"seed": seed, "attainment_gain": gain, "p99_change_s": p99_change, "be_change": be_change, "met": met}
        )
    return out


_SPREAD_KEYS = ("ls_attainment", "ls_ttft_p50_s", "ls_ttft_p99_s", "be_tokens_per_s")
_COLUMNS = (
    ("attainment", "ls_attainment", ".1%"),
    ("p99 s", "ls_ttft_p99_s", ".3f"),
    ("BE tok/s", "be_tokens_per_s", ".2f"),
)


def _report(runs: list[dict[str, Any]]) -> dict[str, Any]:
    modes = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        if mine:
            spread = {k: _spread([r[k] for r in mine]) for k in _SPREAD_KEYS}
            modes[mode] = spread | {"seeds": sorted(r["seed"] for r in mine)}
    return {"by_mode": modes, "per_seed": _verdicts(runs)}


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print(runs: list[dict[str, Any]], report: dict[str, Any]) -> None:
    head = f"{'seed':>4}  {'mode':<13}{'LS n':>5}{'lost':>5}{'attain':>9}{'p50 s':>8}{'p99 s':>8}{'BE tok/s':>10}"
    print(head + f"{'LS on skewed (met)':>20}")
    for r in sorted(runs, key=lambda r: (r["seed"], r["mode"])):
        skewed = r["replicas"][r["skewed_replica"]]
        print(
            f"{r['seed']:>4}  {r['mode']:<13}{r['ls_requests']:>5}{r['ls_failed']:>5}{_f(r['ls_attainment'], '.1%'):>9}"
            f"{_f(r['ls_ttft_p50_s'], '.3f'):>8}{_f(r['ls_ttft_p99_s'], '.3f'):>8}{_f(r['be_tokens_per_s'], '.2f'):>10}"
            f"{skewed['ls_served']:>14} ({skewed['ls_met_at_engine']})"
        )
    for mode, s in report["by_mode"].items():
        parts = []
        for label, key, spec in _COLUMNS:
            v = s[key] or {"mean": None, "min": None, "max": None}
            parts.append(f"{label} {_f(v['mean'], spec)} [{_f(v['min'], spec)}, {_f(v['max'], spec)}]")
        print(f"{mode:<13} mean [min, max] over seeds {s['seeds']}: " + "; ".join(parts))
    for v in report["per_seed"]:
        print(
            f"seed {v['seed']}: attainment {v['attainment_gain'] * 100:+.1f} points,"
            f" p99 {_f(v['p99_change_s'], '+.3f')} s, BE {_f(v['be_change'], '+.1%')}:"
            f" {'target met' if v['met'] else 'target missed'}"
        )


def _write(path: Path, settings: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    report = _report(runs)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine, "settings": settings, **report, "runs": runs}, indent=2) + "\n")
    return report


def main() -> None:
    """Deploy each routing mode in turn, seed by seed, under the same skewed load and workload; the file is
    rewritten after every run, so an interrupted benchmark keeps what it measured."""
    args = _parse()
    settings = _settings(args)
    runs: list[dict[str, Any]] = []
    if args.keep and args.out.exists():
        previous = json.loads(args.out.read_text())
        if previous.get("settings") != settings:
            raise SystemExit(f"--keep: {args.out} holds runs with other settings: {previous.get('settings')}")
        redo = {(s, m) for s in args.seeds for m in args.modes}
        runs = [r for r in previous["runs"] if (r["seed"], r["mode"]) not in redo]
    with local_cluster() as base:
        for seed in args.seeds:
            for mode in args.modes:
                app_args = {
                    "model_name": "bench",
                    "replicas": 2,
                    "num_cpus": 1,
                    "routing": mode,
                    "ls_ttft_slo_s": args.slo_s,
                    "engine": {"model": args.model, "device": "cpu", "kv_cache_tokens": 32768},
                }
                deploy(base, app_args, name=APP)
                run = {"mode": mode, **asyncio.run(_run(base, args, seed))}
                serve.delete(APP)
                runs.append(run)
                _write(args.out, settings, runs)
                print(f"seed {seed} {mode}: attainment {_f(run['ls_attainment'], '.1%')}", flush=True)
    _print(runs, _write(args.out, settings, runs))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
