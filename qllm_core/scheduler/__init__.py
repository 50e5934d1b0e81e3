"""Scheduling policies behind one interface (`base.Policy`); `POLICIES` maps config names to them."""

from qllm_core.scheduler.base import BatchBuilder, BatchPlan, PassInfo, Policy, SchedulerView
from qllm_core.scheduler.chunked import ChunkedPolicy
from qllm_core.scheduler.fcfs import FcfsPolicy
from qllm_core.scheduler.priority import PriorityPolicy
from qllm_core.scheduler.qllm import QllmPolicy

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (FcfsPolicy, PriorityPolicy, ChunkedPolicy, QllmPolicy)}

__all__ = ["POLICIES", "BatchBuilder", "BatchPlan", "PassInfo", "Policy", "SchedulerView"]
