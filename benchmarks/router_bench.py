"""Router benchmark (not a test): the PriorityRouter vs Ray Serve's default power-of-two-choices routing.

Two engine replicas, the same seeded mixed LS/BE Poisson workload sent to each routing mode in turn, in
one run on one local Ray cluster: LS TTFT p50/p99, LS SLO attainment, BE throughput.

Run: `python -m benchmarks.router_bench --out benchmarks/results/router_bench.json`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ray import serve

from benchmarks.local_app import deploy, local_cluster
from benchmarks.metrics import summarize
from benchmarks.runners import HttpRunner, HttpSettings
from benchmarks.workload import LengthDistribution, WorkloadSettings, poisson_workload


async def _run(base: str, model: str, workload: Any, slo_s: float) -> dict[str, Any]:
    settings = HttpSettings(endpoint=base, model=model, label="endpoint", extra_body={"ignore_eos": True})
    async with HttpRunner(settings) as runner:
        await runner.warmup(requests=4)
        records = await runner.run(workload, drain_timeout_s=300.0)
    metrics = summarize(records, slo_s)
    be_tokens = sum(r.output_tokens for r in records if r.completed and r.priority == "be")
    return {"metrics": asdict(metrics), "be_output_tokens_per_s": be_tokens / metrics.duration_s}


def main() -> None:
    """Deploy each routing mode in turn and send it the same workload."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="bench", help="engine model: tiny, bench or a checkpoint directory")
    parser.add_argument("--rate", type=float, default=3.0, help="requests per second")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--ls-share", type=float, default=0.2)
    parser.add_argument("--slo-s", type=float, default=1.0, help="LS TTFT SLO")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/router_bench.json"))
    args = parser.parse_args()

    workload = poisson_workload(
        WorkloadSettings(
            ls_share=args.ls_share,
            prompt_len=LengthDistribution(mean=220, cap=1024, sigma=1.0),
            max_tokens=LengthDistribution(mean=32, cap=64, sigma=0.5),
            num_requests=args.requests,
            seed=args.seed,
        ),
        args.rate,
    )
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "model": args.model,
        "rate": args.rate,
        "requests": args.requests,
        "ls_share": args.ls_share,
        "slo_s": args.slo_s,
        "replicas": 2,
    }
    with local_cluster() as base:
        for routing in ("power_of_two", "priority"):
            app_args = {
                "model_name": "bench",
                "replicas": 2,
                "num_cpus": 1,
                "routing": routing,
                "ls_ttft_slo_s": args.slo_s,
                "engine": {"model": args.model, "device": "cpu", "kv_cache_tokens": 32768},
            }
            deploy(base, app_args)
            results[routing] = asyncio.run(_run(base, "bench", workload, args.slo_s))
            ls = results[routing]["metrics"]["ls"]
            summary = {
                "ttft_p50_s": ls["ttft"]["p50"],
                "ttft_p99_s": ls["ttft"]["p99"],
                "slo_attainment": ls["slo_attainment"],
            }
            results[routing]["ls_summary"] = summary
            print(
                routing, json.dumps(summary), f"be_tok/s={results[routing]['be_output_tokens_per_s']:.1f}", flush=True
            )
            serve.delete("qllm")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
