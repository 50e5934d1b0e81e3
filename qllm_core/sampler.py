"""Next-token choice for a batch of logits; the only host synchronisation of a step is here."""

from __future__ import annotations

import torch

from qllm_core.request import SamplingParams


class Sampler:
    """Greedy rows in one vectorised argmax; sampled rows with a per-request generator (seeded when asked)."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._generators: dict[str, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]) -> list[int]:
        """One token id per row of `logits` (batch, vocab)."""
        chosen = torch.argmax(logits, dim=-1)
        for row, (rid, p) in enumerate(zip(request_ids, params, strict=True)):
            if not p.greedy:
                chosen[row] = self._sample_row(logits[row].float(), rid, p)
        return [int(t) for t in chosen.tolist()]

    def forget(self, request_id: str) -> None:
        """Drop a finished request's generator."""
        self._generators.pop(request_id, None)

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
