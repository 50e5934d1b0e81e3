"""`qllm-bench`: sweep arrival rates x scheduling policies and write JSON, Markdown and PNG results.

Examples:

    qllm-bench --model tiny --policies fcfs,qllm:layer,qllm:expert --rates 2,4,8 --num-requests 100
    qllm-bench --endpoint http://127.0.0.1:8000 --model bench --rates 1,2 --duration 60
    qllm-bench --trace requests.jsonl --policies fcfs,qllm --out results/trace-run
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.runners import BenchmarkError
from benchmarks.sweep import SweepSettings, parse_policies, parse_rates, run_sweep
from benchmarks.workload import LengthDistribution, WorkloadSettings

DEFAULT_OUT_ROOT = Path("benchmarks") / "results"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every option says what it does and its default."""
    p = argparse.ArgumentParser(
        prog="qllm-bench",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
        epilog="Each run is bounded: a fixed request count (or duration with --max-requests), and "
        "--drain-timeout-s after the last arrival. Same --seed, same requests at every rate and policy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    target = p.add_argument_group("target")
    target.add_argument(
        "--model",
        default="tiny",
        help="in process: 'tiny', 'bench' or a checkpoint directory; with --endpoint: the 'model' field sent",
    )
    target.add_argument(
        "--policies",
        default="fcfs,qllm:layer",
        help="comma-separated policy[:granularity] run in process: fcfs, priority, qllm, e.g. "
        "fcfs,priority,qllm:layer,qllm:expert (fcfs/priority default to iteration, qllm to layer)",
    )
    target.add_argument(
        "--endpoint",
        default=None,
        help="benchmark this OpenAI-compatible server (POST <URL>/v1/completions, streaming) instead of "
        "in-process engines; --policies is then not used",
    )
    target.add_argument("--endpoint-label", default="endpoint", help="name of the endpoint in reports and plots")
    target.add_argument(
        "--extra-body",
        default="{}",
        help="JSON object merged into every HTTP request body, e.g. '{\"ignore_eos\": true}'",
    )
    target.add_argument("--device", default=None, help="in-process engine device: cpu, cuda, cuda:N or auto")
    target.add_argument("--dtype", default=None, help="in-process engine dtype: auto, float32, bfloat16, ...")
    target.add_argument("--max-batch-size", type=int, default=None, help="in-process engine: most sequences a pass")
    target.add_argument(
        "--engine-config",
        default="{}",
        help="JSON object of further EngineConfig fields, e.g. '{\"be_max_wait_s\": 2.0}'",
    )

    load = p.add_argument_group("load")
    load.add_argument(
        "--rates",
        default=None,
        help="comma-separated arrival rates in requests/s (default 1,2,4,8; with --trace: the trace's own timing, "
        "or the trace rescaled to each rate given)",
    )
    size = load.add_mutually_exclusive_group()
    size.add_argument("--num-requests", type=int, default=None, help="requests per run (default 50)")
    size.add_argument("--duration", type=float, default=None, help="seconds of arrivals per run (instead of a count)")
    load.add_argument("--max-requests", type=int, default=2000, help="hard cap on requests per run")
    load.add_argument("--ls-share", type=float, default=0.2, help="fraction of requests that are latency-sensitive")
    load.add_argument("--seed", type=int, default=0, help="seed of arrivals, classes, lengths and prompt tokens")
    load.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="replay a JSONL trace (arrival_s, priority ls/be, prompt or prompt_len, max_tokens) instead of "
        "Poisson arrivals",
    )
    load.add_argument("--prompt-len-mean", type=float, default=220.0, help="mean prompt length in tokens")
    load.add_argument("--prompt-len-cap", type=int, default=1024, help="longest prompt in tokens")
    load.add_argument("--prompt-len-sigma", type=float, default=1.0, help="spread of log prompt lengths (lognormal)")
    load.add_argument("--max-tokens-mean", type=float, default=50.0, help="mean output length (max_tokens)")
    load.add_argument("--max-tokens-cap", type=int, default=128, help="largest max_tokens of any request")
    load.add_argument("--max-tokens-sigma", type=float, default=0.5, help="spread of log output lengths (lognormal)")
    load.add_argument("--token-range", default="3,500", help="prompt token ids are drawn from [LOW,HIGH)")

    measure = p.add_argument_group("measurement")
    measure.add_argument(
        "--slo-ms",
        type=float,
        default=None,
        help="LS TTFT SLO in ms (default: --slo-factor x one decode iteration, measured at the start)",
    )
    measure.add_argument("--slo-factor", type=float, default=10.0, help="SLO = this x a measured decode iteration")
    measure.add_argument(
        "--calibration-batch", type=int, default=8, help="requests decoded together when timing a decode iteration"
    )
    measure.add_argument("--calibration-prompt-len", type=int, default=64, help="prompt length of those requests")
    measure.add_argument("--calibration-tokens", type=int, default=16, help="tokens each of those requests decodes")
    measure.add_argument("--warmup-requests", type=int, default=2, help="small requests sent to each target first")
    measure.add_argument(
        "--drain-timeout-s",
        type=float,
        default=120.0,
        help="after a run's last arrival, wait this long at most; unfinished requests count as failed",
    )

    output = p.add_argument_group("output")
    output.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"directory for results.json, results.md and the PNGs (default {DEFAULT_OUT_ROOT}/<UTC time>)",
    )
    output.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")
    output.add_argument("--quiet", action="store_true", help="do not print the Markdown table at the end")
    return p


def _json_object(parser: argparse.ArgumentParser, flag: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        parser.error(f"{flag} is not valid JSON: {exc.msg}")
    if not isinstance(value, dict):
        parser.error(f"{flag} must be a JSON object")
    return value


def settings_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> SweepSettings:
    """Turn parsed arguments into validated settings (bad values exit with the settings' own message)."""
    overrides = _json_object(parser, "--engine-config", args.engine_config)
    for key in ("device", "dtype", "max_batch_size"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    try:
        low, high = (int(x) for x in args.token_range.split(","))
    except ValueError:
        parser.error(f"--token-range must be two integers LOW,HIGH, got {args.token_range!r}")
    try:
        workload = WorkloadSettings(
            ls_share=args.ls_share,
            prompt_len=LengthDistribution(args.prompt_len_mean, args.prompt_len_cap, args.prompt_len_sigma),
            max_tokens=LengthDistribution(args.max_tokens_mean, args.max_tokens_cap, args.max_tokens_sigma),
            num_requests=args.num_requests,
            duration_s=args.duration,
            max_requests=args.max_requests,
            seed=args.seed,
            token_low=low,
            token_high=high,
        )
        return SweepSettings(
            model=args.model,
            policies=parse_policies(args.policies),
            rates=None if args.rates is None else parse_rates(args.rates),
            workload=workload,
            trace=args.trace,
            endpoint=args.endpoint,
            endpoint_label=args.endpoint_label,
            extra_body=_json_object(parser, "--extra-body", args.extra_body),
            engine_overrides=overrides,
            slo_s=None if args.slo_ms is None else args.slo_ms / 1000.0,
            slo_factor=args.slo_factor,
            calibration_batch=args.calibration_batch,
            calibration_prompt_len=args.calibration_prompt_len,
            calibration_tokens=args.calibration_tokens,
            warmup_requests=args.warmup_requests,
            drain_timeout_s=args.drain_timeout_s,
            progress=not args.no_progress,
        )
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `qllm-bench` console script; returns the exit status."""
    from benchmarks.report import MARKDOWN_NAME, write_outputs

    parser = build_parser()
    args = parser.parse_args(argv)
    settings = settings_from_args(parser, args)
    out = args.out
    if out is None:
        out = DEFAULT_OUT_ROOT / datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    try:
        result = run_sweep(settings)
    except BenchmarkError as exc:
        print(f"qllm-bench: {exc}", file=sys.stderr)
        return 1
    paths = write_outputs(result, out)
    if not args.quiet:
        print((out / MARKDOWN_NAME).read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
