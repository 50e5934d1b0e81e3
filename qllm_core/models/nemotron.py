"""Nemotron-H: each decoder block is one pre-normed residual branch whose mixer is a Mamba-2 layer, softmax
attention, a dense MLP or a MoE block (`config.layers_block_type`), so a staged layer has either a token
mixer or an MLP, never both."""

from __future__ import annotations

from typing import Any

from torch import nn

from qllm_core.models.adapter import LayerParts, MoEAdapter

_MIXERS = ("linear_attention", "full_attention")


class NemotronHAdapter(MoEAdapter):
    """Nemotron-H (and its Mamba-2 hybrids): one mixer per block, under the block's `norm`."""

    model_types = ("nemotron_h",)

    def layer_parts(self, index: int, layer: nn.Module) -> LayerParts:
        """A token-mixer block as the attention half (no MLP), an MLP or MoE block as the MLP half (no mixer)."""
        own: Any = layer
        kind = str(own.block_type)
        mixer, norm = own.mixer, own.norm
        if kind in _MIXERS:
            return LayerParts(mixer, norm, None, None, None, None, None, None)
        is_moe = isinstance(getattr(mixer, "experts", None), nn.Module)
        moe = self.moe_parts(index, mixer) if is_moe else None
        return LayerParts(None, None, None, norm, None, None, moe, None if is_moe else mixer)
