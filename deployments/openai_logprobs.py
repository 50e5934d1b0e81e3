"""Log-probabilities in OpenAI's two shapes: chat's `logprobs.content` and completions' legacy lists."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from deployments.protocol import LogprobEntry, TokenText

# JSON has no -Infinity: a token the model gives no probability at all is shown with vLLM's stand-in.
_NO_PROBABILITY = -9999.0


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _NO_PROBABILITY


def _chat_token(token: TokenText, logprob: float | None) -> dict[str, Any]:
    return {"token": token.text, "logprob": None if logprob is None else _finite(logprob), "bytes": list(token.utf8)}


def chat_logprobs(entries: Iterable[LogprobEntry]) -> dict[str, Any]:
    """`{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal": null}`."""
    content = [
        _chat_token(e.token, e.logprob) | {"top_logprobs": [_chat_token(t.token, t.logprob) for t in e.top]}
        for e in entries
    ]
    return {"content": content, "refusal": None}


class CompletionLogprobs:
    """One choice's `logprobs` object of /v1/completions, chunk by chunk: `text_offset` goes on across chunks.

    A token's offset is the sum of the lengths of the token strings before it, as vLLM computes it: the
    position in the choice's text wherever tokens decode to whole characters.
    """

    def __init__(self) -> None:
        self._offset = 0

    def format(self, entries: Iterable[LogprobEntry]) -> dict[str, Any]:
        """`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` for the next entries; a prompt's first
        token has null in `token_logprobs` and `top_logprobs`."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for e in entries:
            tokens.append(e.token.text)
            offsets.append(self._offset)
            self._offset += len(e.token.text)
            if e.logprob is None:
                token_logprobs.append(None)
                top.append(None)
            else:
                token_logprobs.append(_finite(e.logprob))
                top.append({t.token.text: _finite(t.logprob) for t in e.top})
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
