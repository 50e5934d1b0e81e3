"""What the engine hands back per request and step: `RequestOutput`."""

from __future__ import annotations

from dataclasses import dataclass

from qllm_core.logprobs import TokenLogprob
from qllm_core.request import FinishReason, PriorityClass
from qllm_core.timeline import Timeline


@dataclass(frozen=True)
class RequestOutput:
    """What a caller sees after each step: what is new since this request's previous output.

    Only the new tokens and text travel each step: a cumulative copy would make a long answer quadratic.
    The finished output also carries the whole output (`token_ids`, `text`), built once.
    """

    request_id: str
    priority: PriorityClass
    prompt_token_count: int
    new_token_ids: tuple[int, ...]
    """Tokens generated since the previous output."""
    num_output_tokens: int
    """Tokens generated so far."""
    text_delta: str
    """Text since the previous output. It never ends in half a UTF-8 character or in what may be the start
    of a stop string (both wait for the next token), so the deltas of a request add up to its final text."""
    finished: bool
    finish_reason: FinishReason | None = None
    error: str | None = None
    ttft_s: float | None = None
    preemptions: int = 0
    token_ids: tuple[int, ...] = ()
    """The whole output, on the finished output only (empty before)."""
    text: str = ""
    """The whole text, on the finished output only (empty before)."""
    new_logprobs: tuple[TokenLogprob, ...] | None = None
    """With `SamplingParams.logprobs`: one entry per token of `new_token_ids`."""
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    """With `SamplingParams.prompt_logprobs`, on the first output: one entry per prompt token (None for the
    first, which nothing predicts)."""
    timeline: Timeline | None = None
    """On the output that carries the first token: where the request's time to first token went."""
