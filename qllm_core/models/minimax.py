"""MiniMax-01: lightning linear-attention layers (their state through `get_linear_cache`/`set_linear_cache`,
answered by the engine's state slots) between softmax attention ones; each branch's residual is its normed
input times an alpha factor, its output times a beta factor."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from qllm_core.models.adapter import LayerParts, MoEAdapter


class MiniMaxAdapter(MoEAdapter):
    """MiniMax: residuals from the normed inputs, scaled per layer type."""

    model_types = ("minimax",)

    def layer_parts(self, index: int, layer: nn.Module) -> LayerParts:
        """The common parts with the layer's alpha factors on the residuals and its beta on both branches."""
        own: Any = layer
        parts = super().layer_parts(index, layer)
        beta = float(own.attn_beta_factor)
        if beta != float(own.mlp_beta_factor):
            self.refuse(
                f"layer {index} scales its attention and MLP outputs differently; the staged layer has one scale"
            )
        alphas = (float(own.attn_alpha_factor), float(own.mlp_alpha_factor))
        return dataclasses.replace(parts, normed_residual=alphas, residual_scale=None if beta == 1.0 else beta)
