"""`chunked`: vLLM V1's scheduling, the baseline users would pick instead (also SGLang's and Sarathi-Serve's).

One token budget per pass (`chunk_tokens`). Requests already running go first: every decode, then the
prompts part way through their chunks; then new prompts in priority order (LS before BE, earlier TTFT
deadline, then arrival). A prompt longer than what is left of the budget takes what is left, keeps its KV
and continues in the next pass. A pass is never interrupted: the budget alone bounds how long an arriving
LS prompt waits (one pass of at most `chunk_tokens` tokens, plus its own chunks).
"""

from __future__ import annotations

from qllm_core.request import PriorityClass
from qllm_core.scheduler.base import BatchBuilder, BatchPlan, Policy, SchedulerView, urgency


class ChunkedPolicy(Policy):
    """Decodes, then unfinished prompts, then new prompts by priority, all under one token budget per pass."""

    name = "chunked"

    def next_batch(self, view: SchedulerView) -> BatchPlan | None:
        """Fill the pass's token budget in vLLM V1's order, splitting the last prompt that does not fit."""
        builder = BatchBuilder(self.config, view, token_budget=self.config.chunk_tokens)
        decodes = sorted((r for c in PriorityClass for r in view.ready[c]), key=urgency)
        waiting = sorted((r for c in PriorityClass for r in view.waiting[c]), key=urgency)
        # A prompt part way through its chunks is running in vLLM's terms: it continues before new ones.
        started = [r for r in waiting if r.num_cached_tokens > 0]
        fresh = [r for r in waiting if r.num_cached_tokens == 0]
        builder.add_in_order(decodes, skip_misfits=True, chunks=True)
        builder.add_in_order(started, skip_misfits=True, chunks=True)
        builder.add_in_order(fresh, chunks=True)
        return builder.plan()
