"""Sampling parameters and priority classes: every invalid value gets a typed error naming the field."""

from __future__ import annotations

import pytest

from qllm_core import InvalidRequestError, PriorityClass, SamplingParams
from qllm_core.request import Request, RequestState


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"stop": [3]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"ignore_eos": "no"}, "ignore_eos"),
    ],
)
def test_invalid_sampling_params(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert info.value.param == param
    assert param in str(info.value)


def test_lists_are_frozen_and_greedy_is_detected() -> None:
    p = SamplingParams(stop=["a", "b"], stop_token_ids=[1], temperature=0.0)
    assert p.stop == ("a", "b") and p.stop_token_ids == (1,) and p.greedy
    assert SamplingParams(temperature=0.7, top_k=1).greedy
    assert not SamplingParams(temperature=0.7).greedy


@pytest.mark.parametrize(
    ("text", "cls"),
    [
        ("ls", PriorityClass.LATENCY_SENSITIVE),
        ("Latency_Sensitive", PriorityClass.LATENCY_SENSITIVE),
        ("be", PriorityClass.BEST_EFFORT),
        (" best_effort ", PriorityClass.BEST_EFFORT),
    ],
)
def test_priority_aliases(text: str, cls: PriorityClass) -> None:
    assert PriorityClass.parse(text) is cls


def test_unknown_priority_names_the_choices() -> None:
    with pytest.raises(InvalidRequestError, match="'latency_sensitive' \\('ls'\\) or 'best_effort' \\('be'\\)"):
        PriorityClass.parse("urgent")


def test_state_machine_rejects_illegal_transitions() -> None:
    r = Request("r", [1, 2], SamplingParams(), PriorityClass.BEST_EFFORT, arrival=0.0)
    r.move_to(RequestState.RUNNING)
    r.move_to(RequestState.READY)
    r.move_to(RequestState.FINISHED)
    with pytest.raises(RuntimeError, match="illegal transition finished -> running"):
        r.move_to(RequestState.RUNNING)
