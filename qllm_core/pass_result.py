"""What a completed forward pass hands the output processor: the typed message across the run ->
postprocess seam (vLLM v1's `ModelRunnerOutput`, nano-vllm's token ids). Plain data, no tensors."""

from __future__ import annotations

from dataclasses import dataclass

from qllm_core.logprobs import TokenLogprob


@dataclass(frozen=True)
class EntryResult:
    """One request's outcome of a pass."""

    request_id: str
    cached_tokens: int
    """Its tokens whose KV is now in the cache (where its next pass starts)."""
    token_id: int | None
    """The token sampled for it; None for a chunk short of its prompt's end (nothing to sample yet)."""
    logprob: TokenLogprob | None = None
    """The sampled token's log-probability and alternatives, with `SamplingParams.logprobs`."""
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()
    """With `SamplingParams.prompt_logprobs`: what this pass adds to its prompt's log-probabilities (a
    leading None for the first prompt token, which nothing predicts)."""


@dataclass(frozen=True)
class PassResult:
    """Every request of a completed pass, in batch order."""

    pass_id: int
    entries: tuple[EntryResult, ...]
