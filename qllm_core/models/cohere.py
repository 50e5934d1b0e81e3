"""Cohere2-MoE: parallel blocks (attention and the MoE read the same normed input, and both outputs join
the residual at once) and logits scaled by `logit_scale`."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from qllm_core.models.adapter import LayerParts, MoEAdapter


class Cohere2MoeAdapter(MoEAdapter):
    """Cohere2-MoE: each layer's MLP half is parallel to its attention."""

    model_types = ("cohere2_moe",)

    def __init__(self, model: nn.Module) -> None:
        """Reads the logit scale once."""
        super().__init__(model)
        self._logit_scale = float(self.config.logit_scale)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits times `logit_scale`."""
        return self.model.lm_head(hidden) * self._logit_scale  # type: ignore[no-any-return]

    def layer_parts(self, index: int, layer: nn.Module) -> LayerParts:
        """The common parts, run in parallel: the MLP takes the attention's normed input. With the "average"
        combination the routed and shared outputs are halved before their sum (exact: a power of two)."""
        parts = dataclasses.replace(super().layer_parts(index, layer), parallel=True, mlp_norm=None)
        moe = parts.moe
        if moe is None or moe.shared is None or self.config.shared_expert_combination_strategy != "average":
            return parts
        shared = moe.shared

        def half_shared(hidden: torch.Tensor) -> torch.Tensor:
            return shared(hidden) * 0.5

        return dataclasses.replace(parts, moe=dataclasses.replace(moe, shared=half_shared, routed_scale=0.5))
