"""The command-line pieces the side benchmarks share (engine_bench, host_overhead, decode_profile, router_bench,
soak, make_checkpoint): where results go, the engine's model, device and dtype, positive counts."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.checks import positive

RESULTS_DIR = Path("benchmarks") / "results"
"""Where every benchmark writes unless told otherwise."""


def script_parser(doc: str | None) -> argparse.ArgumentParser:
    """A side benchmark's parser, its module docstring as the description (kept as written)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def count(text: str) -> int:
    """An argparse type: a positive integer, or a clear usage error."""
    try:
        value = int(text)
        positive("the value", value, ValueError, integer=True)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    return value


def add_engine_arguments(
    parser: argparse.ArgumentParser, model: str = "bench", device: str = "cpu", dtype: str = "float32"
) -> None:
    """--model, --device and --dtype of the engine (and of transformers' twin where a benchmark loads one)."""
    parser.add_argument("--model", default=model, help="a built-in preset (tiny, bench) or a checkpoint directory")
    parser.add_argument("--device", default=device, help="cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default=dtype, help="float32, bfloat16, float16, float64")


def add_out_argument(parser: argparse.ArgumentParser, file_name: str) -> None:
    """--out, the results file, by default `RESULTS_DIR/file_name`."""
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / file_name, help="the JSON results file to write")
