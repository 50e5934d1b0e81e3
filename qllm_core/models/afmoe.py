"""AFMoE (Arcee): embeddings scaled by sqrt(hidden) under muP, and a router that wants the block's 3D input."""

from __future__ import annotations

import dataclasses

import torch

from qllm_core.models.adapter import MoEAdapter, MoEParts


class AfmoeAdapter(MoEAdapter):
    """AFMoE."""

    model_types = ("afmoe",)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings, times sqrt(hidden_size) when the config enables muP (as the model's forward does)."""
        hidden = self.inner.embed_tokens(token_ids)
        return hidden * (self.config.hidden_size**0.5) if self.config.mup_enabled else hidden  # type: ignore[no-any-return]

    def moe_parts(self, index: int, block: torch.nn.Module) -> MoEParts:
        """The router reads (batch, tokens, hidden): hand it the flat batch as a batch of one."""
        parts = super().moe_parts(index, block)
        router = parts.router

        def batch_of_one(hidden: torch.Tensor, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return router(hidden.unsqueeze(0), *args)

        return dataclasses.replace(parts, router=batch_of_one)
