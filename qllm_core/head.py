"""The head of a pass: logits only where they are wanted, the sampled tokens and the log-probabilities,
returned as a `PassResult`. Sampling happens here, at the end of the run step, so that no logits tensor
outlives the pass and the output processor sees plain data.

Prompt log-probabilities need full-vocabulary logits at every prompt position: they are computed
`PROMPT_LOGPROB_ROWS` positions at a time, so a long prompt never holds (positions x vocabulary) logits at
once (32k positions of a 151k vocabulary would be tens of GB).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from qllm_core.logprobs import TokenLogprob
from qllm_core.pass_result import EntryResult, PassResult
from qllm_core.request import Request
from qllm_core.sampler import Sampler, token_logprobs
from qllm_core.transfer import to_device

PROMPT_LOGPROB_ROWS = 256
"""Prompt positions whose logits are computed at once for prompt log-probabilities."""


class HeadEntry(Protocol):
    """What the head reads of a pass entry (`forward.PassEntry`)."""

    @property
    def request(self) -> Request: ...
    @property
    def start(self) -> int: ...
    @property
    def token_ids(self) -> tuple[int, ...]: ...
    @property
    def samples(self) -> bool: ...
    @property
    def all_logits(self) -> bool: ...


class LogitsHead(Protocol):
    """The model's final norm and LM head over chosen rows of the flat hidden states."""

    def head(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor: ...


def run_head(
    pass_id: int, model: LogitsHead, hidden: torch.Tensor, entries: Sequence[HeadEntry], sampler: Sampler
) -> PassResult:
    """Sample a token for every entry whose prompt is complete (its last position's logits) and gather the
    log-probabilities asked for."""
    offsets = [0]
    for e in entries:
        offsets.append(offsets[-1] + len(e.token_ids))
    sampling = [i for i, e in enumerate(entries) if e.samples]
    tokens: dict[int, int] = {}
    chosen: dict[int, TokenLogprob] = {}
    if sampling:
        last_rows = to_device([offsets[i + 1] - 1 for i in sampling], hidden.device)
        logits = model.head(hidden, last_rows)
        sampled = sampler.sample(logits, [entries[i].request for i in sampling])
        tokens = dict(zip(sampling, sampled, strict=True))
        for row, i in enumerate(sampling):
            top = entries[i].request.params.logprobs
            if top is not None:
                chosen[i] = token_logprobs(logits[row : row + 1], [tokens[i]], top)[0]
    results = []
    for i, e in enumerate(entries):
        prompt = _prompt_logprobs(model, hidden, offsets[i], e) if e.all_logits else ()
        results.append(
            EntryResult(e.request.request_id, e.start + len(e.token_ids), tokens.get(i), chosen.get(i), prompt)
        )
    return PassResult(pass_id, tuple(results))


def _prompt_logprobs(
    model: LogitsHead, hidden: torch.Tensor, offset: int, entry: HeadEntry
) -> tuple[TokenLogprob | None, ...]:
    """Log-probabilities of the prompt tokens this entry's positions predict: position p predicts token p + 1,
    and only those inside the prompt count; the first prompt token has none."""
    request = entry.request
    top = request.params.prompt_logprobs
    assert top is not None  # noqa: S101
    prompt = request.prompt_token_ids
    found: list[TokenLogprob | None] = [None] if entry.start == 0 else []
    end = min(entry.start + len(entry.token_ids), len(prompt) - 1)
    for first in range(entry.start, end, PROMPT_LOGPROB_ROWS):
        last = min(first + PROMPT_LOGPROB_ROWS, end)
        rows = torch.arange(offset + first - entry.start, offset + last - entry.start, device=hidden.device)
        found.extend(token_logprobs(model.head(hidden, rows), prompt[first + 1 : last + 1], top))
    return tuple(found)
