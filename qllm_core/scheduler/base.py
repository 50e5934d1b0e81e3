"""The one small interface every scheduling policy implements, and what it is shown.

The engine hands a policy a read-only `SchedulerView` (queues per class, KV headroom, the running and
suspended passes) and gets back typed decisions: a `BatchPlan` for a new pass, whether to preempt the
running pass at this preemption point, whether to resume a suspended one. Policies never touch
tensors, so they are tested on the CPU with views built by hand.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

from qllm_core.config import SchedulerConfig
from qllm_core.request import PriorityClass, Request


@dataclass(frozen=True)
class BatchPlan:
    """The requests of a new forward pass, in batch order."""

    request_ids: tuple[str, ...]


@dataclass(frozen=True)
class PassInfo:
    """What a policy may know about a forward pass in flight."""

    classes: frozenset[PriorityClass]
    ls_prefill: bool
    """True when an LS request in the pass is prefilling (its TTFT depends on this pass)."""
    held_back_s: float
    """How long its requests have been held back for this step: queued before the pass started, plus the
    time the pass has spent suspended. The aging bound applies to this."""
    layer: int
    at_layer_boundary: bool
    num_tokens: int = 0
    """New tokens the pass feeds."""
    layers_left: int = 0
    """Decoder layers it has not finished."""

    @property
    def has_ls(self) -> bool:
        """True when any request in the pass is latency-sensitive."""
        return PriorityClass.LATENCY_SENSITIVE in self.classes


@dataclass(frozen=True)
class SchedulerView:
    """A snapshot of everything a policy decides on."""

    now: float
    waiting: dict[PriorityClass, list[Request]]
    """Requests that need a prefill, per class, in arrival order."""
    ready: dict[PriorityClass, list[Request]]
    """Requests with cached KV waiting for their next decode step, per class, in arrival order."""
    free_blocks: int
    block_cost: Callable[[Request], int]
    """KV blocks a request still needs to run its next step."""
    running: PassInfo | None
    suspended: PassInfo | None

    def has_work(self, cls: PriorityClass) -> bool:
        """True when a class has requests queued for a new pass."""
        return bool(self.waiting[cls] or self.ready[cls])


class BatchBuilder:
    """Fills a batch under the size, token and KV limits; every policy builds batches through it."""

    def __init__(self, config: SchedulerConfig, view: SchedulerView) -> None:
        self._config = config
        self._view = view
        self._ids: list[str] = []
        self._tokens = 0
        self._blocks = 0

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def full(self) -> bool:
        """True when no further sequence fits by count."""
        return len(self._ids) >= self._config.max_batch_size

    def try_add(self, request: Request) -> bool:
        """Add a request if it fits every limit; a lone prompt may exceed the token limit."""
        tokens = request.num_tokens - request.num_cached_tokens
        blocks = self._view.block_cost(request)
        if self.full or self._blocks + blocks > self._view.free_blocks:
            return False
        if self._ids and self._tokens + tokens > self._config.max_batched_tokens:
            return False
        self._ids.append(request.request_id)
        self._tokens += tokens
        self._blocks += blocks
        return True

    def add_in_order(self, requests: Iterable[Request], skip_misfits: bool = False) -> None:
        """Add requests in the given order; stop at the first misfit unless `skip_misfits`."""
        for request in requests:
            if not self.try_add(request) and not skip_misfits:
                return

    def plan(self) -> BatchPlan | None:
        """The batch, or None when it is empty."""
        return BatchPlan(tuple(self._ids)) if self._ids else None


def urgency(request: Request) -> tuple[int, float, float]:
    """Class first, then the earliest TTFT deadline, then arrival."""
    return (int(request.priority), request.deadline_at, request.arrival)


class Policy(ABC):
    """A scheduling policy. Subclasses set `name` and implement `next_batch`; the rest has safe defaults."""

    name: ClassVar[str]

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config

    @abstractmethod
    def next_batch(self, view: SchedulerView) -> BatchPlan | None:
        """Choose the requests of a new forward pass, or None to run nothing new."""

    def should_preempt(self, view: SchedulerView) -> bool:
        """At a preemption point of the running pass: suspend it for a new pass? Default: never.

        Asked at the pass's first preemption point and again only after a request arrived or was aborted:
        nothing else a policy sees changes in the middle of a pass, save the clock. So a policy may use
        the clock to say no (an aging bound), never as the only reason to say yes.
        """
        return False

    def may_preempt(self, info: PassInfo) -> bool:
        """Could `should_preempt` ever say yes to this pass from where it stands? Asked as a pass starts.

        A pass ruled out here runs without preemption points: nothing checks in on it, and at expert
        granularity its experts run through the fused kernel. Answer True whenever in doubt. Default:
        True exactly when the policy overrides `should_preempt` (the base one never preempts).
        """
        return type(self).should_preempt is not Policy.should_preempt

    def should_resume(self, view: SchedulerView) -> bool:
        """With a pass suspended and no pass running: resume it (True) or start a new pass first (False)."""
        return True

    def order_key(self, request: Request) -> tuple[float, ...]:
        """Who is served first when memory is short (smallest first); the victim of eviction is the largest."""
        return urgency(request)


def all_queued(view: SchedulerView) -> list[Request]:
    """Every queued request of every class."""
    return [r for cls in PriorityClass for r in view.waiting[cls] + view.ready[cls]]
