"""`fcfs`: iteration-level continuous batching in arrival order, blind to classes (the TGI-style baseline)."""

from __future__ import annotations

from qllm_core.request import Request
from qllm_core.scheduler.base import BatchBuilder, BatchPlan, Policy, SchedulerView, all_queued


class FcfsPolicy(Policy):
    """Every queued request in arrival order, up to the batch limits; never preempts."""

    name = "fcfs"

    def next_batch(self, view: SchedulerView) -> BatchPlan | None:
        """Oldest first; stop at the first request that does not fit, so nobody is overtaken."""
        builder = BatchBuilder(self.config, view)
        builder.add_in_order(sorted(all_queued(view), key=lambda r: r.arrival))
        return builder.plan()

    def order_key(self, request: Request) -> tuple[float, ...]:
        """Arrival only: memory goes to the oldest, the newest is evicted first."""
        return (request.arrival,)
