"""Next-token choice for a batch of logits, with penalties and log-probabilities; the step's one host read
of results is here (`tolist` of the chosen tokens).

Greedy rows take one vectorised argmax; sampled rows a per-request generator (seeded when asked).
Penalties keep per-request token counts on the device, updated by one scatter per step, so a long
output costs nothing more per step. Log-probabilities are of the model's own distribution (the raw
logits, before penalties and temperature), as vLLM reports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qllm_core.logprobs import TokenLogprob
from qllm_core.params import SamplingParams
from qllm_core.request import Request


@dataclass
class _Penalties:
    output_counts: torch.Tensor
    """(vocab,) how often each token is in the output so far."""
    in_prompt: torch.Tensor
    """(vocab,) bool: the token is in the prompt (repetition_penalty looks at both)."""


class Sampler:
    """Chooses tokens row by row of a pass's logits."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._generators: dict[str, torch.Generator] = {}
        self._penalties: dict[str, _Penalties] = {}

    def sample(self, logits: torch.Tensor, requests: Sequence[Request]) -> list[int]:
        """One token id per row of `logits` (batch, vocab), row i for `requests[i]`."""
        if any(r.params.penalized for r in requests):
            logits = self._penalize(logits, requests)
        chosen = torch.argmax(logits, dim=-1)
        for row, request in enumerate(requests):
            p = request.params
            if not p.greedy:
                chosen[row] = self._sample_row(logits[row].float(), request.request_id, p)
        tokens = [int(t) for t in chosen.tolist()]
        for request, token in zip(requests, tokens, strict=True):
            state = self._penalties.get(request.request_id)
            if state is not None:
                state.output_counts[token] += 1
        return tokens

    def forget(self, request_id: str) -> None:
        """Drop a finished request's generator and penalty counts."""
        self._generators.pop(request_id, None)
        self._penalties.pop(request_id, None)

    # ---- penalties -----------------------------------------------------------------------------------
    def _penalize(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        logits = logits.clone()
        for row, request in enumerate(requests):
            p = request.params
            if not p.penalized:
                continue
            state = self._state(request, logits.shape[-1])
            scores = logits[row]
            counts = state.output_counts.to(scores.dtype)
            if p.repetition_penalty != 1.0:
                seen = state.in_prompt | (state.output_counts > 0)
                penalized = torch.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
                scores = torch.where(seen, penalized, scores)
            scores = scores - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(scores.dtype)
            logits[row] = scores
        return logits

    def _state(self, request: Request, vocab: int) -> _Penalties:
        state = self._penalties.get(request.request_id)
        if state is None:
            device = self._device
            counts = torch.zeros(vocab, dtype=torch.long, device=device)
            if request.output_token_ids:  # joined late (recomputed after eviction): count what it has
                ids = torch.tensor(request.output_token_ids, dtype=torch.long, device=device)
                counts.scatter_add_(0, ids, torch.ones_like(ids))
            in_prompt = torch.zeros(vocab, dtype=torch.bool, device=device)
            in_prompt[torch.tensor(request.prompt_token_ids, dtype=torch.long, device=device)] = True
            state = _Penalties(counts, in_prompt)
            self._penalties[request.request_id] = state
        return state

    # ---- sampling ------------------------------------------------------------------------------------
    def _generator(self, request_id: str, seed: int | None) -> torch.Generator:
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self._device)
            if seed is None:
                gen.seed()
            else:
                gen.manual_seed(seed)
            self._generators[request_id] = gen
        return gen

    def _sample_row(self, logits: torch.Tensor, request_id: str, p: SamplingParams) -> torch.Tensor:
        logits = logits / p.temperature
        if p.top_k > 0:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = torch.cumsum(sorted_probs, 0) - sorted_probs >= p.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)  # a boolean index would sync on CUDA
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return torch.multinomial(probs, 1, generator=self._generator(request_id, p.seed))[0]


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int], top: int) -> list[TokenLogprob]:
    """Row i's log-probability of `token_ids[i]` and its `top` most likely alternatives (raw logits)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=logits.device)
    chosen = logprobs.gather(1, ids[:, None])[:, 0].tolist()
    if top:
        values, indices = torch.topk(logprobs, min(top, logprobs.shape[-1]), dim=-1)
        alternatives = [tuple(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    else:
        alternatives = [()] * len(chosen)
    return [TokenLogprob(int(t), float(lp), alts) for t, lp, alts in zip(token_ids, chosen, alternatives, strict=True)]
