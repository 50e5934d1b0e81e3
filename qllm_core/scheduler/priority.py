"""`priority`: iteration-level priority scheduling (the vLLM `--scheduling-policy priority` baseline).

Batches are formed by class, deadline and arrival at each iteration boundary; under memory pressure
lower-priority requests lose their KV first (the engine evicts by `order_key`). A running forward pass
is never interrupted.
"""

from __future__ import annotations

from qllm_core.request import PriorityClass
from qllm_core.scheduler.base import BatchBuilder, BatchPlan, Policy, SchedulerView, urgency


class PriorityPolicy(Policy):
    """Decodes of every class by urgency, then prefills by urgency."""

    name = "priority"

    def next_batch(self, view: SchedulerView) -> BatchPlan | None:
        """Running decodes continue first (as in vLLM), then new prompts in priority order."""
        builder = BatchBuilder(self.config, view)
        builder.add_in_order(sorted((r for c in PriorityClass for r in view.ready[c]), key=urgency), skip_misfits=True)
        builder.add_in_order(sorted((r for c in PriorityClass for r in view.waiting[c]), key=urgency))
        return builder.plan()
