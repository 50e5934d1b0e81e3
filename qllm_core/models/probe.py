"""The load-time checks that a model's staged forward is its own forward, so an unsupported family fails
at load and never serves wrong tokens.

Two runs through the model's own forward, each with a different attention function: one records what
every layer's attention module hands it (`attention_calls`: the KV pool's layout, and arguments such as
sparse-attention indices the paged attention does not implement); the other (transformers' eager
attention) gives each decoder layer's input and output for a few prompts. `check_staged` then runs each
stage function on those very inputs, over a private KV pool, for a prefill and a decode step, and
compares stage by stage: the embedding, every layer (its experts all at once and span by span), the
hand-over between layers, and the head. The first difference names the family, the layer and the stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers.cache_utils import LinearAttentionCacheLayerMixin

from qllm_core.cache import KVCache, KVLayout, LayerKV
from qllm_core.errors import ConfigError
from qllm_core.models.attention import RECORDER, SHAPES_NAME, AttentionBatch, AttentionCall
from qllm_core.models.staged import StagedModel
from qllm_core.state_pool import LayerState, StateLayout, StateShape

SUPPORTED_ARGUMENTS = frozenset({"sliding_window", "s_aux"})
"""Attention arguments the paged attention implements (a sliding window, attention sinks)."""
_PASSED_THROUGH = frozenset(
    {"position_ids", "use_cache", "output_router_logits", "output_attentions", "cache_position"}
)
"""What decoder layers pass on to attention from the model's own forward; the staged forward passes none."""

# What the attention arguments seen in transformers' families mean, for the refusal message.
_MEANING = {
    "indices": "keys chosen per query by an indexer: DeepSeek Sparse Attention",
    "block_indices": "key blocks chosen per query by an indexer",
    "position_bias": "a learned relative-position bias",
    "sinks": "attention sinks computed from the input",
    "softcap": "soft-capped attention logits",
}
# Tokens of the recording forward: more than the shrunk sliding window (2) plus one.
_WINDOW_PROBE = 4
# Probe prompts: lengths that span several KV blocks of `_BLOCK` and differ, so that the prefill attends
# sequences of unequal length and the decode step pads one of them.
_PROMPT_LENGTHS = (13, 6)
_BLOCK = 4
# Largest difference relative to the reference's largest value that still counts as equal, by dtype. Not
# tighter in float64: many routers compute in float32 whatever the model's dtype, and their rounding
# depends on the batch's shape, which differs from the reference's.
_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}
_HALF_TOLERANCE = 3e-2
# Rows that may differ in a layer: none in float64; in lower precision a near tie in the router may pick
# another expert for a token when the batch differs from the reference's (rounding), so a few may.
_LOOSE_ROWS = 8  # at most 1 row in this many (and always at least one) outside float64


@contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Run the model's own forward with another registered attention function, then restore its own."""
    config: Any = model.config
    own = config._attn_implementation
    model.set_attn_implementation(name)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_attn_implementation(own)  # type: ignore[operator]


def reference_attention(model: nn.Module) -> str:
    """The attention transformers picks by default: SDPA where the family supports it, else its eager
    attention (whose softmax runs in float32 in most families, so SDPA is the float64 reference)."""
    return "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"


def _text_config(model: nn.Module) -> Any:
    """The decoder's config: the model's own, or a multimodal model's text config."""
    return cast(Any, model.config).get_text_config()


def attention_calls(model: nn.Module, family: str) -> list[AttentionCall]:
    """One forward of `_WINDOW_PROBE` tokens through the model with `record_attention`: each layer's
    attention call. The config's sliding window is shrunk to 2 meanwhile, so the masks the model builds
    show which layers it windows (layer types, or every layer, as the family's own code decides)."""
    calls: list[AttentionCall] = []
    device = next(model.parameters()).device
    config = _text_config(model)
    window = getattr(config, "sliding_window", None)
    try:
        if isinstance(window, int):
            config.sliding_window = 2
        with attention_implementation(model, SHAPES_NAME), torch.inference_mode():
            ids = torch.arange(1, _WINDOW_PROBE + 1, device=device)[None]
            model(input_ids=ids, use_cache=False, **{RECORDER: calls})
    except Exception as exc:  # any failure of the model's own forward here means it cannot be served
        raise ConfigError(
            f"model type {family!r} is not supported: its forward does not run through the paged attention "
            f"interface ({type(exc).__name__}: {exc})"
        ) from exc
    finally:
        if isinstance(window, int):
            config.sliding_window = window
    return calls


def layer_windows(model: nn.Module, calls: list[AttentionCall], num_layers: int) -> list[int | None]:
    """Each layer's sliding window: the config's, in the layers whose mask the model windowed (None in a
    layer without softmax attention)."""
    window = getattr(_text_config(model), "sliding_window", None)
    by_layer = {c.layer: c for c in calls}
    return [window if i in by_layer and by_layer[i].windowed else None for i in range(num_layers)]


def kv_layout(
    family: str,
    calls: list[AttentionCall],
    attention_layers: list[int],
    num_layers: int,
    state: StateLayout | None = None,
) -> KVLayout:
    """The KV pool's layout from each layer's attention call: its own (heads, key width, value width) in each
    of `attention_layers`, none elsewhere (recurrent layers, layers without a token mixer). Refuses a model
    whose softmax attention ran elsewhere or takes arguments the paged attention does not implement."""
    by_layer = {c.layer: c for c in calls}
    for call in calls:
        unknown = sorted(call.arguments - SUPPORTED_ARGUMENTS - _PASSED_THROUGH)
        if unknown:
            what = ", ".join(f"{name} ({_MEANING[name]})" if name in _MEANING else name for name in unknown)
            raise ConfigError(
                f"model type {family!r} is not supported: the attention of layer {call.layer} takes {what}, "
                "which the paged attention does not implement (it implements sliding windows and attention sinks)"
            )
    both = sorted(set(by_layer) & {i for i in range(num_layers) if state and state.layers[i] is not None})
    if both:
        raise ConfigError(
            f"model type {family!r} is not supported: layer {both[0]} runs softmax attention and keeps recurrent "
            "state besides (a convolution inside its attention); a staged layer's token mixer is one or the other"
        )
    if sorted(by_layer) != sorted(attention_layers):
        raise ConfigError(
            f"model type {family!r} is not supported: softmax attention was expected in layers {attention_layers} "
            f"but ran in layers {sorted(by_layer)}; every other layer must be recurrent or have no token mixer"
        )
    return KVLayout(
        tuple(
            LayerKV(by_layer[i].num_kv_heads, by_layer[i].k_head_dim, by_layer[i].v_head_dim) if i in by_layer else None
            for i in range(num_layers)
        ),
        state,
    )


def state_layout(model: nn.Module, family: str, num_layers: int) -> StateLayout | None:
    """Each layer's recurrent state as transformers' own cache keeps it after a short forward (shapes
    without the batch dimension, dtypes), or None when no layer keeps any."""
    device = next(model.parameters()).device
    try:
        with attention_implementation(model, reference_attention(model)), torch.inference_mode():
            out = model(input_ids=torch.arange(1, _WINDOW_PROBE + 1, device=device)[None], use_cache=True)
    except Exception as exc:  # the model's own cached forward must run for its state to be read
        raise ConfigError(
            f"model type {family!r} is not supported: its cached forward fails ({type(exc).__name__}: {exc})"
        ) from exc
    cache = getattr(out, "past_key_values", None)
    layers = list(getattr(cache, "layers", ()))
    states: list[LayerState | None] = [None] * num_layers
    for i, layer in enumerate(layers[:num_layers]):
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            states[i] = LayerState(
                tuple(
                    _shape(layer.conv_states, layer.is_conv_states_initialized, j)
                    for j in range(layer.number_of_states)
                ),
                tuple(
                    _shape(layer.recurrent_states, layer.is_recurrent_states_initialized, j)
                    for j in range(layer.number_of_states)
                ),
            )
    for i, linear in enumerate(getattr(cache, "linear_cache", [])[:num_layers]):  # MiniMax's own cache
        if isinstance(linear, torch.Tensor):
            states[i] = LayerState((), (StateShape(tuple(int(d) for d in linear.shape[1:]), linear.dtype),))
    if all(s is None for s in states):
        if type(cache).__name__ not in ("DynamicCache", "NoneType", "StaticCache"):
            raise ConfigError(
                f"model type {family!r} is not supported: it keeps its state in a {type(cache).__name__}, whose "
                "methods the engine's state slots do not answer"
            )
        return None
    return StateLayout(tuple(states))


def _shape(tensors: Any, initialized: dict[int, bool], index: int) -> StateShape | None:
    if not initialized.get(index):
        return None
    t = tensors[index]
    return StateShape(tuple(int(d) for d in t.shape[1:]), t.dtype)


@dataclass(frozen=True)
class _Reference:
    """The model's own forward on one probe sequence (prompt plus one decode token)."""

    inputs: list[torch.Tensor]
    """(tokens, D) input of each decoder layer."""
    attention: dict[int, torch.Tensor]
    """(tokens, D) output of each layer's token mixer, by layer (none in a layer without one)."""
    outputs: list[torch.Tensor]
    logits: torch.Tensor


def _first(output: Any) -> torch.Tensor:
    """A module's main output, batch of one: its first element when it returns a tuple."""
    return (output[0] if isinstance(output, tuple) else output)[0]


def _reference(model: nn.Module, staged: StagedModel, token_ids: torch.Tensor) -> _Reference:
    inputs: list[torch.Tensor] = []
    attention: dict[int, torch.Tensor] = {}
    outputs: list[torch.Tensor] = []

    def layer_input(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs.append((args[0] if args else kwargs["hidden_states"])[0].clone())

    def keep(into: list[torch.Tensor]) -> Callable[[nn.Module, Any, Any], None]:
        return lambda _module, _args, output: into.append(_first(output).clone())

    hooks = [layer.register_forward_pre_hook(layer_input, with_kwargs=True) for layer in staged.layers]
    hooks += [layer.register_forward_hook(keep(outputs)) for layer in staged.layers]
    hooks += [
        p.attn.register_forward_hook(_keep_at(attention, i)) for i, p in enumerate(staged.parts) if p.attn is not None
    ]
    try:
        with attention_implementation(model, reference_attention(model)):
            logits = model(input_ids=token_ids.unsqueeze(0), use_cache=False).logits[0]
    finally:
        for h in hooks:
            h.remove()
    return _Reference(inputs, attention, outputs, logits)


def _keep_at(into: dict[int, torch.Tensor], layer: int) -> Callable[[nn.Module, Any, Any], None]:
    def keep(_module: nn.Module, _args: Any, output: Any) -> None:
        into[layer] = _first(output).clone()

    return keep


class _Mismatch(Exception):
    """A stage's output differs from the model's own (carries the ConfigError's wording)."""


def _compare(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if got.shape != want.shape:
        raise _Mismatch(f"{what}: shape {tuple(got.shape)} where the model has {tuple(want.shape)}")
    tolerance = _TOLERANCE.get(want.dtype, _HALF_TOLERANCE)
    scale = want.abs().max().clamp_min(1e-30)
    row_error = ((got - want).abs().amax(dim=-1) / scale).double()
    allowed = 0 if want.dtype == torch.float64 else max(1, len(row_error) // _LOOSE_ROWS)
    if int((row_error > tolerance).sum()) > allowed:
        raise _Mismatch(f"{what}: differs from the model's own forward by {float(row_error.max()):.2e} (relative)")


def _stage(what: str, run: Callable[..., Any], *args: Any) -> Any:
    try:
        return run(*args)
    except Exception as exc:  # a stage that cannot run on this model: refuse the model, and say where
        raise _Mismatch(f"{what}: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class _Phase:
    """The prefill or the decode step of the probe sequences, as the engine would batch it."""

    name: str
    rows: list[torch.Tensor]
    """Each sequence's rows (positions) in this phase."""
    batch: AttentionBatch

    def take(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The phase's rows of per-sequence tensors (tokens first), as one flat batch."""
        return torch.cat([t.index_select(0, r) for t, r in zip(tensors, self.rows, strict=True)])


def check_staged(staged: StagedModel, model: nn.Module, family: str) -> None:
    """Raise ConfigError naming the family and the first mismatching layer and stage if the staged forward
    differs from the model's own forward on the probe prompts."""
    device = next(model.parameters()).device
    vocab = int(_text_config(model).vocab_size)
    sequences = [
        torch.tensor([(37 * i + 11 * n + 5) % vocab for i in range(n + 1)], device=device) for n in _PROMPT_LENGTHS
    ]
    try:
        with torch.inference_mode():
            refs = [_stage("the model's own forward", _reference, model, staged, ids) for ids in sequences]
            _check(staged, refs, _phases(staged, sequences, refs[0].inputs[0].dtype), sequences)
    except _Mismatch as exc:
        why = ""
        if staged.state is not None and "second chunk" in str(exc):
            why = (
                "; its recurrent layers do not carry their state across prefill chunks (their scan restarts "
                "from zero on a multi-token input), so a prompt prefilled in chunks would be served wrong"
            )
        raise ConfigError(
            f"model type {family!r} is not supported: the staged forward differs from the model's own at {exc}{why}"
        ) from None


def _phases(staged: StagedModel, sequences: list[torch.Tensor], dtype: torch.dtype) -> list[_Phase]:
    """A private KV pool holding the sequences, a prefill of all but their last token in two chunks, and a
    decode of it."""
    device = sequences[0].device
    ids = [str(i) for i in range(len(sequences))]
    blocks = sum(-(-len(s) // _BLOCK) for s in sequences)
    kv = KVCache.for_layout(staged.kv_layout(), num_blocks=blocks, block_size=_BLOCK, dtype=dtype, device=device)
    if kv.state is not None:  # room for the state slots the probe's sequences are charged
        kv = KVCache.for_layout(staged.kv_layout(), blocks * (1 + kv.state.block_cost), _BLOCK, dtype, device)
    for rid, s in zip(ids, sequences, strict=True):
        kv.allocate(rid, len(s))
    # The prompt in two chunks, the second continuing the first's KV and recurrent state, then a decode step.
    cuts = [(len(s) - 1) // 2 for s in sequences]
    first = AttentionBatch.for_runs(kv, [(rid, 0, c) for rid, c in zip(ids, cuts, strict=True)])
    second = AttentionBatch.for_runs(
        kv, [(rid, c, len(s) - 1 - c) for rid, c, s in zip(ids, cuts, sequences, strict=True)]
    )
    decode = AttentionBatch.for_decode(kv, ids, [len(s) - 1 for s in sequences])
    return [
        _Phase("prefill, first chunk", [torch.arange(c, device=device) for c in cuts], first),
        _Phase(
            "prefill, second chunk",
            [torch.arange(c, len(s) - 1, device=device) for c, s in zip(cuts, sequences, strict=True)],
            second,
        ),
        _Phase("decode", [torch.tensor([len(s) - 1], device=device) for s in sequences], decode),
    ]


def _check(staged: StagedModel, refs: list[_Reference], phases: list[_Phase], sequences: list[torch.Tensor]) -> None:
    ropes = []
    for phase in phases:
        positions = phase.take([torch.arange(len(s), device=s.device) for s in sequences])
        hidden, rope = _stage(f"the embedding ({phase.name})", staged.embed, phase.take(sequences), positions)
        _compare(f"the embedding ({phase.name})", hidden, phase.take([r.inputs[0] for r in refs]))
        ropes.append(rope)
    for layer in range(staged.num_layers):
        for phase, rope in zip(phases, ropes, strict=True):
            _check_layer(staged, layer, refs, phase, rope)
    for phase in phases:
        last = phase.take([r.outputs[-1] for r in refs])
        rows = torch.arange(len(last), device=last.device)
        logits = _stage(f"the head ({phase.name})", staged.head, last, rows)
        _compare(f"the head ({phase.name})", logits, phase.take([r.logits for r in refs]))


# The MoE half of each layer runs as a forward pass may run it: all experts at once, in spans of several
# experts (grouped_mm where the kernel is grouped), and expert by expert (the eager loop's arithmetic).
_EXPERT_SPLITS = ((None, "all experts at once"), (2, "experts in 2 spans"), (1 << 30, "expert by expert"))


def _check_layer(staged: StagedModel, layer: int, refs: list[_Reference], phase: _Phase, rope: Any) -> None:
    where = f"layer {layer} ({phase.name})"
    hidden = phase.take([r.inputs[layer] for r in refs])
    want = phase.take([r.outputs[layer] for r in refs])
    seen: list[torch.Tensor] = []
    attn = staged.parts[layer].attn
    # A recurrent mixer runs sequence by sequence: there the layer's output tells.
    attention = attn is not None and not staged.parts[layer].recurrent
    hook = None
    if attn is not None and attention:
        hook = attn.register_forward_hook(lambda _m, _a, output: seen.append(_first(output)))
    try:
        mid = _stage(f"{where}, attention", staged.attention, layer, hidden, rope, phase.batch)
    finally:
        if hook is not None:
            hook.remove()
    if attention:
        _compare(f"{where}, the attention module", seen[0], phase.take([r.attention[layer] for r in refs]))
    for spans, label in _EXPERT_SPLITS:
        _compare(f"{where}, {label}", _stage(f"{where}, {label}", _mlp, staged, layer, mid, spans), want)
    if layer + 1 < staged.num_layers:
        handed = phase.take([r.inputs[layer + 1] for r in refs])
        _compare(f"the hand-over from layer {layer} to {layer + 1} ({phase.name})", handed, want)


def _mlp(staged: StagedModel, layer: int, hidden: torch.Tensor, spans: int | None) -> torch.Tensor:
    """The MoE half of a layer as a forward pass runs it (all experts at once, or span by span)."""
    work = staged.route(layer, hidden, spans)
    if spans is None and work.top_k_index is not None:
        staged.all_experts(layer, work)
    while work.spans:
        staged.expert_span(layer, work)
    if staged.has_shared_expert(layer) and work.shared_out is None:
        staged.shared_expert(layer, work)
    return staged.combine(work)
