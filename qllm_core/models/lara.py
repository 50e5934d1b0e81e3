"""Lara-Mini: Gated DeltaNet layers between softmax attention ones, where only the sliding-window layers
take the rotary embedding (its full-attention layers are NoPE)."""

from __future__ import annotations

import dataclasses

from torch import nn

from qllm_core.models.adapter import LayerParts, MoEAdapter


class LaraMiniAdapter(MoEAdapter):
    """Lara-Mini: the rotary embedding goes to `sliding_attention` layers only, as its model's forward does."""

    model_types = ("lara_mini",)

    def layer_parts(self, index: int, layer: nn.Module) -> LayerParts:
        """The common parts, without the rotary embedding outside sliding-window layers."""
        parts = super().layer_parts(index, layer)
        return dataclasses.replace(parts, rope=self.config.layer_types[index] == "sliding_attention")
