"""Every request the engine holds: admission checks, the state moves with their per-state counts, and the
queues a policy sees.

All state changes go through `move`, so the counts per class and state (what stats and gauges read) stay
exact without a recount; `audit` recounts them for tests.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from qllm_core.cache import KVCache
from qllm_core.errors import DuplicateRequestError, InvalidRequestError, PromptTooLongError
from qllm_core.params import SamplingParams
from qllm_core.request import PriorityClass, Request, RequestState


@dataclass(frozen=True)
class Limits:
    """What a request must fit: facts found while loading the model."""

    vocab_size: int
    max_model_len: int


@dataclass(frozen=True)
class Queues:
    """The requests waiting for a pass, per class, in arrival order."""

    waiting: dict[PriorityClass, list[Request]]
    """Needing a prefill, or the rest of one."""
    ready: dict[PriorityClass, list[Request]]
    """KV cached, waiting for their next decode step."""


class RequestTable:
    """The engine's requests by id, their states and counts."""

    def __init__(self, limits: Limits, kv: KVCache) -> None:
        self._limits = limits
        self._kv = kv
        self._requests: dict[str, Request] = {}
        # Per class, per state: plain lists indexed by the IntEnums (a move touches two of them).
        self._counts = [[0] * len(RequestState) for _ in PriorityClass]

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._requests.values()))

    def get(self, request_id: str) -> Request | None:
        """The request with this id, or None."""
        return self._requests.get(request_id)

    @property
    def by_id(self) -> dict[str, Request]:
        """The requests by id (read it, never change it: moves go through `move`)."""
        return self._requests

    def count(self, cls: PriorityClass, state: RequestState) -> int:
        """Requests of a class in a state."""
        return self._counts[cls][state]

    # ---- in and out ----------------------------------------------------------------------------------
    def admit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: PriorityClass | str,
        ttft_deadline_s: float | None,
        arrival: float,
    ) -> Request:
        """Validate and queue a request (WAITING); raises `InvalidRequestError` (or a subclass) naming what to fix."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a SamplingParams", param="params")
        cls = PriorityClass.parse(priority)
        if request_id in self._requests:
            raise DuplicateRequestError(f"request id {request_id!r} is already in use", param="request_id")
        self._check_prompt(prompt_token_ids, params)
        if ttft_deadline_s is not None and (
            isinstance(ttft_deadline_s, bool)
            or not isinstance(ttft_deadline_s, int | float)
            or not math.isfinite(ttft_deadline_s)
            or ttft_deadline_s <= 0
        ):
            raise InvalidRequestError("ttft_deadline_s must be a positive number of seconds", param="ttft_deadline_s")
        request = Request(request_id, list(prompt_token_ids), params, cls, arrival, ttft_deadline_s)
        self._requests[request_id] = request
        self._counts[cls][request.state] += 1
        return request

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        vocab, limit = self._limits.vocab_size, self._limits.max_model_len
        if not isinstance(ids, list | tuple) or not ids:
            raise InvalidRequestError("the prompt is empty; send at least one token", param="prompt")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidRequestError(
                f"stop_token_ids must be below the vocabulary size {vocab}", param="stop_token_ids"
            )
        if len(ids) >= limit:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens but the context is {limit}; shorten the prompt", param="prompt"
            )
        if len(ids) + params.max_tokens > limit:
            raise PromptTooLongError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context of {limit} "
                f"tokens; set max_tokens <= {limit - len(ids)}",
                param="max_tokens",
            )
        if self._kv.request_blocks(len(ids) + params.max_tokens) > self._kv.num_blocks:  # recurrent state too
            raise PromptTooLongError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the KV cache "
                f"({self._kv.capacity_tokens} tokens); lower max_tokens or raise kv_cache_tokens",
                param="max_tokens",
            )

    def move(self, request: Request, state: RequestState) -> None:
        """Every state change goes through here, so the per-state counts stay exact without a recount."""
        counts = self._counts[request.priority]
        counts[request.state] -= 1
        request.move_to(state)
        counts[state] += 1

    def remove(self, request: Request) -> None:
        """Forget a finished request."""
        del self._requests[request.request_id]
        self._counts[request.priority][RequestState.FINISHED] -= 1

    # ---- what policies see ---------------------------------------------------------------------------
    def queues(self) -> Queues:
        """The WAITING and READY requests per class, in arrival order (the table keeps arrival order)."""
        waiting: dict[PriorityClass, list[Request]] = {c: [] for c in PriorityClass}
        ready: dict[PriorityClass, list[Request]] = {c: [] for c in PriorityClass}
        for r in self._requests.values():
            if r.state is RequestState.WAITING:
                waiting[r.priority].append(r)
            elif r.state is RequestState.READY:
                ready[r.priority].append(r)
        return Queues(waiting, ready)

    def queued(self) -> list[Request]:
        """Every request waiting for a pass, WAITING or READY, in arrival order."""
        return [r for r in self._requests.values() if r.state in (RequestState.WAITING, RequestState.READY)]

    def audit(self) -> None:
        """Recount requests per class and state against the kept counts (O(requests): for tests)."""
        kept = {(c, s): self._counts[c][s] for c in PriorityClass for s in RequestState if self._counts[c][s]}
        recount = dict(Counter((r.priority, r.state) for r in self._requests.values()))
        if kept != recount:
            raise RuntimeError(f"request counts drifted: kept {kept}, recounted {recount}")
