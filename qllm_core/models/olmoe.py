"""OLMoE: q/k norms and optional qkv clipping live inside its attention module, so the default fits."""

from qllm_core.models.adapter import MoEAdapter


class OlmoeAdapter(MoEAdapter):
    """OLMoE (allenai)."""

    model_types = ("olmoe",)
