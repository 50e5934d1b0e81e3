"""Stop checks cost the same per token however long the output grows, and still find every stop string."""

from __future__ import annotations

import pytest

import qllm_core.output_processor as op
from qllm_core.output_processor import OutputProcessor, held_prefix, stop_index, streamable
from qllm_core.params import SamplingParams
from qllm_core.request import FinishReason, PriorityClass, Request


class CharDetokenizer:
    """One character per token id (chr), windowed like the real one: append-only text."""

    def text(self, request_id: str, token_ids: list[int]) -> str:
        return "".join(map(chr, token_ids))

    def full(self, token_ids: list[int]) -> str:
        return "".join(map(chr, token_ids))

    def forget(self, request_id: str) -> None:
        pass


def _request(stop: tuple[str, ...], max_tokens: int = 1000) -> Request:
    params = SamplingParams(max_tokens=max_tokens, stop=list(stop), ignore_eos=True)
    return Request("r", [1, 2], params, PriorityClass.LATENCY_SENSITIVE, arrival=0.0)


def _feed(processor: OutputProcessor, request: Request, text: str) -> FinishReason | None:
    reason = None
    for ch in text:
        request.output_token_ids.append(ord(ch))
        reason = processor.stop_reason(request, ord(ch))
        if reason is not None:
            break
    return reason


def test_a_stop_string_spread_over_several_tokens_ends_the_request() -> None:
    processor = OutputProcessor(CharDetokenizer(), frozenset(), 100_000)  # type: ignore[arg-type]
    request = _request(("STOP", "xyz"))
    assert _feed(processor, request, "hello S-T-O-P no, now STOP and more") is FinishReason.STOP
    assert "".join(map(chr, request.output_token_ids)).endswith("now STOP")


def test_each_token_searches_only_the_text_a_new_match_could_end_in(monkeypatch: pytest.MonkeyPatch) -> None:
    starts: list[int] = []

    def recording(text: str, stops: tuple[str, ...], start: int = 0) -> int:
        starts.append(start)
        return stop_index(text, stops, start)

    monkeypatch.setattr(op, "stop_index", recording)
    processor = OutputProcessor(CharDetokenizer(), frozenset(), 100_000)  # type: ignore[arg-type]
    request = _request(("abcd",))
    assert _feed(processor, request, "x" * 500) is None
    # After token n (text of n characters) the next search starts 3 characters (the stop's length - 1) back.
    assert starts == [max(0, n - 3) for n in range(500)]


def test_length_ends_a_request_at_max_tokens() -> None:
    processor = OutputProcessor(CharDetokenizer(), frozenset(), 100_000)  # type: ignore[arg-type]
    request = _request((), max_tokens=5)
    assert _feed(processor, request, "abcdefgh") is FinishReason.LENGTH
    assert len(request.output_token_ids) == 5


def test_streamed_text_holds_back_what_may_start_a_stop_string() -> None:
    assert streamable("hello wor", ("world",)) == "hello "
    assert streamable("hello", ("xyz",)) == "hello"
    assert held_prefix("abcab", "abc") == 2
    assert held_prefix("abc", "abc") == 0, "a whole stop string is a match, not a held prefix"
