"""Granite-MoE (and its shared-expert and sliding-window variants): scaled embeddings, residual branches
and logits, and in Granite-MoE-Shared a shared MLP kept on the decoder layer beside the MoE block."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from qllm_core.models.adapter import LayerParts, MoEAdapter


class GraniteMoeAdapter(MoEAdapter):
    """Granite-MoE, Granite-MoE-Shared, Granite-MoE-SWA, and Granite-4.0-H (Mamba-2 layers between attention ones)."""

    model_types = ("granitemoe", "granitemoeshared", "granitemoe_swa", "granitemoehybrid")

    def __init__(self, model: nn.Module) -> None:
        """Reads the three multipliers once from the config."""
        super().__init__(model)
        self._embedding_multiplier = float(self.config.embedding_multiplier)
        self._logits_scaling = float(self.config.logits_scaling)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings times `embedding_multiplier`."""
        return self.inner.embed_tokens(token_ids) * self._embedding_multiplier  # type: ignore[no-any-return]

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits divided by `logits_scaling`."""
        return self.model.lm_head(hidden) / self._logits_scaling  # type: ignore[no-any-return]

    def residual_scale(self, layer: nn.Module) -> float | None:
        """`residual_multiplier` on both branches of every layer."""
        return float(layer.residual_multiplier)  # type: ignore[arg-type]

    def layer_parts(self, index: int, layer: nn.Module) -> LayerParts:
        """The layer's `shared_mlp` (Granite-MoE-Shared) is its shared expert."""
        parts = super().layer_parts(index, layer)
        shared = getattr(layer, "shared_mlp", None)
        if shared is None or parts.moe is None:
            return parts
        return dataclasses.replace(parts, moe=dataclasses.replace(parts.moe, shared=shared))
