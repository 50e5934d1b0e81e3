"""Which transformers families take which adapter, and the families refused before loading, with why.

Every model type not named here loads with the default `MoEAdapter` and is served only if the load
probe (`probe.py`) finds its staged forward equal to its own. The refusals below are for layers that keep
state the paged KV pool has no slot for, or compute what the staged layer has no stage for; the probe
would refuse them too, but with a less telling message.
"""

from __future__ import annotations

from qllm_core.models.adapter import MoEAdapter
from qllm_core.models.afmoe import AfmoeAdapter
from qllm_core.models.granite import GraniteMoeAdapter

ADAPTERS: dict[str, type[MoEAdapter]] = {t: a for a in (AfmoeAdapter, GraniteMoeAdapter) for t in a.model_types}
"""Model type -> its adapter, for the families that differ from the common shape in a real way."""

_RECURRENT = "some of its layers keep recurrent or linear-attention state ({}), for which the paged KV pool has no slot"

REFUSED: dict[str, str] = {
    "jamba": _RECURRENT.format("Mamba layers"),
    "bamba": _RECURRENT.format("Mamba-2 layers"),
    "zamba2": _RECURRENT.format("Mamba-2 layers"),
    "nemotron_h": _RECURRENT.format("Mamba-2 layers"),
    "granitemoehybrid": _RECURRENT.format("Mamba-2 layers"),
    "qwen3_next": _RECURRENT.format("Gated DeltaNet layers"),
    "qwen3_5_moe": _RECURRENT.format("Gated DeltaNet layers"),
    "qwen3_5_moe_text": _RECURRENT.format("Gated DeltaNet layers"),
    "lara_mini": _RECURRENT.format("Gated DeltaNet layers"),
    "kimi_linear": _RECURRENT.format("Kimi Delta Attention layers"),
    "bailing_hybrid": _RECURRENT.format("delta-rule linear attention layers"),
    "lfm2_moe": _RECURRENT.format("short-convolution layers"),
    "minimax": _RECURRENT.format("lightning linear-attention layers"),
    "qwen4_exp_text": _RECURRENT.format("Gated DeltaNet layers"),
    "inkling2_text": _RECURRENT.format("short-convolution layers"),
    "inkling2_loop_text": _RECURRENT.format("short-convolution layers"),
    "cohere2_moe": "its decoder layers run attention and the MLP in parallel on the same input; the staged "
    "layer runs the MLP on the attention's output",
    "longcat_flash": "each decoder layer holds two attention blocks, two dense MLPs and a MoE block with zero "
    "(identity) experts, run as shortcut-connected branches; the staged layer has one of each",
    "dots3_note_text": "its attention is sparse, its keys chosen by an indexer (DeepSeek Sparse Attention), and its "
    "layers differ in shape (per-layer configs); the paged attention is dense over one KV shape",
    "llama4_text": "its router scales each expert's input rather than its output, its experts run as one batched "
    "product over every expert, and its rope layers attend in chunks; the staged layer has none of these",
    "deepseek_v4": "its experts are picked by token id (hash routing) in some layers and its attention "
    "compresses the KV cache, neither of which the staged layer has",
}
"""Model type -> why it is refused before any weight is loaded."""
