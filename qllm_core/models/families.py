"""Which transformers families take which adapter, and the families refused before loading, with why.

Every model type not named here loads with the default `MoEAdapter` and is served only if the load
probe (`probe.py`) finds its staged forward equal to its own. The refusals below are for layers that
compute what the staged layer has no stage for; the probe would refuse them too, but with a less telling
message. Each says what would serve the family.
"""

from __future__ import annotations

from qllm_core.models.adapter import MoEAdapter
from qllm_core.models.afmoe import AfmoeAdapter
from qllm_core.models.cohere import Cohere2MoeAdapter
from qllm_core.models.gemma4 import Gemma4Adapter
from qllm_core.models.granite import GraniteMoeAdapter
from qllm_core.models.lara import LaraMiniAdapter
from qllm_core.models.minimax import MiniMaxAdapter
from qllm_core.models.nemotron import NemotronHAdapter

ADAPTERS: dict[str, type[MoEAdapter]] = {
    t: a
    for a in (
        AfmoeAdapter,
        Cohere2MoeAdapter,
        Gemma4Adapter,
        GraniteMoeAdapter,
        LaraMiniAdapter,
        MiniMaxAdapter,
        NemotronHAdapter,
    )
    for t in a.model_types
}
"""Model type -> its adapter, for the families that differ from the common shape in a real way."""


REFUSED: dict[str, str] = {
    "qwen4_exp_text": "its full-attention layers are sparse (a QSA indexer picks key blocks per query), its embedding "
    "adds hashed n-gram and per-layer inputs, and its residual stream runs through gated hyper-connections; "
    "serving it needs a block-sparse paged attention and stages for the n-gram inputs and hyper-connections",
    "inkling2_text": "each layer's input is an attention over earlier blocks' outputs (block attention residuals) and "
    "short convolutions follow its attention and MLP; serving it needs a stage that keeps the block outputs per "
    "pass and conv state slots at those two points",
    "inkling2_loop_text": "each layer's input is an attention over earlier blocks' outputs (block attention "
    "residuals), its layers run in a loop, and short convolutions follow its attention and MLP; serving it needs "
    "stages for the block outputs and the loop, and conv state slots at those points",
    "longcat_flash": "each decoder layer holds two attention blocks, two dense MLPs and a MoE block with zero "
    "(identity) experts, run as shortcut-connected branches; serving it needs a staged layer of two sub-layers "
    "whose MoE output joins the second one, and identity experts in the expert kernel",
    "dots3_note_text": "its attention is sparse, its keys chosen by an indexer (DeepSeek Sparse Attention); serving it "
    "needs the indexer's key cache in the KV pool and attention over the keys it picks (its per-layer shapes the "
    "pool now holds)",
    "llama4_text": "its router scales each expert's input rather than its output, its experts run as one batched "
    "product over every expert, and its rope layers attend in chunks; serving it needs an expert kernel for its "
    "batched layout that weights rows before the experts, and chunked attention in the paged attention",
    "deepseek_v4": "its experts are picked by token id (hash routing) in some layers and its attention "
    "compresses the KV cache; serving it needs token-id routing as a router and a compressed-KV layout in the pool",
    "minimax": "its lightning-attention layers run through the engine's state slots and pass the load probe (a "
    "prompt in two chunks), but the family sweep finds greedy tokens that differ from transformers' after a long "
    "prompt prefilled in 8-token chunks under preemption; serving it needs that difference found (the adapter, "
    "minimax.py, is kept for it)",
    "dbrx": "its blocks keep norm, attention and norm in one module (norm_attn_norm) under transformer.blocks and its "
    "experts are not transformers' fused experts interface; serving it needs an adapter for that layout and an "
    "expert kernel for DbrxExperts",
    "jetmoe": "its attention is a mixture of attention heads (a router picks each token's query heads) beside its MoE "
    "MLP; serving it needs that head routing as a stage before the paged attention",
    "zaya": "its router reads the previous layer's router state (carried from layer to layer) and its attention "
    "projects through a convolution (CCA); serving it needs a stage that carries the router state and conv state "
    "slots for CCA",
}
"""Model type -> why it is refused before any weight is loaded."""
