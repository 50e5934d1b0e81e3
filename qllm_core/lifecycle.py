"""A request's moves after a pass, and its end, whatever the reason.

After a pass, each request's KV mark advances and it either gets its token (then goes on, READY, or ends)
or, a chunk short of its prompt's end, waits for its next chunk (WAITING). Every request ends through
`end`: that one place frees what it holds (KV blocks, sampler state, detokeniser window) and records its
finish, so nothing leaks whichever way it ends (a stop, its length, an abort, an engine failure).
"""

from __future__ import annotations

from qllm_core.accounting import TimeAccounts
from qllm_core.cache import KVCache
from qllm_core.metrics import EngineMetrics
from qllm_core.output_processor import OutputProcessor
from qllm_core.outputs import RequestOutput
from qllm_core.pass_result import EntryResult, PassResult
from qllm_core.request import FinishReason, PriorityClass, Request, RequestState
from qllm_core.request_table import RequestTable
from qllm_core.sampler import Sampler
from qllm_core.timeline import Timeline


class Lifecycle:
    """Moves requests on after a pass and ends them."""

    def __init__(
        self,
        table: RequestTable,
        kv: KVCache,
        sampler: Sampler,
        outputs: OutputProcessor,
        accounts: TimeAccounts,
        metrics: EngineMetrics,
    ) -> None:
        self._table = table
        self._kv = kv
        self._sampler = sampler
        self._outputs = outputs
        self._accounts = accounts
        self._tokens_out = [metrics.generated_tokens.labels(c.label) for c in PriorityClass]

    def after_pass(self, result: PassResult, now: float) -> list[RequestOutput]:
        """Every request of a completed pass: its KV mark, then its token (or its wait for the next chunk)."""
        outputs = []
        generated = [0] * len(PriorityClass)
        by_id = self._table.by_id
        for entry in result.entries:
            request = by_id[entry.request_id]
            request.num_cached_tokens = entry.cached_tokens
            request.prompt_logprobs.extend(entry.prompt_logprobs)
            if entry.token_id is None:  # a chunk short of its prompt's end: the rest waits for a later pass
                self._table.move(request, RequestState.WAITING)
                continue
            generated[request.priority] += 1
            outputs.append(self._token(request, entry, now))
        for cls, count in zip(PriorityClass, generated, strict=True):
            if count:  # once per class, not per token: a labelled inc takes a lock
                self._tokens_out[cls].inc(count)
        return outputs

    def _token(self, request: Request, entry: EntryResult, now: float) -> RequestOutput:
        assert entry.token_id is not None  # noqa: S101
        request.output_token_ids.append(entry.token_id)
        timeline = self._accounts.token(request, now)
        reason = self._outputs.stop_reason(request, entry.token_id)
        if reason is not None:
            return self.end(request, reason, now, entry=entry, timeline=timeline)
        self._table.move(request, RequestState.READY)
        return self._outputs.stream(request, entry, timeline)

    def end(
        self,
        request: Request,
        reason: FinishReason,
        now: float,
        error: str | None = None,
        entry: EntryResult | None = None,
        timeline: Timeline | None = None,
    ) -> RequestOutput:
        """End a request for any reason: free what it holds, record its finish, and build its final output.
        `entry`: the pass result it ended on, if it ended on a token."""
        request.finish_reason = reason
        self._table.move(request, RequestState.FINISHED)
        self._table.remove(request)
        self._kv.free(request.request_id)
        self._sampler.forget(request.request_id)
        self._accounts.finished(request, reason, now)
        return self._outputs.final(request, error, entry, timeline)
