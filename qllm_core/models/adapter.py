"""The small per-family mapping from a Hugging Face MoE model onto the engine's stages.

A family adapter names where the model keeps its parts and how one expert runs; the staged forward
(`staged.py`) does the rest. Adding a family is one short file that subclasses `MoEAdapter` and is
listed in `registry.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class MoEParts:
    """The MoE half of one decoder layer."""

    gate: nn.Module
    """The model's own router: returns (logits, top-k weights, top-k expert ids)."""
    experts: nn.Module
    """Expert weights (fused 3D `gate_up_proj` / `down_proj` in transformers 5)."""
    num_experts: int
    shared: Callable[[torch.Tensor], torch.Tensor] | None = None
    """A shared expert applied to every token, already gated, or None."""


class MoEAdapter:
    """Default mapping, right for Llama-style decoder stacks (`model.model.layers[i].self_attn/.mlp`)."""

    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        # Transformers modules are dynamically typed; Any keeps attribute access honest about that.
        self.model: Any = model
        self.inner: Any = model.model
        self.config: Any = model.config

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order."""
        return self.inner.layers

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (N,) to hidden states (N, D)."""
        return self.inner.embed_tokens(token_ids)

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin for flat positions (N,), shaped as the attention modules expect (1, N, d)."""
        return self.inner.rotary_emb(hidden.unsqueeze(0), positions.unsqueeze(0))

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The norm before the LM head."""
        return self.inner.norm(hidden)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states to logits."""
        return self.model.lm_head(hidden)

    def moe_parts(self, layer: nn.Module) -> MoEParts | None:
        """The layer's router and experts, or None for a dense layer."""
        mlp: Any = layer.mlp
        if not hasattr(mlp, "experts"):
            return None
        return MoEParts(gate=mlp.gate, experts=mlp.experts, num_experts=int(mlp.experts.num_experts))

    def dense_mlp(self, layer: nn.Module) -> nn.Module:
        """The MLP of a layer without experts."""
        return layer.mlp  # type: ignore[return-value]

    @staticmethod
    def expert_weights(experts: Any) -> list[tuple[torch.Tensor, ...]]:
        """Each expert's weights as views of the fused parameters (no copy), taken once at load so that
        an expert's step does not index them again."""
        return list(zip(experts.gate_up_proj.unbind(0), experts.down_proj.unbind(0), strict=True))

    @staticmethod
    def run_expert(experts: Any, weights: tuple[torch.Tensor, ...], hidden: torch.Tensor) -> torch.Tensor:
        """One expert (its `expert_weights`) on its routed tokens, exactly as transformers' eager loop."""
        gate_up, down = weights
        gate, up = nn.functional.linear(hidden, gate_up).chunk(2, dim=-1)
        return nn.functional.linear(experts.act_fn(gate) * up, down)

    @staticmethod
    def run_experts_grouped(
        experts: Any, first: int, end: int, hidden: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor:
        """Experts [first, end) on their rows (grouped by expert, `offsets` ending each group) through one
        `grouped_mm` per projection, as transformers' default kernel runs a whole layer's experts."""
        gate_up = experts.gate_up_proj[first:end].transpose(-2, -1)
        gate, up = nn.functional.grouped_mm(hidden, gate_up, offs=offsets).chunk(2, dim=-1)
        down = experts.down_proj[first:end].transpose(-2, -1)
        return nn.functional.grouped_mm(experts.act_fn(gate) * up, down, offs=offsets)

    @staticmethod
    def run_experts_batched(experts: Any, padded: torch.Tensor) -> torch.Tensor:
        """Every expert on its rows, padded to one length, (experts, rows, hidden) -> same: one batched
        matrix product per projection, which a multi-core CPU spreads over the experts."""
        gate, up = torch.bmm(padded, experts.gate_up_proj.transpose(-2, -1)).chunk(2, dim=-1)
        return torch.bmm(experts.act_fn(gate) * up, experts.down_proj.transpose(-2, -1))

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads per layer (the KV cache's width)."""
        return int(self.config.num_key_value_heads)

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        return int(getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads)
