"""The one small interface every scheduling policy implements, and what it is shown.

The engine hands a policy a read-only `SchedulerView` (queues per class, KV headroom, the running and
suspended passes) and gets back typed decisions: a `BatchPlan` for a new pass, whether to preempt the
running pass at this preemption point, whether to resume a suspended one. Policies never touch
tensors, so they are tested on the CPU with views built by hand.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

from qllm_core.cost_model import CostModel, PassFeatures
from qllm_core.request import PriorityClass, Request


class Granularity(enum.Enum):
    """Where a running forward pass may be paused for more urgent work."""

    ITERATION = "iteration"  # only between forward passes (TGI / vLLM behaviour)
    LAYER = "layer"  # after any decoder layer
    EXPERT = "expert"  # after any stage inside a layer, down to one expert span of an MoE layer


@dataclass(frozen=True)
class SchedulerConfig:
    """The part of the settings a scheduling policy sees, built by `EngineConfig.scheduler_config`: the defaults
    and their reasons live there, once."""

    policy: str
    granularity: Granularity
    max_batch_size: int
    max_batched_tokens: int
    be_max_wait_s: float
    merge_ls_into_be: bool
    chunk_tokens: int
    """Token budget of one pass for the policies that split prompts into chunks (`chunked`)."""
    be_decodes_in_ls_passes: bool
    """`qllm`: BE decodes may fill a pass that prefills LS prompts."""
    ls_tpot_target_s: float | None
    """`qllm`: the most time a pass carrying LS decodes should take, BE included; None: what a `chunked` pass of
    those decodes would cost (the decodes plus a prompt chunk up to `chunk_tokens` tokens in all)."""
    ls_ttft_slack: float
    """`qllm`: how far past its isolated cost a choice may push an LS prompt's pass (LS decodes riding in it, a
    running pass finished first) and the margin a change of course must win by."""


@dataclass(frozen=True)
class BatchPlan:
    """The requests of a new forward pass, in batch order, and how many new tokens each one feeds.

    A request feeds all its uncached tokens, or, when a policy splits its prompt, the next `num_tokens` of
    them: its KV so far is kept, and its next token is sampled only once the whole prompt is in.
    """

    request_ids: tuple[str, ...]
    num_tokens: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.request_ids) != len(self.num_tokens) or not self.request_ids:
            raise ValueError("a batch plan names at least one request and one token count per request")
        if any(n < 1 for n in self.num_tokens):
            raise ValueError(f"every planned request feeds at least one token, got {self.num_tokens}")


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
    features: PassFeatures | None = None
    """What its cost depends on (`PassFeatures.of_rows` over its entries' (start, tokens)); None: unknown, taken
    as one prompt of `num_tokens` tokens."""
    suspended_s: float | None = None
    """Time it has spent suspended since it started (its own progress stalled), the current suspension
    included; None: unknown, `held_back_s` stands in."""

    @property
    def has_ls(self) -> bool:
        """True when any request in the pass is latency-sensitive."""
        return PriorityClass.LATENCY_SENSITIVE in self.classes

    @property
    def cost_features(self) -> PassFeatures:
        """`features`, or a prompt of `num_tokens` tokens when they are unknown."""
        if self.features is not None:
            return self.features
        return PassFeatures(prompt_tokens=self.num_tokens, prompt_rows=1) if self.num_tokens else PassFeatures()

    @property
    def stalled_s(self) -> float:
        """How long its own progress has stalled: `suspended_s`, else `held_back_s`."""
        return self.held_back_s if self.suspended_s is None else self.suspended_s

    @property
    def done_share(self) -> float:
        """The share of its layers it has finished (0 when unknown)."""
        total = self.layer + self.layers_left
        return self.layer / total if total else 0.0


@dataclass(frozen=True)
class SchedulerView:
    """A snapshot of everything a policy decides on."""

    now: float
    waiting: dict[PriorityClass, list[Request]]
    """Requests that need a prefill (or the rest of one), per class, in arrival order."""
    ready: dict[PriorityClass, list[Request]]
    """Requests with cached KV waiting for their next decode step, per class, in arrival order."""
    free_blocks: int
    block_cost: Callable[[Request, int], int]
    """KV blocks a request must still get to feed that many more tokens."""
    running: PassInfo | None
    suspended: PassInfo | None
    cost: CostModel | None = None
    """The engine's pass cost model; None: `CostModel.nominal` (see `cost_model`)."""
    be_stalled_s: float | None = None
    """How long queued BE work has gone without any BE work advancing (a unit of a pass holding BE requests
    ran); 0 with no BE queued. None: unknown, each BE request's own wait (`waiting_since`) stands in."""

    @property
    def cost_model(self) -> CostModel:
        """The cost model to plan with."""
        return NOMINAL if self.cost is None else self.cost

    def has_work(self, cls: PriorityClass) -> bool:
        """True when a class has requests queued for a new pass."""
        return bool(self.waiting[cls] or self.ready[cls])


NOMINAL = CostModel.nominal()
"""The stand-in cost model of views that carry none (it is never fed observations)."""


class BatchBuilder:
    """Fills a batch under the size, token and KV limits; every policy builds batches through it."""

    def __init__(self, config: SchedulerConfig, view: SchedulerView, token_budget: int | None = None) -> None:
        """`token_budget`: the most new tokens of the pass (default `max_batched_tokens`, which a lone prompt may
        exceed); with `try_add_chunk`, a hard budget that prompts are split to fit."""
        self._config = config
        self._view = view
        self._budget = config.max_batched_tokens if token_budget is None else token_budget
        self._ids: list[str] = []
        self._counts: list[int] = []
        self._features = PassFeatures()
        self._tokens = 0
        self._blocks = 0

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def full(self) -> bool:
        """True when no further sequence fits by count."""
        return len(self._ids) >= self._config.max_batch_size

    @property
    def features(self) -> PassFeatures:
        """What the batch so far costs (`PassFeatures`)."""
        return self._features

    @property
    def tokens_left(self) -> int:
        """What is left of the token budget."""
        return max(0, self._budget - self._tokens)

    def try_add(self, request: Request) -> bool:
        """Add a request with all its uncached tokens if it fits every limit; a lone prompt may exceed the
        token limit."""
        tokens = request.num_uncached_tokens
        if self._ids and self._tokens + tokens > self._budget:
            return False
        return self._add(request, tokens)

    def try_add_chunk(self, request: Request) -> bool:
        """Add a request with as many of its uncached tokens as the token budget has left (its whole prompt
        when it fits: the rest waits for a later pass)."""
        tokens = min(request.num_uncached_tokens, self.tokens_left)
        return tokens > 0 and self._add(request, tokens)

    def try_add_part(self, request: Request, tokens: int) -> bool:
        """Add the next `tokens` of a request's uncached tokens (a chunk a policy sized) if it fits every limit."""
        if not 0 < tokens <= min(request.num_uncached_tokens, self.tokens_left):
            return False
        return self._add(request, tokens)

    def _add(self, request: Request, tokens: int) -> bool:
        blocks = self._view.block_cost(request, tokens)
        if self.full or self._blocks + blocks > self._view.free_blocks:
            return False
        self._ids.append(request.request_id)
        self._counts.append(tokens)
        self._features = self._features + PassFeatures.of_row(request.num_cached_tokens, tokens)
        self._tokens += tokens
        self._blocks += blocks
        return True

    def add_in_order(self, requests: Iterable[Request], skip_misfits: bool = False, chunks: bool = False) -> None:
        """Add requests in the given order (split to the budget with `chunks`); stop at the first misfit
        unless `skip_misfits`."""
        add = self.try_add_chunk if chunks else self.try_add
        for request in requests:
            if not add(request) and not skip_misfits:
                return

    def plan(self) -> BatchPlan | None:
        """The batch, or None when it is empty."""
        return BatchPlan(tuple(self._ids), tuple(self._counts)) if self._ids else None


def urgency(request: Request) -> tuple[int, float, float]:
    """Class first, then the earliest TTFT deadline, then arrival."""
    return (int(request.priority), request.deadline_at, request.arrival)


class Policy(ABC):
    """A scheduling policy. Subclasses set `name` and implement `next_batch`; the rest has safe defaults."""

    name: ClassVar[str]
    plans_with_cost: ClassVar[bool] = False
    """True when the policy reads `SchedulerView.cost`: the engine then measures the pass cost model at start-up."""

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

    def points(self, info: PassInfo, under: PassInfo | None = None) -> Granularity:
        """Where a pass about to start will stop to ask `should_preempt`, decided once (the pass carries it):
        `granularity_for` the pass, or nowhere (`Granularity.ITERATION`) when `may_preempt` rules preemption out,
        unless it may merge into the suspended pass `under`: then it stops at layer boundaries, where merging
        happens."""
        if self.may_preempt(info):
            return self.granularity_for(info)
        configured = self.config.granularity
        if configured is not Granularity.ITERATION and under is not None and self.should_merge(info, under):
            return Granularity.LAYER
        return Granularity.ITERATION

    def granularity_for(self, info: PassInfo) -> Granularity:
        """The points of a pass that may be preempted. Default: the configured granularity."""
        return self.config.granularity

    def should_merge(self, active: PassInfo, suspended: PassInfo) -> bool:
        """Let the running pass join the suspended one where it stopped, once it has reached that layer? Default:
        whenever `merge_ls_into_be` is set. Asked as a pass starts over a suspended one (a yes keeps it
        stopping at layer boundaries) and at each boundary where the two stand at the same layer."""
        return self.config.merge_ls_into_be

    def should_resume(self, view: SchedulerView) -> bool:
        """With a pass suspended and no pass running: resume it (True) or start a new pass first (False)."""
        return True

    def order_key(self, request: Request) -> tuple[float, ...]:
        """Who is served first when memory is short (smallest first); the victim of eviction is the largest."""
        return urgency(request)


def all_queued(view: SchedulerView) -> list[Request]:
    """Every queued request of every class."""
    return [r for cls in PriorityClass for r in view.waiting[cls] + view.ready[cls]]
