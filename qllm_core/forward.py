"""A forward pass over one batch as a resumable object: `step()` runs it to its next preemption point.

The pass keeps everything it needs to stop anywhere and resume with nothing recomputed: the flat
hidden states, RoPE tables, attention metadata, and inside an MoE layer the residual, routing and the
partial expert output. Its cursor is an explicit state machine over `Stage`. It also keeps its own
history as the scheduler sees it: how long its requests queued before it started, how long it has been
suspended, how long it has run.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from qllm_core.cache import KVCache
from qllm_core.cost_model import PassFeatures
from qllm_core.head import run_head
from qllm_core.models.adapter import Rope
from qllm_core.models.attention import AttentionBatch
from qllm_core.models.staged import LayerWork, StagedModel
from qllm_core.pass_result import PassResult
from qllm_core.request import PriorityClass, Request
from qllm_core.sampler import Sampler
from qllm_core.scheduler.base import Granularity, PassInfo
from qllm_core.transfer import to_device


class Stage(enum.IntEnum):
    """Where a pass stands: the next unit of work it will run. An IntEnum, so that counting units per stage
    hashes an int rather than calling Enum's Python-level hash on every unit."""

    EMBED = 0
    ATTENTION = 1
    ROUTE = 2
    ALL_EXPERTS = 3  # every routed expert of a layer in one unit (layer and iteration granularity)
    EXPERT_SPAN = 4  # one span of routed experts (expert granularity)
    SHARED_EXPERT = 5
    COMBINE = 6
    HEAD = 7
    DONE = 8

    @property
    def label(self) -> str:
        """The name shown in stats and errors ("attention")."""
        return self.name.lower()


BOUNDARY_STAGES = frozenset({Stage.EMBED, Stage.ATTENTION, Stage.HEAD})
"""Between layers: where requests can join (merge) or leave (abort) a pass without losing work."""

STOPS: dict[Granularity, frozenset[Stage]] = {
    Granularity.ITERATION: frozenset(),
    Granularity.LAYER: frozenset({Stage.ATTENTION, Stage.HEAD}),
    Granularity.EXPERT: frozenset(Stage) - {Stage.EMBED},
}
"""The stages a pass of each granularity stops before (it always stops once done): what a granularity means."""

UnitObserver = Callable[["ForwardPass", int, "Stage", int], None]
"""Called before each unit runs with (the pass, layer, stage, first expert of a span or -1): for tests."""


@dataclass(frozen=True)
class PassEntry:
    """One request's part of a pass: the tokens it feeds, starting at position `start`."""

    request: Request
    start: int
    token_ids: tuple[int, ...]
    samples: bool
    """Its last position's logits choose its next token: False for a chunk short of its prompt's end."""
    all_logits: bool = False
    """Logits at every position it feeds (prompt log-probabilities)."""


def describe(entries: list[PassEntry]) -> tuple[frozenset[PriorityClass], bool]:
    """The classes in a batch, and whether an LS request in it is prefilling (its TTFT waits on the pass)."""
    classes = frozenset(e.request.priority for e in entries)
    ls_prefill = any(e.request.priority is PriorityClass.LATENCY_SENSITIVE and len(e.token_ids) > 1 for e in entries)
    return classes, ls_prefill


def features_of(entries: list[PassEntry]) -> PassFeatures:
    """What a pass over `entries` costs, as the cost model describes a pass."""
    return PassFeatures.of_rows((e.start, len(e.token_ids)) for e in entries)


def pass_info(
    entries: list[PassEntry],
    num_layers: int,
    held_back_s: float,
    features: PassFeatures,
    layer: int = 0,
    at_boundary: bool = True,
    suspended_s: float = 0.0,
) -> PassInfo:
    """What a policy is told about a pass over `entries` standing before `layer`."""
    classes, ls_prefill = describe(entries)
    return PassInfo(
        classes=classes,
        ls_prefill=ls_prefill,
        held_back_s=held_back_s,
        layer=layer,
        at_layer_boundary=at_boundary,
        num_tokens=sum(len(e.token_ids) for e in entries),
        layers_left=num_layers - layer,
        features=features,
        suspended_s=suspended_s,
    )


class ForwardPass:
    """One forward pass over a batch, run stage by stage."""

    def __init__(
        self,
        pass_id: int,
        model: StagedModel,
        kv: KVCache,
        entries: list[PassEntry],
        granularity: Granularity,
        expert_spans_per_layer: int,
        queued_s: float,
        sampler: Sampler,
        on_unit: UnitObserver | None = None,
        features: PassFeatures | None = None,
    ) -> None:
        """`granularity`: where it stops, decided once as it starts (`Policy.points`). `queued_s`: the longest
        time one of its requests waited before this pass started. `sampler` chooses tokens at its head.
        `features`: what it costs, where the caller already described `entries` (else described here)."""
        self.pass_id = pass_id
        self.entries = entries
        self.granularity = granularity
        self._stops = STOPS[granularity]
        self._sampler = sampler
        self._on_unit = on_unit
        self.expert_spans_per_layer = expert_spans_per_layer
        self.queued_s = queued_s
        self.suspended_s = 0.0
        """Time spent suspended, suspensions that ended so far."""
        self.suspended_at: float | None = None
        self.run_s = 0.0
        """Time its steps took (kept by the engine, which owns the clock)."""
        self._model = model
        self._kv = kv
        self.layer = 0
        self.stage = Stage.EMBED
        self.hidden: torch.Tensor | None = None
        self.result: PassResult | None = None
        """Set by the head: the sampled tokens and log-probabilities."""
        self._work: LayerWork | None = None
        self._units: dict[Stage, Callable[[], None]] = {
            Stage.EMBED: self._embed,
            Stage.ATTENTION: self._attention,
            Stage.ROUTE: self._route,
            Stage.ALL_EXPERTS: self._all_experts,
            Stage.EXPERT_SPAN: self._expert_span,
            Stage.SHARED_EXPERT: self._shared_expert,
            Stage.COMBINE: self._combine,
            Stage.HEAD: self._head,
        }
        self._rope: Rope = None
        self.reshaped = False
        """Requests left or joined it part way: its run time is no measure of the pass it started as."""
        self._set_inputs(features)

    def _set_inputs(self, features: PassFeatures | None = None) -> None:
        device = self._kv.device
        entries = self.entries
        self._token_ids = to_device([t for e in entries for t in e.token_ids], device)
        self._positions = to_device([e.start + i for e in entries for i in range(len(e.token_ids))], device)
        self._batch = self._attention_batch()
        self.features = features_of(entries) if features is None else features

    # ---- what the scheduler sees ---------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """True once the logits are ready."""
        return self.stage is Stage.DONE

    @property
    def at_layer_boundary(self) -> bool:
        """True between layers (before a layer's attention, or before the head)."""
        return self.stage in BOUNDARY_STAGES

    @property
    def num_tokens(self) -> int:
        """New tokens fed by the whole batch."""
        return len(self._token_ids)

    def held_back_s(self, now: float) -> float:
        """How long its requests have been held back: queued before it started, plus time suspended."""
        current = 0.0 if self.suspended_at is None else now - self.suspended_at
        return self.queued_s + self.suspended_s + current

    def info(self, now: float) -> PassInfo:
        """This pass as a policy sees it."""
        held = self.held_back_s(now)
        return pass_info(
            self.entries,
            self._model.num_layers,
            held,
            self.features,
            self.layer,
            self.at_layer_boundary,
            suspended_s=held - self.queued_s,
        )

    def suspend(self, now: float) -> None:
        """Mark it suspended for more urgent work (it keeps every tensor and its KV)."""
        self.suspended_at = now
        for entry in self.entries:
            entry.request.preemptions += 1

    def resume(self, now: float) -> None:
        """Mark it running again; the time suspended counts towards its aging."""
        if self.suspended_at is not None:
            self.suspended_s += now - self.suspended_at
            self.suspended_at = None

    # ---- running -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> int:
        """Run units until the next preemption point of this pass's granularity; returns the units run."""
        ran = 0
        while not self.done:
            self._run_unit()
            ran += 1
            if self._at_preemption_point():
                break
        return ran

    def _at_preemption_point(self) -> bool:
        return self.stage in self._stops or self.done

    def _run_unit(self) -> None:
        if self._on_unit is not None:
            expert = self._work.spans[0].first if self.stage is Stage.EXPERT_SPAN and self._work else -1
            self._on_unit(self, self.layer, self.stage, expert)
        self._units[self.stage]()

    # Units. Each moves the cursor to the next stage.
    def _embed(self) -> None:
        self.hidden, self._rope = self._model.embed(self._token_ids, self._positions)
        self.stage = Stage.ATTENTION

    def _attention(self) -> None:
        assert self.hidden is not None  # noqa: S101
        self.hidden = self._model.attention(self.layer, self.hidden, self._rope, self._batch)
        self.stage = Stage.ROUTE

    def _route(self) -> None:
        assert self.hidden is not None  # noqa: S101
        per_span = self.granularity is Granularity.EXPERT
        self._work = self._model.route(self.layer, self.hidden, self.expert_spans_per_layer if per_span else None)
        if not per_span and self._work.top_k_index is not None:
            self.stage = Stage.ALL_EXPERTS
            return
        self._after_routed_work()

    def _all_experts(self) -> None:
        assert self._work is not None  # noqa: S101
        self._model.all_experts(self.layer, self._work)
        self._after_routed_work()

    def _expert_span(self) -> None:
        assert self._work is not None  # noqa: S101
        self._model.expert_span(self.layer, self._work)
        self._after_routed_work()

    def _after_routed_work(self) -> None:
        assert self._work is not None  # noqa: S101
        if self._work.spans:
            self.stage = Stage.EXPERT_SPAN
        elif self._model.has_shared_expert(self.layer) and self._work.shared_out is None:
            self.stage = Stage.SHARED_EXPERT
        else:
            self.stage = Stage.COMBINE

    def _shared_expert(self) -> None:
        assert self._work is not None  # noqa: S101
        self._model.shared_expert(self.layer, self._work)
        self.stage = Stage.COMBINE

    def _combine(self) -> None:
        assert self._work is not None  # noqa: S101
        self.hidden = self._model.combine(self._work)
        self._work = None
        self.layer += 1
        self.stage = Stage.ATTENTION if self.layer < self._model.num_layers else Stage.HEAD

    def _head(self) -> None:
        """Sample each entry that completes its prompt, gather the log-probabilities asked for, and drop the
        hidden states: what the pass hands on is its `PassResult`."""
        assert self.hidden is not None  # noqa: S101
        self.result = run_head(self.pass_id, self._model, self.hidden, self.entries, self._sampler)
        self.hidden = None
        self.stage = Stage.DONE

    def _attention_batch(self) -> AttentionBatch:
        if all(len(e.token_ids) == 1 for e in self.entries):
            return AttentionBatch.for_decode(
                self._kv, [e.request.request_id for e in self.entries], [e.start for e in self.entries]
            )
        return AttentionBatch.for_runs(
            self._kv, [(e.request.request_id, e.start, len(e.token_ids)) for e in self.entries]
        )

    # ---- changing the batch between layers -------------------------------------------------------------
    def remove(self, request_ids: Collection[str]) -> list[PassEntry]:
        """Take these requests out of the pass, at a layer boundary, with nothing lost for the others; returns
        the entries removed. Their KV may be freed at once: the pass no longer reads or writes it."""
        if not self.at_layer_boundary:
            raise RuntimeError(f"requests can leave a pass only between layers, not at {self.stage.label}")
        keep = [e for e in self.entries if e.request.request_id not in request_ids]
        gone = [e for e in self.entries if e.request.request_id in request_ids]
        if not gone:
            return []
        rows: list[int] = []
        offset = 0
        for e in self.entries:
            if e.request.request_id not in request_ids:
                rows.extend(range(offset, offset + len(e.token_ids)))
            offset += len(e.token_ids)
        self.entries = keep
        self.reshaped = True
        if keep:
            index = to_device(rows, self._kv.device)
            if self.hidden is not None:
                self.hidden = self.hidden.index_select(0, index)
            self._rope = StagedModel.select_rope(self._rope, index)
            self._set_inputs()
        return gone

    def can_merge(self, other: ForwardPass) -> bool:
        """True when both passes stand before the same layer's attention, where `merge` can join them."""
        return self.stage is other.stage is Stage.ATTENTION and self.layer == other.layer

    def merge(self, other: ForwardPass) -> None:
        """Take `other`'s requests into this pass (`can_merge` must hold). `other` is consumed.

        Used to let an LS pass join a suspended BE pass where the BE pass stopped.
        """
        if not self.can_merge(other):
            raise RuntimeError(
                f"passes can merge only before the same layer: {self.stage.label}@{self.layer} "
                f"vs {other.stage.label}@{other.layer}"
            )
        assert self.hidden is not None and other.hidden is not None  # noqa: S101
        self.entries = self.entries + other.entries
        self.reshaped = True
        self.hidden = torch.cat([self.hidden, other.hidden])
        self._rope = StagedModel.cat_rope(self._rope, other._rope)
        self._set_inputs()
        other.stage = Stage.DONE
        other.entries = []
