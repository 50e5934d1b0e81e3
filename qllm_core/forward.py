"""A forward pass over one batch as a resumable object: `step()` runs it to its next preemption point.

The pass keeps everything it needs to stop anywhere and resume with nothing recomputed: the flat
hidden states, RoPE tables, attention metadata, and inside an MoE layer the residual, routing and the
partial expert output. Its cursor is an explicit state machine over `Stage`.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qllm_core.cache import KVCache
from qllm_core.config import Granularity
from qllm_core.models.attention import AttentionBatch, SeqSlice
from qllm_core.models.staged import LayerWork, StagedModel
from qllm_core.request import PriorityClass, Request
from qllm_core.transfer import to_device


class Stage(enum.Enum):
    """Where a pass stands: the next unit of work it will run."""

    EMBED = "embed"
    ATTENTION = "attention"
    ROUTE = "route"
    EXPERTS = "experts"  # all routed experts of a layer in one unit (layer and iteration granularity)
    EXPERT = "expert"  # one routed expert (expert granularity)
    SHARED_EXPERT = "shared_expert"
    COMBINE = "combine"
    HEAD = "head"
    DONE = "done"


@dataclass(frozen=True)
class PassEntry:
    """One request's part of a pass: the tokens it feeds, starting at position `start`."""

    request: Request
    start: int
    token_ids: tuple[int, ...]


def _describe(entries: list[PassEntry]) -> tuple[frozenset[PriorityClass], bool]:
    """The classes in a batch, and whether an LS request in it is prefilling (its TTFT waits on the pass)."""
    classes = frozenset(e.request.priority for e in entries)
    ls_prefill = any(e.request.priority is PriorityClass.LATENCY_SENSITIVE and len(e.token_ids) > 1 for e in entries)
    return classes, ls_prefill


class ForwardPass:
    """One forward pass over a batch, run stage by stage."""

    def __init__(
        self,
        pass_id: int,
        model: StagedModel,
        kv: KVCache,
        entries: list[PassEntry],
        granularity: Granularity,
        expert_units: int,
    ) -> None:
        """`expert_units`: at expert granularity, the most steps a layer's routed experts take."""
        self.pass_id = pass_id
        self.entries = entries
        self.granularity = granularity
        self.expert_units = expert_units
        self._model = model
        self._kv = kv
        self.layer = 0
        self.stage = Stage.EMBED
        self.hidden: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self._work: LayerWork | None = None
        self.executed: Counter[tuple[int, Stage, int]] = Counter()
        """How often each (layer, stage, expert) unit ran: every unit must run exactly once."""
        self.suspended_s = 0.0
        self.queued_s = 0.0
        """Longest time one of its requests waited before this pass started (set by the engine)."""
        self._units: dict[Stage, Callable[[], None]] = {
            Stage.EMBED: self._embed,
            Stage.ATTENTION: self._attention,
            Stage.ROUTE: self._route,
            Stage.EXPERTS: self._all_experts,
            Stage.EXPERT: self._expert,
            Stage.SHARED_EXPERT: self._shared_expert,
            Stage.COMBINE: self._combine,
            Stage.HEAD: self._head,
        }
        device = kv.device
        ids = [t for e in entries for t in e.token_ids]
        positions = [e.start + i for e in entries for i in range(len(e.token_ids))]
        self._token_ids = to_device(ids, device)
        self._positions = to_device(positions, device)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self._batch = self._attention_batch()
        self.classes, self.ls_prefill = _describe(entries)

    @property
    def done(self) -> bool:
        """True once the logits are ready."""
        return self.stage is Stage.DONE

    @property
    def at_layer_boundary(self) -> bool:
        """True between layers (before a layer's attention, or before the head)."""
        return self.stage in (Stage.EMBED, Stage.ATTENTION, Stage.HEAD)

    @property
    def num_tokens(self) -> int:
        """New tokens fed by the whole batch."""
        return len(self._token_ids)

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
        if self.done or self.granularity is Granularity.EXPERT:
            return True
        if self.granularity is Granularity.LAYER:
            return self.stage in (Stage.ATTENTION, Stage.HEAD)
        return False

    def _run_unit(self) -> None:
        expert = self._work.spans[0].first if self.stage is Stage.EXPERT and self._work else -1
        self.executed[(self.layer, self.stage, expert)] += 1
        self._units[self.stage]()

    # Units. Each moves the cursor to the next stage.
    def _embed(self) -> None:
        self.hidden, self._rope = self._model.embed(self._token_ids, self._positions)
        self.stage = Stage.ATTENTION

    def _attention(self) -> None:
        assert self.hidden is not None and self._rope is not None  # noqa: S101
        self.hidden = self._model.attention(self.layer, self.hidden, self._rope, self._batch)
        self.stage = Stage.ROUTE

    def _route(self) -> None:
        assert self.hidden is not None  # noqa: S101
        per_span = self.granularity is Granularity.EXPERT
        self._work = self._model.route(self.layer, self.hidden, self.expert_units if per_span else None)
        if not per_span and self._work.top_k_index is not None:
            self.stage = Stage.EXPERTS
            return
        self._after_routed_work()

    def _all_experts(self) -> None:
        assert self._work is not None  # noqa: S101
        self._model.all_experts(self.layer, self._work)
        self._after_routed_work()

    def _expert(self) -> None:
        assert self._work is not None  # noqa: S101
        self._model.expert_span(self.layer, self._work)
        self._after_routed_work()

    def _after_routed_work(self) -> None:
        assert self._work is not None  # noqa: S101
        if self._work.spans:
            self.stage = Stage.EXPERT
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
        assert self.hidden is not None  # noqa: S101
        ends = []
        offset = 0
        for e in self.entries:
            offset += len(e.token_ids)
            ends.append(offset - 1)
        rows = to_device(ends, self.hidden.device)
        self.logits = self._model.head(self.hidden, rows)
        self.hidden = None
        self.stage = Stage.DONE

    def _attention_batch(self) -> AttentionBatch:
        if all(len(e.token_ids) == 1 for e in self.entries):
            return AttentionBatch.for_decode(
                self._kv, [e.request.request_id for e in self.entries], [e.start for e in self.entries]
            )
        seqs = []
        writes = []
        offset = 0
        for e in self.entries:
            rid, n = e.request.request_id, len(e.token_ids)
            seqs.append(SeqSlice(offset, n, self._kv.slots(rid, 0, e.start + n)))
            writes.append(self._kv.slots(rid, e.start, e.start + n))
            offset += n
        return AttentionBatch.for_sequences(self._kv, tuple(seqs), torch.cat(writes))

    def merge(self, other: ForwardPass) -> None:
        """Take `other`'s requests into this pass; both must stand before the same layer's attention.

        Used to let an LS pass join a suspended BE pass where the BE pass stopped. `other` is consumed.
        """
        if not (self.stage is other.stage is Stage.ATTENTION and self.layer == other.layer):
            raise RuntimeError(
                f"passes can merge only before the same layer: {self.stage.value}@{self.layer} "
                f"vs {other.stage.value}@{other.layer}"
            )
        assert self.hidden is not None and other.hidden is not None  # noqa: S101
        assert self._rope is not None and other._rope is not None  # noqa: S101
        self.entries = self.entries + other.entries
        self.hidden = torch.cat([self.hidden, other.hidden])
        self._rope = (torch.cat([self._rope[0], other._rope[0]], 1), torch.cat([self._rope[1], other._rope[1]], 1))
        self._token_ids = torch.cat([self._token_ids, other._token_ids])
        self._positions = torch.cat([self._positions, other._positions])
        self._batch = self._attention_batch()
        self.classes, self.ls_prefill = _describe(self.entries)
        other.stage = Stage.DONE
        other.entries = []
