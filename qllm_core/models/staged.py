"""The model cut into stages that the engine runs one at a time, reusing the model's own modules.

Per decoder layer: attention, routing, each hit expert in ascending id order (as transformers' eager
loop), the shared expert if any, then the combine (residual add). The arithmetic mirrors the model's
own forward operation for operation, so the engine's output is the model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

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
    groups: dict[int, ExpertGroup] = field(default_factory=dict)
    """Hit experts not yet run, ascending, with their work (one-at-a-time execution only)."""


@dataclass(frozen=True)
class ExpertGroup:
    """One expert's share of a layer's routing: its tokens, their input rows and routing weights."""

    tokens: torch.Tensor
    inputs: torch.Tensor
    weights: torch.Tensor
    """Shaped (tokens, 1)."""


def group_by_expert(
    normed: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, num_experts: int
) -> dict[int, ExpertGroup]:
    """A layer's routing (tokens, k) grouped by hit expert, ascending, each group in the order transformers'
    eager loop visits its tokens; rows and weights are gathered for all experts at once, so an expert's
    step only computes. One host read, for the group sizes."""
    # The eager loop visits an expert's tokens slot by slot, token by token (torch.where over its (k,
    # tokens) mask). Flattening the routing slot-major and sorting it stably by expert gives every
    # expert's hits in exactly that order, with no data-dependent shape (nonzero would sync on CUDA). As
    # in that loop, index `num_experts` (a token routed nowhere) gets a group of its own and is left out.
    tokens_n = index.shape[0]
    flat = index.t().reshape(-1)
    order = torch.argsort(flat, stable=True)
    slots, tokens = order // tokens_n, order % tokens_n
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=index.device)
    sizes = counts.scatter_add_(0, flat, torch.ones_like(flat)).tolist()
    parts = zip(
        tokens.split(sizes), normed[tokens].split(sizes), weights[tokens, slots, None].split(sizes), strict=True
    )
    return {e: ExpertGroup(*group) for e, group in enumerate(parts) if e < num_experts and sizes[e]}


class StagedModel:
    """Stage functions over one loaded model. Holds no per-pass state."""

    def __init__(self, adapter: MoEAdapter) -> None:
        self.adapter = adapter
        self.layers = list(adapter.layers)
        self.parts: list[MoEParts | None] = [adapter.moe_parts(layer) for layer in self.layers]
        self._expert_weights = [None if p is None else adapter.expert_weights(p.experts) for p in self.parts]

    @property
    def num_layers(self) -> int:
        """Decoder layers."""
        return len(self.layers)

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

    def route(self, layer: int, hidden: torch.Tensor, per_expert: bool) -> LayerWork:
        """Post-attention norm and the model's own router (or, for a dense layer, its whole MLP).

        `per_expert` lists the hit experts for one-at-a-time execution; that costs one device-to-host read
        (transformers' eager loop pays the same), which whole-layer execution avoids.
        """
        module: nn.Module = self.layers[layer]
        normed = module.post_attention_layernorm(hidden)  # type: ignore[operator]
        parts = self.parts[layer]
        if parts is None:
            dense = self.adapter.dense_mlp(module)(normed)
            return LayerWork(hidden, normed, None, None, dense)
        _, weights, index = parts.gate(normed)
        if not per_expert:
            return LayerWork(hidden, normed, index, weights, normed)
        groups = group_by_expert(normed, index, weights, parts.num_experts)
        return LayerWork(hidden, normed, index, weights, torch.zeros_like(normed), groups=groups)

    def all_experts(self, layer: int, work: LayerWork) -> None:
        """Every routed expert at once through the model's own experts module (its configured kernel)."""
        parts = self.parts[layer]
        assert parts is not None  # noqa: S101
        work.out = parts.experts(work.normed, work.top_k_index, work.top_k_weights)

    def expert(self, layer: int, work: LayerWork) -> int:
        """Run the next hit expert on its tokens and add its weighted output; returns its id."""
        parts, weights = self.parts[layer], self._expert_weights[layer]
        assert parts is not None and weights is not None  # noqa: S101
        expert = next(iter(work.groups))
        group = work.groups.pop(expert)
        states = self.adapter.run_expert(parts.experts, weights[expert], group.inputs) * group.weights
        work.out.index_add_(0, group.tokens, states.to(work.out.dtype))  # routing weights may be float32
        return expert

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
