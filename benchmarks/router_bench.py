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
import random
import statistics
from dataclasses import dataclass, fields
from pathlib import Path

import ray
from ray import serve

from benchmarks.aggregate import Spread
from benchmarks.json_form import from_dict, read_json, write_result
from benchmarks.local_app import deploy, local_cluster
from benchmarks.metrics import RunMetrics, summarize
from benchmarks.runners import HttpRunner, HttpSettings
from benchmarks.script_args import add_out_argument, count, script_parser
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


@dataclass(frozen=True)
class RouterSettings:
    """What must match for runs to be compared (and merged with --keep)."""

    model: str
    rate: float
    ls_requests: int
    ls_share: float
    slo_s: float
    skew_prompt: int
    skew_concurrency: int
    skew_max_tokens: int
    replicas: int = 2


@dataclass(frozen=True)
class SkewCounts:
    """How the long BE prompts on the skewed replica ended."""

    completed: int
    failed: int


@dataclass(frozen=True)
class ReplicaSeen:
    """What one engine saw of LS (its own TTFTs, from the request's arrival at the replica)."""

    ls_served: int
    ls_met_at_engine: int
    ls_max_engine_ttft_s: float | None


@dataclass(frozen=True)
class RouterRun:
    """One routing mode at one seed."""

    mode: str
    seed: int
    skewed_replica: str
    skew: SkewCounts
    replicas: dict[str, ReplicaSeen]
    ls_requests: int
    ls_failed: int
    ls_attainment: float | None
    """A request without a first token counts as a miss."""
    ls_ttft_p50_s: float | None
    """Percentiles: of the requests answered."""
    ls_ttft_p99_s: float | None
    be_requests: int
    be_failed: int
    be_tokens_per_s: float
    metrics: RunMetrics


@dataclass(frozen=True)
class MeanRange:
    """A figure over seeds: mean, min and max."""

    mean: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float | None]) -> MeanRange | None:
        """Over the seeds with a value; None when none has one."""
        spread = Spread.of(values)
        if spread is None:
            return None
        return cls(statistics.fmean(v for v in values if v is not None), spread.low, spread.high)


@dataclass(frozen=True)
class ModeSummary:
    """One mode over its seeds."""

    ls_attainment: MeanRange | None
    ls_ttft_p50_s: MeanRange | None
    ls_ttft_p99_s: MeanRange | None
    be_tokens_per_s: MeanRange | None
    seeds: tuple[int, ...]

    @classmethod
    def of(cls, runs: list[RouterRun]) -> ModeSummary:
        """The summary of one mode's runs."""
        figures = {f.name: MeanRange.of([getattr(r, f.name) for r in runs]) for f in fields(cls) if f.name != "seeds"}
        return cls(**figures, seeds=tuple(sorted(r.seed for r in runs)))


@dataclass(frozen=True)
class Verdict:
    """Per seed with both modes: the PriorityRouter's gain over power of two, and whether it met the target."""

    seed: int
    attainment_gain: float
    p99_change_s: float | None
    be_change: float | None
    met: bool
    """An LS request the PriorityRouter left unanswered misses the target too."""

    @classmethod
    def of(cls, seed: int, p: RouterRun, b: RouterRun) -> Verdict:
        """PriorityRouter run `p` against power-of-two run `b` of one seed."""
        gain = (p.ls_attainment or 0.0) - (b.ls_attainment or 0.0)
        p99_change = None if p.ls_ttft_p99_s is None or b.ls_ttft_p99_s is None else p.ls_ttft_p99_s - b.ls_ttft_p99_s
        be_change = p.be_tokens_per_s / b.be_tokens_per_s - 1 if b.be_tokens_per_s else None
        met = (
            gain >= MIN_ATTAINMENT_GAIN
            and p99_change is not None
            and p99_change < 0
            and be_change is not None
            and be_change >= -MAX_BE_LOSS
            and p.ls_failed == 0
        )
        return cls(seed, gain, p99_change, be_change, met)


def _parse() -> tuple[argparse.Namespace, RouterSettings]:
    parser = script_parser(__doc__)
    parser.add_argument("--model", default="bench", help="engine model: tiny, bench or a checkpoint directory")
    parser.add_argument("--rate", type=float, default=1.2, help="HTTP requests per second")
    parser.add_argument("--ls-requests", type=count, default=100, help="LS requests per run (arrivals until then)")
    parser.add_argument("--ls-share", type=float, default=0.4)
    parser.add_argument("--slo-s", type=float, default=1.0, help="LS TTFT SLO")
    parser.add_argument("--skew-prompt", type=count, default=3500, help="tokens of each long BE prompt")
    parser.add_argument("--skew-concurrency", type=count, default=1, help="long BE prompts in flight on one replica")
    parser.add_argument("--skew-max-tokens", type=count, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--keep", action="store_true", help="keep the file's other runs (same settings only)")
    add_out_argument(parser, "router_bench.json")
    args = parser.parse_args()
    names = [f.name for f in fields(RouterSettings) if f.name != "replicas"]
    return args, RouterSettings(**{name: getattr(args, name) for name in names})


def _replica_ids() -> list[str]:
    """The engine replicas' ids, as request routers name them (the tail of Serve's actor names)."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"]
    return sorted(n.rsplit("#", 1)[1] for n in names if f"{APP}#EngineReplica#" in n)


async def _skew(pinned: str, settings: RouterSettings, seed: int, stop: asyncio.Event) -> SkewCounts:
    """Keep `skew_concurrency` long BE prompts in flight on the pinned replica alone until `stop`: closed
    loop, so the skew is the same amount of work however fast the machine is."""
    handle = serve.get_deployment_handle("EngineReplica", app_name=APP).options(stream=True)
    rng = random.Random(seed)
    completed = failed = 0
    hint = PlacementHint(PriorityClass.BEST_EFFORT, (pinned,), admitted=True)
    params = SamplingParams(max_tokens=settings.skew_max_tokens, temperature=0.0, ignore_eos=True)

    async def loop(worker: int) -> None:
        nonlocal completed, failed
        n = 0
        while not stop.is_set():
            tokens = tuple(rng.randrange(3, 500) for _ in range(settings.skew_prompt))
            request = GenerateRequest(f"skew-{worker}-{n}", PriorityClass.BEST_EFFORT, Prompt(token_ids=tokens), params)
            stream = handle.generate.remote(request, placement=hint)
            try:
                async for item in stream:  # type: ignore[union-attr]
                    if isinstance(item, StreamError):
                        failed += 1
                        break
                else:
                    completed += 1
            finally:
                stream.cancel()  # type: ignore[union-attr]
            n += 1

    workers = [asyncio.create_task(loop(w)) for w in range(settings.skew_concurrency)]
    await stop.wait()
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    return SkewCounts(completed, failed)


async def _per_replica(replica_ids: list[str], slo_s: float) -> dict[str, ReplicaSeen]:
    """How many LS requests each replica served and how many met the SLO there."""
    handle = serve.get_deployment_handle("EngineReplica", app_name=APP)
    out = {}
    for rid in replica_ids:
        hint = PlacementHint(PriorityClass.LATENCY_SENSITIVE, (rid,), admitted=True)
        stats: EngineStats = await handle.stats.remote(placement=hint)  # type: ignore[misc]
        ttfts = stats.classes[PriorityClass.LATENCY_SENSITIVE.label].recent_ttft_s
        out[rid] = ReplicaSeen(len(ttfts), sum(t <= slo_s for t in ttfts), max(ttfts, default=None))
    return out


async def _run(base: str, settings: RouterSettings, mode: str, seed: int) -> RouterRun:
    workload = poisson_workload(
        WorkloadSettings(
            ls_share=settings.ls_share,
            prompt_len=LengthDistribution(mean=220, cap=1024, sigma=1.0),
            max_tokens=LengthDistribution(mean=32, cap=64, sigma=0.5),
            ls_requests=settings.ls_requests,
            seed=seed,
        ),
        settings.rate,
    )
    http = HttpSettings(endpoint=base, model="bench", label="endpoint", extra_body={"ignore_eos": True})
    replica_ids = _replica_ids()
    pinned = replica_ids[0]
    async with HttpRunner(http) as runner:
        await runner.warmup(requests=4)
        stop = asyncio.Event()
        skew = asyncio.create_task(_skew(pinned, settings, seed, stop))
        await asyncio.sleep(_SKEW_LEAD_S)
        try:
            records = await runner.run(workload, drain_timeout_s=300.0)
        finally:
            stop.set()
            skew_counts = await skew
    m = summarize(records, settings.slo_s)
    be_tokens = sum(r.output_tokens for r in records if r.completed and r.priority == "be")
    ls_ttft = m.ls.ttft
    return RouterRun(
        mode=mode,
        seed=seed,
        skewed_replica=pinned,
        skew=skew_counts,
        replicas=await _per_replica(replica_ids, settings.slo_s),
        ls_requests=m.ls.requests,
        ls_failed=m.ls.failed,
        ls_attainment=m.ls.slo_attainment,
        ls_ttft_p50_s=None if ls_ttft is None else ls_ttft.p50,
        ls_ttft_p99_s=None if ls_ttft is None else ls_ttft.p99,
        be_requests=m.be.requests,
        be_failed=m.be.failed,
        be_tokens_per_s=be_tokens / m.duration_s,
        metrics=m,
    )


def _verdicts(runs: list[RouterRun]) -> list[Verdict]:
    by = {(r.seed, r.mode): r for r in runs}
    return [
        Verdict.of(seed, by[(seed, "priority")], by[(seed, "power_of_two")])
        for seed in sorted({r.seed for r in runs})
        if (seed, "priority") in by and (seed, "power_of_two") in by
    ]


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _span(v: MeanRange | None, spec: str) -> str:
    return "- [-, -]" if v is None else f"{_f(v.mean, spec)} [{_f(v.min, spec)}, {_f(v.max, spec)}]"


def _print(runs: list[RouterRun], by_mode: dict[str, ModeSummary], verdicts: list[Verdict]) -> None:
    head = f"{'seed':>4}  {'mode':<13}{'LS n':>5}{'lost':>5}{'attain':>9}{'p50 s':>8}{'p99 s':>8}{'BE tok/s':>10}"
    print(head + f"{'LS on skewed (met)':>20}")
    for r in sorted(runs, key=lambda r: (r.seed, r.mode)):
        skewed = r.replicas[r.skewed_replica]
        print(
            f"{r.seed:>4}  {r.mode:<13}{r.ls_requests:>5}{r.ls_failed:>5}{_f(r.ls_attainment, '.1%'):>9}"
            f"{_f(r.ls_ttft_p50_s, '.3f'):>8}{_f(r.ls_ttft_p99_s, '.3f'):>8}{_f(r.be_tokens_per_s, '.2f'):>10}"
            f"{skewed.ls_served:>14} ({skewed.ls_met_at_engine})"
        )
    for mode, s in by_mode.items():
        parts = [
            f"attainment {_span(s.ls_attainment, '.1%')}",
            f"p99 s {_span(s.ls_ttft_p99_s, '.3f')}",
            f"BE tok/s {_span(s.be_tokens_per_s, '.2f')}",
        ]
        print(f"{mode:<13} mean [min, max] over seeds {list(s.seeds)}: " + "; ".join(parts))
    for v in verdicts:
        print(
            f"seed {v.seed}: attainment {v.attainment_gain * 100:+.1f} points, p99 {_f(v.p99_change_s, '+.3f')} s,"
            f" BE {_f(v.be_change, '+.1%')}: {'target met' if v.met else 'target missed'}"
        )


def _write(path: Path, settings: RouterSettings, runs: list[RouterRun]) -> tuple[dict[str, ModeSummary], list[Verdict]]:
    by_mode = {mode: ModeSummary.of(mine) for mode in MODES if (mine := [r for r in runs if r.mode == mode])}
    verdicts = _verdicts(runs)
    write_result(path, {"settings": settings, "by_mode": by_mode, "per_seed": verdicts, "runs": runs})
    return by_mode, verdicts


def _kept(args: argparse.Namespace, settings: RouterSettings) -> list[RouterRun]:
    """With --keep, the file's runs other than those about to be made again (same settings only)."""
    if not args.keep or not args.out.exists():
        return []
    previous = read_json(args.out)
    if from_dict(RouterSettings, previous["settings"]) != settings:
        raise SystemExit(f"--keep: {args.out} holds runs with other settings: {previous['settings']}")
    redo = {(s, m) for s in args.seeds for m in args.modes}
    runs = [from_dict(RouterRun, r) for r in previous["runs"]]
    return [r for r in runs if (r.seed, r.mode) not in redo]


def main() -> None:
    """Deploy each routing mode in turn, seed by seed, under the same skewed load and workload; the file is
    rewritten after every run, so an interrupted benchmark keeps what it measured."""
    args, settings = _parse()
    runs = _kept(args, settings)
    with local_cluster() as base:
        for seed in args.seeds:
            for mode in args.modes:
                app_args = {
                    "model_name": "bench",
                    "replicas": settings.replicas,
                    "num_cpus": 1,
                    "routing": mode,
                    "ls_ttft_slo_s": settings.slo_s,
                    "engine": {"model": settings.model, "device": "cpu", "kv_cache_tokens": 32768},
                }
                deploy(base, app_args, name=APP)
                run = asyncio.run(_run(base, settings, mode, seed))
                serve.delete(APP)
                runs.append(run)
                _write(args.out, settings, runs)
                print(f"seed {seed} {mode}: attainment {_f(run.ls_attainment, '.1%')}", flush=True)
    _print(runs, *_write(args.out, settings, runs))


if __name__ == "__main__":
    main()
