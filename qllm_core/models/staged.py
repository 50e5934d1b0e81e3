"""The model cut into stages that the engine runs one at a time, reusing the model's own modules.

Per decoder layer: attention, routing, the routed experts (all at once through the model's own experts
module, or span by span in ascending id order), the shared expert if any, then the combine (norms,
scales and the residual add). The arithmetic mirrors the model's own forward, so the engine's output is
the model's; `probe.py` checks that at load.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import torch

from qllm_core.cache import KVLayout
from qllm_core.models.adapter import LayerParts, MoEAdapter, Rope
from qllm_core.models.attention import AttentionBatch
from qllm_core.models.experts import ExpertKernel
from qllm_core.models.recurrent import run_recurrent
from qllm_core.state_pool import StateLayout


@dataclass
class LayerWork:
    """The MoE half of one layer in progress: everything a pass paused between experts must keep."""

    parts: LayerParts
    residual: torch.Tensor
    normed: torch.Tensor
    top_k_index: torch.Tensor | None
    top_k_weights: torch.Tensor | None
    out: torch.Tensor
    """Routed-expert output accumulated so far (or the dense MLP's output)."""
    shared_out: torch.Tensor | None = None
    spans: list[ExpertSpan] = field(default_factory=list)
    """Expert spans not yet run, ascending (span-by-span execution only)."""


@dataclass(frozen=True)
class ExpertSpan:
    """Experts [first, end) as one unit: their (token, slot) rows expert by expert, each expert's in the
    order transformers' eager loop visits them, with input rows and routing weights gathered."""

    first: int
    end: int
    sizes: tuple[int, ...]
    """Rows of each expert in [first, end) (zero for an expert no token chose)."""
    offsets: torch.Tensor | None
    """int32 running row count at each expert's end, the group offsets of `grouped_mm`; None for a span of
    one expert, which runs as plain matrix products."""
    tokens: torch.Tensor
    inputs: torch.Tensor
    weights: torch.Tensor
    """Shaped (rows, 1)."""


def split_experts(sizes: list[int], units: int) -> list[tuple[int, int]]:
    """Expert ranges [first, end) to run as at most `units` units, covering every hit expert: one per hit
    expert when they are no more than `units`, else consecutive ranges of about equal rows (a unit's
    time, and so the wait at a preemption point, scales with its rows)."""
    hit = [e for e, n in enumerate(sizes) if n]
    if len(hit) <= units:
        return [(e, e + 1) for e in hit]
    total, done, cut = sum(sizes), 0, 1
    ranges: list[tuple[int, int]] = []
    first: int | None = None
    for e in hit:
        first = e if first is None else first
        done += sizes[e]
        if done * units >= cut * total:  # this expert reaches the next 1/units of the rows
            ranges.append((first, e + 1))
            first = None
            while cut <= units and done * units >= cut * total:
                cut += 1
    return ranges


def _expert_counts(flat_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Rows routed to each expert, plus a last count for index `num_experts` (a token routed nowhere).
    A scatter-add, not `bincount`, whose output size depends on the data (a host read on CUDA)."""
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat_index.device)
    return counts.scatter_add_(0, flat_index, torch.ones_like(flat_index))


def group_by_expert(
    normed: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, num_experts: int, units: int
) -> list[ExpertSpan]:
    """A layer's routing (tokens, k) grouped by hit expert into at most `units` spans (`split_experts`);
    rows and weights are gathered for all experts at once, so a span's step only computes. One host
    read, for the group sizes."""
    # The eager loop visits an expert's tokens slot by slot, token by token (torch.where over its (k,
    # tokens) mask). Flattening the routing slot-major and sorting it stably by expert gives every
    # expert's hits in exactly that order, with no data-dependent shape (nonzero would sync on CUDA). As
    # in that loop, index `num_experts` (a token routed nowhere) gets a group of its own and is left out.
    tokens_n = index.shape[0]
    flat = index.t().reshape(-1)
    order = torch.argsort(flat, stable=True)
    tokens = order % tokens_n
    counts = _expert_counts(flat, num_experts)
    sizes = counts.tolist()
    starts = [0, *itertools.accumulate(sizes)]
    ends = counts.cumsum(0)
    # index_select, not advanced indexing: the same gather at a quarter of the time on a CPU.
    inputs = normed.index_select(0, tokens)
    row_weights = weights.t().reshape(-1).index_select(0, order)[:, None]  # slot-major, as `flat`
    spans = []
    for first, end in split_experts(sizes[:num_experts], units):
        rows = slice(starts[first], starts[end])
        offsets = (ends[first:end] - starts[first]).to(torch.int32) if end - first > 1 else None
        spans.append(
            ExpertSpan(first, end, tuple(sizes[first:end]), offsets, tokens[rows], inputs[rows], row_weights[rows])
        )
    return spans


# At most this many rows per expert for the batched CPU kernel (`batched_experts`): beyond it, measured on a
# 2-core CPU (bench preset), grouped_mm is as fast or faster.
_BATCHED_MAX_ROWS = 32
# At most this many (token, slot) rows for `ExpertKernel.few_rows` on a CPU: measured on 2 cores (bench preset,
# one thread), 1.4x faster than grouped_mm for a lone decode, even at 4 rows, and slower than
# `batched_experts` at 16.
FEW_ROWS = 4


def batched_experts(
    kernel: ExpertKernel, normed: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor | None:
    """A layer's routed experts as one padded batched product per projection, when every expert has a few
    rows (a decode batch): on a CPU that beats grouped_mm, which runs such small groups one after the
    other (measured on 2 cores: 1.14-1.25x at 16 to 64 rows over 8 experts). None when it would not pay
    (an expert with no rows, whose weights would be read for nothing, or many rows) or when the experts
    are not of the standard layout.

    Rows are sorted, gathered, weighted and summed over the top-k slots as transformers' grouped_mm path
    does, so only the matrix products differ from it (rounding: 1e-6 in float32)."""
    if not kernel.standard:
        return None
    num_experts, k = kernel.num_experts, index.shape[1]
    sorted_ids, perm = torch.sort(index.reshape(-1))
    counts = _expert_counts(sorted_ids, num_experts)[:num_experts]
    sizes = counts.tolist()
    if len(perm) != sum(sizes) or min(sizes) == 0 or max(sizes) > _BATCHED_MAX_ROWS:  # unrouted rows too
        return None
    position = torch.arange(len(perm), device=index.device) - (counts.cumsum(0) - counts)[sorted_ids]
    padded = normed.new_zeros(num_experts, max(sizes), normed.shape[-1])
    padded[sorted_ids, position] = normed[perm // k]
    rows = kernel.batched(padded)[sorted_ids, position] * weights.reshape(-1)[perm, None]
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm), device=perm.device)
    return rows[inverse].view(index.shape[0], k, -1).sum(dim=1).to(normed.dtype)  # type: ignore[no-any-return]


class StagedModel:
    """Stage functions over one loaded model. Holds no per-pass state."""

    def __init__(self, adapter: MoEAdapter, grouped: bool, layout: KVLayout, state: StateLayout | None = None) -> None:
        """`grouped`: the model's default kernel (grouped_mm) runs its experts, and a span of several
        experts runs through one `grouped_mm` per projection; else (float64, which has no such kernel) the
        eager loop runs them. A span of one expert, and every span in float64, runs expert by expert with
        the eager loop's arithmetic. `layout`: one token's KV in each layer (`probe.kv_layout`); `state`: each
        layer's recurrent state (`probe.state_layout`), whose layers' token mixers run as recurrent ones."""
        self.adapter = adapter
        self.grouped = grouped
        self.layers = adapter.layers
        self.parts: list[LayerParts] = [adapter.layer_parts(i, layer) for i, layer in enumerate(self.layers)]
        self.layout = layout
        """Set again by the loader once the parts tell which layers run softmax attention."""
        self.state = state
        if state is not None:
            self.parts = [replace(p, recurrent=s is not None) for p, s in zip(self.parts, state.layers, strict=True)]

    @property
    def num_layers(self) -> int:
        """Decoder layers."""
        return len(self.layers)

    def kv_layout(self) -> KVLayout:
        """The shape of one token's KV in every layer, for the engine's KV pool."""
        return self.layout

    def has_shared_expert(self, layer: int) -> bool:
        """True when the layer has a shared expert stage."""
        moe = self.parts[layer].moe
        return moe is not None and moe.shared is not None

    def embed(self, token_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, Rope]:
        """Embeddings and the rotary embedding (opaque to the engine) for a flat batch."""
        hidden = self.adapter.embed(token_ids)
        return hidden, self.adapter.rotary(hidden, positions)

    @staticmethod
    def cat_rope(first: Rope, second: Rope) -> Rope:
        """Two passes' rotary embeddings as one, the first's tokens first (for a merge of two passes)."""
        if isinstance(first, torch.Tensor):
            return torch.cat([first, second], dim=1)  # tokens are dim 1: the attention modules' batch of one
        if first is None:
            return None
        return tuple(StagedModel.cat_rope(a, b) for a, b in zip(first, second, strict=True))

    @staticmethod
    def select_rope(rope: Rope, rows: torch.Tensor) -> Rope:
        """The rotary embedding of some of a pass's tokens (`rows`, in order), for requests leaving a pass."""
        if isinstance(rope, torch.Tensor):
            return rope.index_select(1, rows)
        if rope is None:
            return None
        return tuple(StagedModel.select_rope(part, rows) for part in rope)

    def attention(self, layer: int, hidden: torch.Tensor, rope: Rope, batch: AttentionBatch) -> torch.Tensor:
        """Norm, the model's attention module over the paged cache, norm and scale of its output, residual add."""
        p = self.parts[layer]
        if p.attn is None:  # a layer without a token mixer (Nemotron-H's MLP-only layers)
            return hidden
        normed = hidden if p.attn_norm is None else p.attn_norm(hidden)
        if p.recurrent:
            out = run_recurrent(p.attn, layer, normed, batch)
        else:
            out = p.attn(
                hidden_states=normed.unsqueeze(0),
                position_embeddings=None if not p.rope else rope if p.rope_index is None else rope[p.rope_index],
                attention_mask=None,
                qllm_batch=batch,
                **p.attn_kwargs,
            )[0][0]
        if p.attn_out_norm is not None:
            out = p.attn_out_norm(out)
        if p.normed_residual is not None:  # MiniMax: the stream goes on from the normed input, times alpha
            hidden = normed * p.normed_residual[0]
        hidden = hidden + (out if p.residual_scale is None else out * p.residual_scale)
        if p.parallel:  # the MLP reads the attention's input: carried beside the residual to `route`
            return torch.cat([hidden, normed], dim=-1)
        return hidden  # type: ignore[no-any-return]

    def route(self, layer: int, hidden: torch.Tensor, expert_units: int | None) -> LayerWork:
        """Pre-MLP norm and the model's own router (or, for a dense layer, its whole MLP).

        `expert_units` splits the routed experts into at most that many spans, run one per step; that
        costs one device-to-host read (transformers' eager loop pays the same). None runs them all at
        once, with no host read.
        """
        p = self.parts[layer]
        if p.parallel:
            hidden, normed = hidden.chunk(2, dim=-1)
        else:
            normed = hidden if p.mlp_norm is None else p.mlp_norm(hidden)
        if p.normed_residual is not None:
            hidden = normed * p.normed_residual[1]
        moe = p.moe
        if moe is None:  # a dense MLP, or none (a layer of a token mixer only): its output is zero
            out = torch.zeros_like(normed) if p.dense is None else p.dense(normed)
            return LayerWork(p, hidden, normed, None, None, out)
        _, weights, index = moe.router(normed, *moe.router_args)[:3]
        if expert_units is None:
            return LayerWork(p, hidden, normed, index, weights, normed)
        spans = group_by_expert(normed, index, weights, moe.num_experts, expert_units)
        return LayerWork(p, hidden, normed, index, weights, torch.zeros_like(normed), spans=spans)

    def all_experts(self, layer: int, work: LayerWork) -> None:
        """Every routed expert at once: through the model's own experts module (its configured kernel), or
        on a CPU, for a decode-sized layer, `batched_experts`."""
        moe = self.parts[layer].moe
        assert moe is not None and work.top_k_index is not None and work.top_k_weights is not None  # noqa: S101
        if self.grouped and work.normed.device.type == "cpu":
            if work.top_k_index.numel() <= FEW_ROWS:
                work.out = moe.kernel.few_rows(work.normed, work.top_k_index, work.top_k_weights)
                return
            out = batched_experts(moe.kernel, work.normed, work.top_k_index, work.top_k_weights)
            if out is not None:
                work.out = out
                return
        work.out = moe.experts(work.normed, work.top_k_index, work.top_k_weights)

    def expert_span(self, layer: int, work: LayerWork) -> int:
        """Run the next span of experts on its rows and add their weighted output; returns its first expert.
        A span of several experts runs through `grouped_mm` (when the model's kernel is grouped); a span of
        one, or any span in float64, runs expert by expert with the eager loop's arithmetic."""
        moe = self.parts[layer].moe
        assert moe is not None  # noqa: S101
        kernel = moe.kernel
        span = work.spans.pop(0)
        if self.grouped and span.offsets is not None:
            states = kernel.grouped(span.first, span.end, span.inputs, span.offsets)
            work.out.index_add_(0, span.tokens, (states * span.weights).to(work.out.dtype))
            return span.first
        start = 0
        for expert, size in enumerate(span.sizes, span.first):
            if not size:
                continue
            rows = slice(start, start + size)
            start += size
            states = kernel.one(expert, span.inputs[rows]) * span.weights[rows]
            work.out.index_add_(0, span.tokens[rows], states.to(work.out.dtype))  # routing weights may be float32
        return span.first

    def shared_expert(self, layer: int, work: LayerWork) -> None:
        """The shared expert (gated or not) on every token of the layer."""
        moe = self.parts[layer].moe
        assert moe is not None and moe.shared is not None  # noqa: S101
        work.shared_out = moe.shared(work.normed)

    @staticmethod
    def combine(work: LayerWork) -> torch.Tensor:
        """The MLP's output (routed experts times their scale, plus the shared expert), its norm and scale,
        added to the residual stream."""
        p = work.parts
        out = work.out
        if p.moe is not None and p.moe.routed_scale is not None:
            out = out * p.moe.routed_scale
        if p.moe is not None and p.moe.routed_norm is not None:
            out = p.moe.routed_norm(out)
        if work.shared_out is not None:
            out = out + work.shared_out
        if p.mlp_out_norm is not None:
            out = p.mlp_out_norm(out)
        hidden = work.residual + (out if p.residual_scale is None else out * p.residual_scale)
        return hidden if p.output_scale is None else hidden * p.output_scale

    def head(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head on the rows whose next token is wanted."""
        # index_select, not advanced indexing: the same gather, cheaper on a CPU.
        return self.adapter.lm_head(self.adapter.final_norm(hidden.index_select(0, rows)))
