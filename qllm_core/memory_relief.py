"""Making room in the KV pool: when the most urgent queued request does not fit, less urgent work gives up
its KV and goes back to the queue to recompute it later, so nothing is lost.

Victims, least urgent first (by the policy's `order_key`): queued requests holding KV (decodes between
steps, prompts part way through their chunks), then suspended passes whose every request is less urgent.
"""

from __future__ import annotations

from collections.abc import Callable

from qllm_core.cache import KVCache
from qllm_core.forward import ForwardPass
from qllm_core.metrics import EngineMetrics
from qllm_core.pass_stack import PassStack
from qllm_core.request import Request, RequestState
from qllm_core.request_table import RequestTable

OrderKey = Callable[[Request], tuple[float, ...]]


class MemoryRelief:
    """Frees KV from less urgent work for the most urgent request that does not fit."""

    def __init__(
        self,
        kv: KVCache,
        table: RequestTable,
        passes: PassStack,
        metrics: EngineMetrics,
        order_key: OrderKey,
        max_batch_size: int,
    ) -> None:
        self._kv = kv
        self._table = table
        self._passes = passes
        self._metrics = metrics
        self._key = order_key
        self._max_batch_size = max_batch_size

    def relieve(self) -> None:
        """Make room for the most urgent queued request that does not fit."""
        queued = self._table.queued()
        key, kv = self._key, self._kv
        free = kv.free_blocks
        for request in sorted(queued, key=key)[: self._max_batch_size]:
            cost = kv.extra_blocks(request.request_id, request.num_tokens)
            if cost <= free:
                free -= cost
                continue
            missing = cost - free
            holders = (r for r in queued if kv.holds(r.request_id) and key(r) > key(request))
            for victim in sorted(holders, key=key, reverse=True):
                if missing <= 0:
                    break
                missing -= self.evict(victim)
            for suspended in list(reversed(self._passes.suspended)):
                if missing <= 0:
                    break
                if all(key(e.request) > key(request) for e in suspended.entries):
                    missing -= self._drop_suspended(suspended)
            break

    def evict(self, request: Request) -> int:
        """Drop a queued request's KV; it recomputes it when next scheduled. Returns the blocks freed."""
        freed = self._kv.free(request.request_id)
        request.num_cached_tokens = 0
        if request.state is not RequestState.WAITING:
            self._table.move(request, RequestState.WAITING)
        self._metrics.evictions.labels(request.priority.label).inc()
        return freed

    def _drop_suspended(self, dropped: ForwardPass) -> int:
        # No request in a suspended pass is flagged to leave: a suspended pass lets an aborted request go at once.
        return sum(self.evict(request) for request in self._passes.drop(dropped))
