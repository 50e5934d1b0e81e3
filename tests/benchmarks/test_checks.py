"""The one home of the benchmarks' number checks, and the side benchmarks' shared options built on it."""

from __future__ import annotations

import argparse
import math

import pytest

from benchmarks.checks import positive
from benchmarks.script_args import RESULTS_DIR, add_engine_arguments, add_out_argument, count, script_parser


class _Error(ValueError):
    pass


@pytest.mark.parametrize("value", [0, -1, math.nan, math.inf, True, "3", None])
def test_positive_refuses_what_is_not_a_finite_positive_number_with_the_callers_error(value: object) -> None:
    with pytest.raises(_Error, match=r"rate must be a positive number of requests per second, got"):
        positive("rate", value, _Error, unit="requests per second")


def test_positive_takes_floats_unless_an_integer_is_asked_for() -> None:
    positive("slo_s", 0.5, _Error)
    positive("trials", 3, _Error, integer=True)
    with pytest.raises(_Error, match=r"trials must be a positive integer, got 2\.5"):
        positive("trials", 2.5, _Error, integer=True)


def test_side_benchmarks_share_their_engine_and_out_options_and_refuse_a_zero_count() -> None:
    parser = script_parser("a benchmark")
    add_engine_arguments(parser, model="tiny")
    add_out_argument(parser, "x.json")
    parser.add_argument("--rounds", type=count, default=5)
    args = parser.parse_args(["--device", "cuda:1"])
    assert (args.model, args.device, args.dtype, args.out) == ("tiny", "cuda:1", "float32", RESULTS_DIR / "x.json")
    with pytest.raises(argparse.ArgumentTypeError, match="positive integer, got '0'"):
        count("0")
    assert count("7") == 7
