"""The model cut into stages that the engine runs one at a time, reusing the model's own modules.

Per decoder layer: attention, routing, the routed experts (all at once through the model's own experts
module, or span by span in ascending id order), the shared expert if any, then the combine (residual
add). The arithmetic mirrors the model's own forward, so the engine's output is the model's.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from qllm_core.cache import KVLayout
from qllm_core.models.adapter import MoEAdapter, MoEParts
from qllm_core.models.attention import AttentionBatch


@dataclass
class LayerWork:
    """The MoE half of one layer in progress: everything a pass paused between experts must keep."""

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


def batched_experts(
    adapter: MoEAdapter, experts: nn.Module, normed: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor | None:
    """A layer's routed experts as one padded batched product per projection, when every expert has a few
    rows (a decode batch): on a CPU that beats grouped_mm, which runs such small groups one after the
    other (measured on 2 cores: 1.14-1.25x at 16 to 64 rows over 8 experts). None when it would not pay:
    an expert with no rows (its weights would be read for nothing) or many rows.

    Rows are sorted, gathered, weighted and summed over the top-k slots as transformers' grouped_mm path
    does, so only the matrix products differ from it (rounding: 1e-6 in float32)."""
    num_experts, k = int(experts.num_experts), index.shape[1]  # type: ignore[arg-type]
    sorted_ids, perm = torch.sort(index.reshape(-1))
    counts = _expert_counts(sorted_ids, num_experts)[:num_experts]
    sizes = counts.tolist()
    if len(perm) != sum(sizes) or min(sizes) == 0 or max(sizes) > _BATCHED_MAX_ROWS:  # unrouted rows too
        return None
    position = torch.arange(len(perm), device=index.device) - (counts.cumsum(0) - counts)[sorted_ids]
    padded = normed.new_zeros(num_experts, max(sizes), normed.shape[-1])
    padded[sorted_ids, position] = normed[perm // k]
    rows = adapter.run_experts_batched(experts, padded)[sorted_ids, position] * weights.reshape(-1)[perm, None]
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm), device=perm.device)
    return rows[inverse].view(index.shape[0], k, -1).sum(dim=1).to(normed.dtype)  # type: ignore[no-any-return]


class StagedModel:
    """Stage functions over one loaded model. Holds no per-pass state."""

    def __init__(self, adapter: MoEAdapter, grouped: bool) -> None:
        """`grouped`: the model's default kernel (grouped_mm) runs its experts, and a span of several
        experts runs through one `grouped_mm` per projection; else (float64, which has no such kernel) the
        eager loop runs them. A span of one expert, and every span in float64, runs expert by expert with
        the eager loop's arithmetic."""
        self.adapter = adapter
        self.grouped = grouped
        self.layers = list(adapter.layers)
        self.parts: list[MoEParts | None] = [adapter.moe_parts(layer) for layer in self.layers]
        # Per-expert views of the fused weights (no copy), for spans run with the eager loop's arithmetic.
        self._expert_weights = [[] if p is None else adapter.expert_weights(p.experts) for p in self.parts]

    @property
    def num_layers(self) -> int:
        """Decoder layers."""
        return len(self.layers)

    def kv_layout(self) -> KVLayout:
        """The shape of one token's KV in every layer, for the engine's KV pool."""
        a = self.adapter
        return KVLayout(self.num_layers, a.num_kv_heads, a.head_dim, a.head_dim)

    def has_shared_expert(self, layer: int) -> bool:
        """True when the layer has a shared expert stage."""
        parts = self.parts[layer]
        return parts is not None and parts.shared is not None

    def embed(
        self, token_ids: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Embeddings and RoPE tables for a flat batch."""
        hidden = self.adapter.embed(token_ids)
        return hidden, self.adapter.rotary(hidden, positions)

    def attention(
        self, layer: int, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: AttentionBatch
    ) -> torch.Tensor:
        """Input norm, the model's attention module over the paged cache, residual add."""
        module: nn.Module = self.layers[layer]
        normed = module.input_layernorm(hidden)  # type: ignore[operator]
        attn_out, _ = module.self_attn(  # type: ignore[operator]
            hidden_states=normed.unsqueeze(0), position_embeddings=rope, attention_mask=None, qllm_batch=batch
        )
        return hidden + attn_out[0]  # type: ignore[no-any-return]

    def route(self, layer: int, hidden: torch.Tensor, expert_units: int | None) -> LayerWork:
        """Post-attention norm and the model's own router (or, for a dense layer, its whole MLP).

        `expert_units` splits the routed experts into at most that many spans, run one per step; that
        costs one device-to-host read (transformers' eager loop pays the same). None runs them all at
        once, with no host read.
        """
        module: nn.Module = self.layers[layer]
        normed = module.post_attention_layernorm(hidden)  # type: ignore[operator]
        parts = self.parts[layer]
        if parts is None:
            dense = self.adapter.dense_mlp(module)(normed)
            return LayerWork(hidden, normed, None, None, dense)
        _, weights, index = parts.gate(normed)
        if expert_units is None:
            return LayerWork(hidden, normed, index, weights, normed)
        spans = group_by_expert(normed, index, weights, parts.num_experts, expert_units)
        return LayerWork(hidden, normed, index, weights, torch.zeros_like(normed), spans=spans)

    def all_experts(self, layer: int, work: LayerWork) -> None:
        """Every routed expert at once: through the model's own experts module (its configured kernel), or
        on a CPU, for a decode-sized layer, `batched_experts`."""
        parts = self.parts[layer]
        assert parts is not None and work.top_k_index is not None and work.top_k_weights is not None  # noqa: S101
        if self.grouped and work.normed.device.type == "cpu":
            out = batched_experts(self.adapter, parts.experts, work.normed, work.top_k_index, work.top_k_weights)
            if out is not None:
                work.out = out
                return
        work.out = parts.experts(work.normed, work.top_k_index, work.top_k_weights)

    def expert_span(self, layer: int, work: LayerWork) -> int:
        """Run the next span of experts on its rows and add their weighted output; returns its first expert.
        A span of several experts runs through `grouped_mm` (when the model's kernel is grouped); a span of
        one, or any span in float64, runs expert by expert with the eager loop's arithmetic."""
        parts = self.parts[layer]
        assert parts is not None  # noqa: S101
        span = work.spans.pop(0)
        if self.grouped and span.offsets is not None:
            states = self.adapter.run_experts_grouped(parts.experts, span.first, span.end, span.inputs, span.offsets)
            work.out.index_add_(0, span.tokens, (states * span.weights).to(work.out.dtype))
            return span.first
        start = 0
        for expert, size in enumerate(span.sizes, span.first):
            if not size:
                continue
            rows = slice(start, start + size)
            start += size
            expert_weights = self._expert_weights[layer][expert]
            states = self.adapter.run_expert(parts.experts, expert_weights, span.inputs[rows]) * span.weights[rows]
            work.out.index_add_(0, span.tokens[rows], states.to(work.out.dtype))  # routing weights may be float32
        return span.first

    def shared_expert(self, layer: int, work: LayerWork) -> None:
        """The gated shared expert (Qwen2-MoE)."""
        parts = self.parts[layer]
        assert parts is not None and parts.shared is not None  # noqa: S101
        work.shared_out = parts.shared(work.normed)

    @staticmethod
    def combine(work: LayerWork) -> torch.Tensor:
        """Add the MoE output (and shared expert) to the residual stream."""
        moe = work.out if work.shared_out is None else work.out + work.shared_out
        return work.residual + moe

    def head(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head on the rows whose next token is wanted."""
        return self.adapter.lm_head(self.adapter.final_norm(hidden[rows]))
