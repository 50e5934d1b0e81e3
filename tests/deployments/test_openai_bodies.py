"""The OpenAI surface without a server: what bodies become, what is refused, how answers and chunks are
written, and how a replica runs a call's choices side by side."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator

import pytest

from deployments.choices import Choices
from deployments.fan_out import merged
from deployments.openai_api import ApiError, parse_body
from deployments.openai_logprobs import CompletionLogprobs, chat_logprobs
from deployments.openai_requests import MAX_CHOICES, ChatRequest, CompletionRequest
from deployments.protocol import ChatTurn, LogprobEntry, Prompt, ScoredToken, StreamItem, TokenText
from qllm_core import FinishReason, PriorityClass, SamplingParams
from qllm_core.params import MAX_LOGPROBS, PENALTY_RANGE, REPETITION_PENALTY_MAX


def _chat(**fields: object) -> ChatRequest:
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_body(json.dumps(body).encode(), ChatRequest)


def _completion(**fields: object) -> CompletionRequest:
    return parse_body(json.dumps({"prompt": "hi", **fields}).encode(), CompletionRequest)


def _refusal(raw: dict[str, object]) -> ApiError:
    model = ChatRequest if "messages" in raw else CompletionRequest
    with pytest.raises(ApiError) as info:
        parse_body(json.dumps(raw).encode(), model).sampling()
    return info.value


# ---- what bodies become ----------------------------------------------------------------------------------


def test_text_parts_are_joined_with_newlines_and_a_null_assistant_turn_is_empty() -> None:
    body = _chat(
        messages=[
            {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
            {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
            {"role": "assistant", "content": None, "tool_calls": [], "refusal": None},
            {"role": "developer", "content": "plain", "name": "dev"},
        ]
    )
    (prompt,) = body.prompts()
    assert prompt.messages == (
        ChatTurn("system", "be brief"),
        ChatTurn("user", "one\ntwo"),
        ChatTurn("assistant", ""),
        ChatTurn("developer", "plain", "dev"),
    )


def test_fields_left_out_take_the_engine_defaults() -> None:
    defaults = SamplingParams()
    params = _chat().sampling()
    assert (params.temperature, params.top_p, params.top_k) == (defaults.temperature, defaults.top_p, defaults.top_k)
    assert params.repetition_penalty == defaults.repetition_penalty and params.logprobs is None
    assert params.max_tokens == ChatRequest.default_max_tokens
    assert _completion().sampling().max_tokens == CompletionRequest.default_max_tokens


def test_penalties_and_log_probability_counts_reach_the_sampling_params() -> None:
    params = _completion(
        presence_penalty=0.5, frequency_penalty=-1.0, repetition_penalty=1.3, logprobs=3, echo=True
    ).sampling()
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -1.0, 1.3)
    assert (params.logprobs, params.prompt_logprobs) == (3, 3)
    assert _completion(logprobs=3).sampling().prompt_logprobs is None  # prompt tokens are scored only with echo
    chat = _chat(logprobs=True, top_logprobs=4).sampling()
    assert (chat.logprobs, chat.prompt_logprobs) == (4, None)
    assert _chat(logprobs=True).sampling().logprobs == 0


def test_a_list_of_prompts_becomes_one_prompt_each_in_order() -> None:
    assert _completion(prompt=["a", "b"]).prompts() == (Prompt(text="a"), Prompt(text="b"))
    assert _completion(prompt=[[1, 2], [3]]).prompts() == (Prompt(token_ids=(1, 2)), Prompt(token_ids=(3,)))
    assert _completion(prompt=[1, 2]).prompts() == (Prompt(token_ids=(1, 2)),)
    request = _completion(prompt=["a", "b", "c"], n=2, echo=True).to_request("r", PriorityClass.BEST_EFFORT, None)
    assert request.prompts == (Prompt(text="a"), Prompt(text="b"), Prompt(text="c"))
    assert request.choices == 6 and request.echo


def test_max_completion_tokens_wins_and_is_named_when_refused() -> None:
    assert _chat(max_tokens=4, max_completion_tokens=9).sampling().max_tokens == 9
    assert _refusal({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}).param == (
        "max_completion_tokens"
    )


def test_stream_usage_options_follow_vllm() -> None:
    both = _completion(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert both.include_usage and both.continuous_usage
    alone = _completion(stream=True, stream_options={"continuous_usage_stats": True})
    assert not alone.include_usage and not alone.continuous_usage


# ---- what is refused -------------------------------------------------------------------------------------

_USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0].type",
        ),
        (
            {"messages": [_USER, {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            "messages[1].content[0].type",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "x": 1}]}]},
            "messages[0].content[0].x",
        ),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"messages": [{"role": "tool", "content": "r", "tool_call_id": "1"}]}, "messages[0].role"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls"),
        ({"messages": [_USER], "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"messages": [_USER], "tool_choice": "required"}, "tool_choice"),
        ({"messages": [_USER], "functions": [{"name": "f"}]}, "functions"),
        ({"messages": [_USER], "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [_USER], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [_USER], "logprobs": True, "top_logprobs": MAX_LOGPROBS + 1}, "top_logprobs"),
        ({"messages": [_USER], "logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"prompt": "x", "logprobs": MAX_LOGPROBS + 1}, "logprobs"),
        ({"prompt": "x", "logprobs": -1}, "logprobs"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": ["x"] * 5, "n": MAX_CHOICES // 4}, "n"),
        ({"prompt": "x", "n": 2, "best_of": 3}, "best_of"),
        ({"prompt": ["x", ""]}, "prompt"),
        ({"prompt": [[1], []]}, "prompt"),
        ({"prompt": ["x", 1]}, "prompt"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "x", "stream": True, "stream_options": {"include_usages": True}}, "stream_options"),
        ({"prompt": "x", "presence_penalty": PENALTY_RANGE[1] + 0.5}, "presence_penalty"),
        ({"prompt": "x", "frequency_penalty": PENALTY_RANGE[0] - 0.5}, "frequency_penalty"),
        ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "x", "repetition_penalty": REPETITION_PENALTY_MAX + 1}, "repetition_penalty"),
        ({"prompt": "x", "seed": -1}, "seed"),
    ],
)
def test_what_cannot_be_served_is_a_400_naming_the_field(raw: dict[str, object], param: str) -> None:
    error = _refusal(raw)
    assert error.status == 400 and error.param == param and error.message


def test_fields_that_ask_for_nothing_unsupported_are_accepted() -> None:
    body = _chat(
        tools=[], tool_choice="none", response_format={"type": "text"}, logit_bias={}, parallel_tool_calls=True
    )
    assert body.sampling().max_tokens == ChatRequest.default_max_tokens
    assert _completion(n=3, best_of=3).n == 3


# ---- how answers are written -----------------------------------------------------------------------------


def _tok(text: str) -> TokenText:
    return TokenText(text, text.encode())


def _entry(text: str, logprob: float | None, *top: tuple[str, float]) -> LogprobEntry:
    return LogprobEntry(_tok(text), logprob, tuple(ScoredToken(_tok(t), v) for t, v in top))


def test_completion_text_offsets_go_on_across_chunks_and_the_first_prompt_token_has_none() -> None:
    logprobs = CompletionLogprobs()
    first = logprobs.format([_entry("the", None), _entry(" cat", -1.5, (" cat", -1.5), (" dog", -2.0))])
    second = logprobs.format([_entry(" sat", -math.inf, (" sat", -math.inf))])
    assert first == {
        "tokens": ["the", " cat"],
        "token_logprobs": [None, -1.5],
        "top_logprobs": [None, {" cat": -1.5, " dog": -2.0}],
        "text_offset": [0, 3],
    }
    # JSON has no -Infinity: a token with no probability shows vLLM's stand-in
    assert second["text_offset"] == [7] and second["token_logprobs"] == [-9999.0]
    json.dumps(second, allow_nan=False)


def test_chat_logprobs_carry_each_tokens_bytes_and_alternatives() -> None:
    split = TokenText("\ufffd", b"\xc3")
    out = chat_logprobs([LogprobEntry(split, -0.25, (ScoredToken(split, -0.25), ScoredToken(_tok("a"), -3.0)))])
    assert out == {
        "content": [
            {
                "token": "\ufffd",
                "logprob": -0.25,
                "bytes": [0xC3],
                "top_logprobs": [
                    {"token": "\ufffd", "logprob": -0.25, "bytes": [0xC3]},
                    {"token": "a", "logprob": -3.0, "bytes": [97]},
                ],
            }
        ],
        "refusal": None,
    }


def _item(index: int, text: str, tokens: int, finished: bool = False, prompt_tokens: int = 5) -> StreamItem:
    reason = FinishReason.LENGTH if finished else None
    return StreamItem(text, (1,), tokens, prompt_tokens, finished, reason, 0.1, "r", text if finished else "", index)


def test_usage_counts_each_prompt_once_and_every_choice_output() -> None:
    choices = Choices(count=4, n=2, keep=True)
    for index, prompt_tokens in ((0, 5), (1, 5), (2, 7), (3, 7)):
        choices.add(_item(index, "ab", 2, finished=True, prompt_tokens=prompt_tokens))
    usage = choices.usage()
    assert (usage.prompt_tokens, usage.completion_tokens) == (12, 8)
    assert choices.finished and choices.finish_reasons() == "length,length,length,length"


def test_a_call_is_finished_only_when_every_choice_is() -> None:
    choices = Choices(count=2, n=2, keep=False)
    choices.add(_item(1, "a", 1, finished=True))
    assert not choices.finished
    choices.add(_item(0, "b", 1, finished=True))
    assert choices.finished


def test_chat_chunks_name_the_role_once_per_choice_and_carry_usage_when_asked() -> None:
    body = _chat(n=2, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    answer = body.answer_format("chatcmpl-1", "m")
    choices = Choices(count=2, n=2, keep=False)
    first = answer.chunks(_item(1, "he", 1), choices.add(_item(1, "he", 1)))
    later = answer.chunks(_item(1, "llo", 2, finished=True), choices.add(_item(1, "llo", 2, finished=True)))
    assert [c["choices"][0]["delta"] for c in first] == [{"role": "assistant", "content": ""}, {"content": "he"}]
    assert [c["choices"][0]["delta"] for c in later] == [{"content": "llo"}]
    assert later[0]["choices"][0]["finish_reason"] == "length" and later[0]["choices"][0]["index"] == 1
    assert later[0]["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def test_an_echoed_completion_starts_with_the_prompt() -> None:
    answer = _completion(echo=True).answer_format("cmpl-1", "m")
    choices = Choices(count=1, n=1, keep=True)
    item = StreamItem("!", (1,), 1, 2, True, FinishReason.STOP, 0.1, "r", "!", 0, prompt_text="hi")
    choices.add(item)
    body = answer.body(choices)
    assert body["choices"][0]["text"] == "hi!" and body["usage"]["total_tokens"] == 3


# ---- running choices side by side ------------------------------------------------------------------------


class _Stream:
    """An engine stream stand-in that records whether it was closed before its end."""

    def __init__(self, items: list[str], fail: Exception | None = None, gate: asyncio.Event | None = None) -> None:
        self.items, self.fail, self.gate, self.closed = items, fail, gate, False

    async def run(self) -> AsyncIterator[str]:
        try:
            if self.gate is not None:
                await self.gate.wait()
            for item in self.items:
                yield item
                await asyncio.sleep(0)
            if self.fail is not None:
                raise self.fail
        finally:
            self.closed = True


async def test_merged_streams_hold_everything_until_every_stream_has_started() -> None:
    gate = asyncio.Event()
    slow = _Stream(["s1"], gate=gate)
    fast = _Stream(["f1", "f2", "f3"])
    out = merged([fast.run(), slow.run()])
    first = asyncio.ensure_future(out.__anext__())
    for _ in range(20):
        await asyncio.sleep(0)
    assert not first.done()  # the fast stream has items, but the slow one has not started
    gate.set()
    rest = [await first] + [x async for x in out]
    assert sorted(rest) == [(0, "f1"), (0, "f2"), (0, "f3"), (1, "s1")]
    assert [x for x in rest if x[0] == 0] == [(0, "f1"), (0, "f2"), (0, "f3")]  # each stream in its order


async def test_a_stream_that_fails_fails_the_call_and_closes_the_others() -> None:
    endless = _Stream(["e"] * 10_000)
    failing = _Stream(["x"], fail=ValueError("refused"))
    with pytest.raises(ValueError, match="refused"):
        async for _ in merged([endless.run(), failing.run()]):
            pass
    assert endless.closed


async def test_closing_the_merged_stream_closes_every_stream() -> None:
    streams = [_Stream(["a"] * 1000), _Stream(["b"] * 1000)]
    out = merged([s.run() for s in streams])
    await out.__anext__()
    await out.aclose()
    assert all(s.closed for s in streams)
    single = _Stream(["a"] * 1000)
    alone = merged([single.run()])
    await alone.__anext__()
    await alone.aclose()
    assert single.closed
