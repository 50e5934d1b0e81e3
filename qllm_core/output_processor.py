"""From sampled tokens to what callers see: stop checks, incremental detokenising, and each request's
`RequestOutput` (what is new since its previous one; the whole output once, when it finishes).

It reads plain data (a request and its `EntryResult`) and moves no state: the lifecycle (lifecycle.py)
decides, from what `stop_reason` says, whether a request goes on or ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from qllm_core.detokenizer import Detokenizer
from qllm_core.logprobs import TokenLogprob
from qllm_core.outputs import RequestOutput
from qllm_core.pass_result import EntryResult
from qllm_core.request import FinishReason, Request
from qllm_core.timeline import Timeline


@dataclass
class _Shown:
    """What a request's stream has shown, and how far its text has been searched for stop strings."""

    emitted: str = ""
    searched: int = 0
    """Characters of its text already searched: a new match must end past this."""


class OutputProcessor:
    """Stops, detokenising and outputs for every request of the engine."""

    def __init__(self, detokenizer: Detokenizer, eos_token_ids: frozenset[int], max_model_len: int) -> None:
        self._detokenizer = detokenizer
        self._eos = eos_token_ids
        self._max_model_len = max_model_len
        self._shown: dict[str, _Shown] = {}

    def stop_reason(self, request: Request, token: int) -> FinishReason | None:
        """Why a request ends with the token it just got (already appended to its output), or None.

        A stop string is searched for only where it could end in the new text, so the cost per token does not
        grow with the output."""
        params = request.params
        if token in params.stop_token_ids or (token in self._eos and not params.ignore_eos):
            return FinishReason.STOP
        if params.stop:
            text = self._detokenizer.text(request.request_id, request.output_token_ids)
            shown = self._shown.setdefault(request.request_id, _Shown())
            longest = max(len(s) for s in params.stop)
            start = max(0, shown.searched - longest + 1)
            shown.searched = len(text)
            if stop_index(text, params.stop, start) >= 0:
                return FinishReason.STOP
        if len(request.output_token_ids) >= params.max_tokens or request.num_tokens >= self._max_model_len:
            return FinishReason.LENGTH
        return None

    def stream(self, request: Request, entry: EntryResult, timeline: Timeline | None) -> RequestOutput:
        """The output of a request that goes on: its new token and the text now safe to show."""
        text = self._detokenizer.text(request.request_id, request.output_token_ids)
        shown = self._shown.setdefault(request.request_id, _Shown())
        safe = streamable(text, request.params.stop)
        delta = safe[len(shown.emitted) :]
        shown.emitted = safe
        return _output(request, delta, None, None, entry, timeline)

    def final(
        self,
        request: Request,
        error: str | None = None,
        entry: EntryResult | None = None,
        timeline: Timeline | None = None,
    ) -> RequestOutput:
        """The finished output (the request has ended): the whole text, cut before a stop string, and what it
        adds to what was shown; `entry` when it ended on a token of this pass."""
        rid = request.request_id
        shown = self._shown.pop(rid, _Shown())
        self._detokenizer.forget(rid)
        text = shown.emitted
        if request.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
            text = self._detokenizer.full(request.output_token_ids)
            cut = stop_index(text, request.params.stop)
            text = text if cut < 0 else text[:cut]
        # The held-back tail (a stop string's start, half a character) is what the final text adds.
        delta = text[len(shown.emitted) :] if text.startswith(shown.emitted) else ""
        return _output(request, delta, text, error, entry, timeline)


def _output(
    request: Request,
    delta: str,
    final_text: str | None,
    error: str | None,
    entry: EntryResult | None,
    timeline: Timeline | None,
) -> RequestOutput:
    finished = final_text is not None
    new = () if entry is None or entry.token_id is None else (entry.token_id,)
    params = request.params
    new_logprobs: tuple[TokenLogprob, ...] | None = None
    if new and params.logprobs is not None and entry is not None and entry.logprob is not None:
        new_logprobs = (entry.logprob,)
    first = timeline is not None
    prompt_logprobs = tuple(request.prompt_logprobs) if first and params.prompt_logprobs is not None else None
    return RequestOutput(
        request_id=request.request_id,
        priority=request.priority,
        prompt_token_count=len(request.prompt_token_ids),
        new_token_ids=new,
        num_output_tokens=len(request.output_token_ids),
        text_delta=delta,
        finished=finished,
        finish_reason=request.finish_reason,
        error=error,
        ttft_s=request.times.ttft,
        preemptions=request.preemptions,
        token_ids=tuple(request.output_token_ids) if finished else (),
        text=final_text or "",
        new_logprobs=new_logprobs,
        prompt_logprobs=prompt_logprobs,
        timeline=timeline,
    )


def stop_index(text: str, stops: tuple[str, ...], start: int = 0) -> int:
    """Where the first stop string starts in `text` (searching from `start`), or -1."""
    return min((i for i in (text.find(s, start) for s in stops) if i >= 0), default=-1)


def streamable(text: str, stops: tuple[str, ...]) -> str:
    """Text safe to show mid-stream: hold back a tail that may be the start of a stop string, or half a character."""
    hold = max((held_prefix(text, s) for s in stops), default=0)
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
        hold = max(hold, 1)
    return text[: len(text) - hold]


def held_prefix(text: str, stop: str) -> int:
    """The length of the longest proper prefix of `stop` that `text` ends with (0 when none)."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0
