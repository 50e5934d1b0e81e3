"""Where a Hugging Face MoE model keeps its parts, found once at load for the staged forward (`staged.py`).

`MoEAdapter` reads the common shape of transformers' MoE families: `model.model` with `embed_tokens`,
`rotary_emb`, `layers` and `norm`, and `lm_head`; decoder layers with `self_attn` and an MLP block
holding a router (`gate` or `router`, returning logits, top-k weights and top-k ids) and a fused
`experts` module, optionally a shared expert (gated by `shared_expert_gate` or not) and a scale on the
routed output; norms before and after attention and the MLP by their transformers names. A family that
differs in a real way overrides one hook in a short file of its own (see `registry.py`). What the
adapter finds is checked against the model's own forward at load (`probe.py`), so a wrong guess
refuses the model instead of serving wrong tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn, cast

import torch
from torch import nn

from qllm_core.errors import ConfigError
from qllm_core.models.experts import ExpertKernel

Rope = Any
"""What the model's rotary embedding returns for a flat batch (for most families a (cos, sin) pair);
opaque to the engine."""


@dataclass(frozen=True)
class MoEParts:
    """The routed half of one MoE layer."""

    router: Callable[..., tuple[torch.Tensor, ...]]
    """The model's own router: (hidden, *router_args) -> (logits, top-k weights, top-k expert ids)."""
    router_args: tuple[torch.Tensor, ...]
    """Tensors the block hands its router besides the hidden states (a score-correction bias)."""
    kernel: ExpertKernel
    shared: Callable[[torch.Tensor], torch.Tensor] | None = None
    """A shared expert applied to every token, already gated, or None."""
    routed_scale: float | None = None
    """A factor on the routed experts' sum applied by the block (not by its router), or None."""
    routed_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    """A norm on the routed experts' sum before the shared expert's output is added (Gemma 4), or None."""

    @property
    def experts(self) -> nn.Module:
        """The fused experts module (its configured kernel runs a whole layer at once)."""
        return self.kernel.module

    @property
    def num_experts(self) -> int:
        """Routed experts in the layer."""
        return self.kernel.num_experts


@dataclass(frozen=True)
class LayerParts:
    """One decoder layer as the staged forward runs it:
    `h += s * attn_out_norm(attn(attn_norm(h)))`, then `h += s * mlp_out_norm(mlp(mlp_norm(h)))`, where
    the MLP is the routed experts (times `routed_scale`) plus the shared expert, or a dense MLP, and `s`
    is `residual_scale`. A missing norm or scale is None."""

    attn: nn.Module | None
    """The token mixer: softmax attention, a recurrent mixer (`recurrent`), or None (an MLP-only layer)."""
    attn_norm: nn.Module | None
    attn_out_norm: nn.Module | None
    mlp_norm: nn.Module | None
    mlp_out_norm: Callable[[torch.Tensor], torch.Tensor] | None
    residual_scale: float | None
    moe: MoEParts | None
    dense: Callable[[torch.Tensor], torch.Tensor] | None
    rope_index: int | None = None
    """Which of several rotary embeddings (one per layer type) this layer's attention takes; None: the one."""
    output_scale: torch.Tensor | None = None
    """A factor on the layer's whole output, residual included (Gemma 4's `layer_scalar`), or None."""
    attn_kwargs: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments the attention module requires (Gemma 4's `shared_kv_states`)."""
    normed_residual: tuple[float, float] | None = None
    """The residual stream goes on from each branch's normed input times these factors (attention, MLP), as in
    MiniMax; None: from the branch's input as is."""
    parallel: bool = False
    """Attention and MLP read the same normed input (Cohere's parallel blocks): the attention stage hands the
    MLP that input beside the residual stream (`StagedModel.attention`)."""
    rope: bool = True
    """The attention takes the rotary embedding (False: a NoPE layer, handed None)."""
    recurrent: bool = False
    """The token mixer keeps recurrent state (Gated DeltaNet, Mamba, short convolution): it runs per sequence
    over the engine's state slots (`recurrent.run_recurrent`), not over the paged KV."""


# Transformers' names for the same part across families, in the order they are tried.
_MLP_NAMES = ("mlp", "block_sparse_moe", "feed_forward")
_EMBED_NAMES = ("embed_tokens", "embeddings")
_FINAL_NORMS = ("norm", "final_layernorm", "embedding_norm", "norm_f")
"""The norm before the LM head (LFM2 names it `embedding_norm`, though it runs last)."""
_MIXER_NAMES = ("self_attn", "linear_attn", "mamba", "conv")
"""The token mixer: softmax attention, or the recurrent mixers of hybrid families (which ones keep state is
read from the model's own cache at load, `probe.state_layout`)."""
_ATTN_NORMS = ("input_layernorm", "operator_norm")
_ROUTER_NAMES = ("gate", "router")
_SHARED_NAMES = ("shared_experts", "shared_expert", "shared_mlp")
_POST_ATTN_NORMS = ("post_self_attn_layernorm",)
_PRE_MLP_NORMS = ("pre_feedforward_layernorm", "pre_mlp_layernorm", "pre_ff_layernorm", "ffn_norm")
_POST_MLP_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm")


def first_attr(owner: object, names: tuple[str, ...]) -> Any:
    """The first of `names` that `owner` has and is not None, else None."""
    for name in names:
        value = getattr(owner, name, None)
        if value is not None:
            return value
    return None


class MoEAdapter:
    """The default mapping: transformers' common MoE decoder shape (see the module docstring)."""

    model_types: ClassVar[tuple[str, ...]] = ()
    """Model types this adapter is written for; the default adapter serves every type not listed elsewhere."""

    def __init__(self, model: nn.Module) -> None:
        """Raises ConfigError naming the family and the missing part when the model is not of this shape."""
        # Transformers modules are dynamically typed; Any keeps attribute access honest about that.
        self.model: Any = model
        own: Any = cast(Any, model).config
        self.family = str(own.model_type)
        # A multimodal checkpoint (Gemma 4, Qwen3.5-MoE as released) keeps the text model's settings in its
        # text config and the decoder in `model.language_model`; the engine serves that decoder.
        self.config: Any = own.get_text_config()
        self.inner: Any = getattr(model, "model", None)
        self.inner = getattr(self.inner, "language_model", None) or self.inner
        for owner, names in (
            (self.inner, ("layers",)),
            (self.inner, _EMBED_NAMES),
            (self.inner, _FINAL_NORMS),
            (model, ("lm_head",)),
        ):
            if first_attr(owner, names) is None:
                self.refuse(f"it has no model.{names[0]}" if owner is self.inner else f"it has no {names[0]}")
        self._embed: Any = first_attr(self.inner, _EMBED_NAMES)
        self._norm: Any = first_attr(self.inner, _FINAL_NORMS)
        rotary = first_attr(self.inner, ("rotary_emb", "pos_emb"))
        self._rotary = rotary
        types = getattr(self.config, "layer_types", None)
        self._rope_types: tuple[str, ...] = ()
        if rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters:
            if not types:
                self.refuse("its rotary embedding wants a layer type but the config has no layer_types")
            self._rope_types = tuple(sorted(set(types)))

    def refuse(self, why: str) -> NoReturn:
        """Raise the ConfigError for a model this adapter cannot map."""
        raise ConfigError(f"model type {self.family!r} is not supported: {why}")

    @property
    def layers(self) -> list[nn.Module]:
        """The decoder layers, in order."""
        return list(self.inner.layers)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (N,) to hidden states (N, D)."""
        return self._embed(token_ids)

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> Rope:
        """The rotary embedding for flat positions (N,), as the attention modules expect it (batch of one);
        with one rotary embedding per layer type, a tuple of them in `rope_index` order."""
        if self._rotary is None:
            return None
        x, pos = hidden.unsqueeze(0), positions.unsqueeze(0)
        if not self._rope_types:
            return self._rotary(x, pos)
        return tuple(self._rotary(x, pos, t) for t in self._rope_types)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The norm before the LM head."""
        return self._norm(hidden)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states to logits."""
        return self.model.lm_head(hidden)

    def layer_parts(self, index: int, layer: nn.Module) -> LayerParts:
        """Decoder layer `index` in staged form."""
        attn = first_attr(layer, _MIXER_NAMES)
        if attn is None:
            self.refuse(
                f"decoder layer {index} ({type(layer).__name__}) has no self_attn (not a plain attention layer)"
            )
        if getattr(attn, "indexer", None) is not None:
            # Such attention is dense on short prompts, so the load probe could not tell.
            self.refuse(
                f"the attention of layer {index} is sparse, its keys chosen by an indexer with a key cache of its "
                "own (DeepSeek Sparse Attention); the paged attention is dense: serving it needs the indexer's key "
                "cache in the KV pool and paged attention over the keys it picks"
            )
        attn_norm, attn_out_norm, mlp_norm = self.norms(layer)
        mlp = first_attr(layer, _MLP_NAMES)
        if mlp is None:
            self.refuse(f"decoder layer {index} has none of {', '.join(_MLP_NAMES)}")
        moe = self.moe_parts(index, mlp) if isinstance(getattr(mlp, "experts", None), nn.Module) else None
        rope_index = None
        if self._rope_types:
            rope_index = self._rope_types.index(self.config.layer_types[index])
        return LayerParts(
            attn=attn,
            attn_norm=attn_norm,
            attn_out_norm=attn_out_norm,
            mlp_norm=mlp_norm,
            mlp_out_norm=self.mlp_out_norm(layer, mlp),
            residual_scale=self.residual_scale(layer),
            moe=moe,
            dense=None if moe is not None else mlp,
            rope_index=rope_index,
        )

    def norms(self, layer: nn.Module) -> tuple[nn.Module | None, nn.Module | None, nn.Module | None]:
        """(before attention, on the attention output, before the MLP). `post_attention_layernorm` is the
        pre-MLP norm in Llama-style layers, but the norm on the attention output when the layer has its own
        pre-MLP norm (sandwich norms) or no input norm at all (OLMo-2-style post-norms), unless the layer
        names its attention-output norm otherwise."""
        attn_norm = first_attr(layer, _ATTN_NORMS)
        post_attn = getattr(layer, "post_attention_layernorm", None)
        pre_mlp = first_attr(layer, _PRE_MLP_NORMS)
        attn_out = first_attr(layer, _POST_ATTN_NORMS)
        if attn_out is not None:
            return attn_norm, attn_out, post_attn if pre_mlp is None else pre_mlp
        if pre_mlp is not None or attn_norm is None:
            return attn_norm, post_attn, pre_mlp
        return attn_norm, None, post_attn

    def mlp_out_norm(self, layer: nn.Module, mlp: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The norm on the MLP's output: the MLP block's own (inside it, after its shared expert), the layer's,
        or both in that order."""
        inside, outside = first_attr(mlp, _POST_MLP_NORMS), first_attr(layer, _POST_MLP_NORMS)
        if inside is None or outside is None:
            return inside if outside is None else outside  # type: ignore[no-any-return]

        def both(hidden: torch.Tensor) -> torch.Tensor:
            return outside(inside(hidden))  # type: ignore[no-any-return]

        return both

    def residual_scale(self, layer: nn.Module) -> float | None:
        """A factor on each branch before its residual add, or None."""
        return None

    def moe_parts(self, index: int, block: nn.Module) -> MoEParts:
        """The MoE block's router, experts and shared expert."""
        router = first_attr(block, _ROUTER_NAMES)
        if router is None:
            self.refuse(f"the MoE block of layer {index} has none of {', '.join(_ROUTER_NAMES)}")
        kernel = ExpertKernel(block.experts, self.family)  # type: ignore[arg-type]
        scale = getattr(block, "routed_scaling_factor", None)
        return MoEParts(
            router=router,
            router_args=self.router_args(index, block, router),
            kernel=kernel,
            shared=self.shared_expert(block),
            routed_scale=None if scale is None or float(scale) == 1.0 else float(scale),
        )

    def router_args(self, index: int, block: nn.Module, router: nn.Module) -> tuple[torch.Tensor, ...]:
        """What the block hands its router besides the hidden states: the block's tensors of the same names
        as the router's further parameters (a score-correction bias kept on the block)."""
        names = list(inspect.signature(router.forward).parameters)[1:]
        args = [getattr(block, name, None) for name in names]
        missing = [n for n, a in zip(names, args, strict=True) if not isinstance(a, torch.Tensor)]
        if missing:
            self.refuse(f"the router of layer {index} wants {', '.join(missing)}, which its MoE block does not hold")
        return tuple(args)  # type: ignore[arg-type]

    def shared_expert(self, block: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The block's shared expert, gated by its sigmoid `shared_expert_gate` when it has one."""
        shared = first_attr(block, _SHARED_NAMES)
        if shared is None:
            return None
        gate = getattr(block, "shared_expert_gate", None)
        if gate is None:
            return shared  # type: ignore[no-any-return]

        def gated(hidden: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(gate(hidden)) * shared(hidden)

        return gated
