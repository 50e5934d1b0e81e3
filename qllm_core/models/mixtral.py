"""Mixtral: top-k softmax router, renormalised weights, SwiGLU experts; the default layout fits as is."""

from qllm_core.models.adapter import MoEAdapter


class MixtralAdapter(MoEAdapter):
    """Mixtral (and the tiny/bench presets, which are Mixtral-shaped)."""

    model_types = ("mixtral",)
