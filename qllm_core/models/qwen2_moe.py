"""Qwen2-MoE (Qwen1.5-MoE): a sigmoid-gated shared expert beside the routed ones, and optional dense layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qllm_core.models.adapter import MoEAdapter, MoEParts


class Qwen2MoeAdapter(MoEAdapter):
    """Qwen2-MoE."""

    model_types = ("qwen2_moe",)

    def moe_parts(self, layer: nn.Module) -> MoEParts | None:
        """Routed experts plus the gated shared expert."""
        mlp: Any = layer.mlp
        if not hasattr(mlp, "experts"):
            return None

        def shared(hidden: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(mlp.shared_expert_gate(hidden)) * mlp.shared_expert(hidden)

        return MoEParts(mlp.gate, mlp.experts, int(mlp.experts.num_experts), shared)
