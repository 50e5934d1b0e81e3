"""Gemma 4: a dense MLP and a MoE block side by side in every layer, each with its own norms; the router
reads the raw residual (it has a norm, a scale and a per-expert scale of its own), the experts a second
pre-norm of it; the layer's output is scaled by its `layer_scalar`, and the logits are soft-capped."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qllm_core.models.adapter import LayerParts, MoEAdapter, MoEParts
from qllm_core.models.experts import ExpertKernel


class _PreNormedExperts(nn.Module):
    """The fused experts module run on `norm(hidden)`: what the layer hands its experts."""

    def __init__(self, experts: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.experts = experts
        self.norm = norm

    def forward(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The experts on the normed rows."""
        return self.experts(self.norm(hidden), index, weights)  # type: ignore[no-any-return]


class PreNormedKernel(ExpertKernel):
    """An `ExpertKernel` whose rows are normed first (a per-row RMSNorm: the same on any subset of rows)."""

    def __init__(self, experts: nn.Module, family: str, norm: nn.Module) -> None:
        """`norm`: applied to every row before the experts."""
        super().__init__(experts, family)
        self.norm = norm
        self.module = _PreNormedExperts(experts, norm)

    @property
    def standard(self) -> bool:
        """Never: the padded batched product would skip the norm."""
        return False

    def one(self, expert: int, hidden: torch.Tensor) -> torch.Tensor:
        """One expert on its normed rows."""
        return super().one(expert, self.norm(hidden))

    def grouped(self, first: int, end: int, hidden: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """A span of experts on their normed rows."""
        return super().grouped(first, end, self.norm(hidden), offsets)

    def few_rows(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """A few tokens' experts on their normed rows."""
        return super().few_rows(self.norm(hidden), index, weights)


class Gemma4Adapter(MoEAdapter):
    """Gemma 4 text (`gemma4_text`), the dense MLP as the MoE layer's shared expert."""

    model_types = ("gemma4_text", "gemma4")

    def __init__(self, model: nn.Module) -> None:
        """Refuses the variants with per-layer inputs or KV shared between layers."""
        super().__init__(model)
        if getattr(self.config, "hidden_size_per_layer_input", 0):
            self.refuse(
                "its layers take per-layer inputs (hidden_size_per_layer_input), computed from the token ids "
                "beside the embedding; the staged forward has no stage that carries them to each layer"
            )
        if getattr(self.config, "num_kv_shared_layers", 0):
            self.refuse(
                "its last layers reuse earlier layers' KV (num_kv_shared_layers); the KV pool keeps each layer's own"
            )
        self._softcap: float | None = self.config.final_logit_softcapping

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits, soft-capped by `final_logit_softcapping` as the model's forward does."""
        logits = self.model.lm_head(hidden)
        if self._softcap is None:
            return logits  # type: ignore[no-any-return]
        return torch.tanh(logits / self._softcap) * self._softcap

    def layer_parts(self, index: int, layer: nn.Module) -> LayerParts:
        """The attention half as usual; the MLP half reads the raw residual: the dense MLP under its own pre-
        and post-norm is the shared expert, the router reads it as is, the experts after their own pre-norm."""
        parts = super().layer_parts(index, layer)
        own: Any = layer
        # No layer shares its KV (refused above), so the sharing dict stays empty.
        common = {**parts.__dict__, "output_scale": own.layer_scalar, "attn_kwargs": {"shared_kv_states": {}}}
        if not own.enable_moe_block:
            return LayerParts(**common)
        dense, pre, post_dense = own.mlp, own.pre_feedforward_layernorm, own.post_feedforward_layernorm_1

        def shared(hidden: torch.Tensor) -> torch.Tensor:
            return post_dense(dense(pre(hidden)))  # type: ignore[no-any-return]

        moe = MoEParts(
            router=own.router,
            router_args=(),
            kernel=PreNormedKernel(own.experts, self.family, own.pre_feedforward_layernorm_2),
            shared=shared,
            routed_norm=own.post_feedforward_layernorm_2,
        )
        return LayerParts(**{**common, "mlp_norm": None, "moe": moe, "dense": None})
