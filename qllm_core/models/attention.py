"""Attention over the engine's paged KV cache, plugged into the model's own attention modules.

The engine calls each layer's own `self_attn` module (so projections, q/k norms, clipping and RoPE are
the model's code) on a flat batch of tokens from many sequences. Transformers hands the projected,
rotated q/k/v to an attention function chosen by name through its public `AttentionInterface`; ours
writes the new K/V into the request's KV blocks and attends each sequence to its own context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from qllm_core.cache import KVCache
from qllm_core.transfer import to_device

ATTENTION_NAME = "qllm_paged"
WINDOW = "qllm_sliding_window"
"""The attribute of an attention module that holds its sliding window (None: full attention), set at load
from the masks the model's own forward builds (`probe.attention_calls`): the mask, not the module's own
`sliding_window`, is what transformers' attention honours."""


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's share of a flat batch."""

    start: int
    """Offset of its first new token in the flat batch."""
    length: int
    """New tokens it feeds in this pass."""
    context_slots: torch.Tensor
    """KV slots of all its positions up to and including the new tokens."""


@dataclass(frozen=True)
class AttentionBatch:
    """Per-pass attention metadata, built once and shared by every layer: either per-sequence slices (any
    mix of prefills and decodes) or, when every sequence feeds one token, one padded decode layout."""

    kv: KVCache
    write_slots: torch.Tensor
    """KV slot of every new token, in flat-batch order."""
    seqs: tuple[SeqSlice, ...] = ()
    """Per-sequence slices; empty for a decode layout."""
    decode_slots: torch.Tensor | None = None
    """(batch, longest context) slots of a decode layout; padding points at real slots and is masked."""
    decode_lengths: torch.Tensor | None = None
    """(batch,) context length of each decoding sequence, its new token included."""
    decode_mask: torch.Tensor | None = None
    """(batch, 1, 1, longest context) True where a decode slot is real; None when no sequence is padded."""

    @classmethod
    def for_sequences(cls, kv: KVCache, seqs: tuple[SeqSlice, ...], write_slots: torch.Tensor) -> AttentionBatch:
        """Any mix of prefills and decodes, attended one sequence at a time."""
        return cls(kv, write_slots, seqs=seqs)

    @classmethod
    def for_runs(cls, kv: KVCache, runs: list[tuple[str, int, int]]) -> AttentionBatch:
        """Per-sequence slices for runs of new tokens, each (request id, first position, tokens), in flat-batch
        order; the requests' blocks must hold them."""
        seqs, writes, offset = [], [], 0
        for request_id, start, n in runs:
            seqs.append(SeqSlice(offset, n, kv.slots(request_id, 0, start + n)))
            writes.append(kv.slots(request_id, start, start + n))
            offset += n
        return cls(kv, torch.cat(writes), seqs=tuple(seqs))

    @classmethod
    def for_decode(cls, kv: KVCache, request_ids: list[str], positions: list[int]) -> AttentionBatch:
        """One new token per sequence at `positions`: slots come from the block tables in a few tensor ops,
        whatever the batch or context size."""
        bs = kv.block_size
        tables = kv.block_tables(request_ids)  # (B, blocks)
        lengths = to_device(positions, kv.device) + 1
        longest = max(positions) + 1
        offsets = torch.arange(bs, device=kv.device)
        slots = (tables[:, :, None] * bs + offsets).flatten(1)[:, :longest].contiguous()  # (B, longest)
        rows = torch.arange(len(positions), device=kv.device)
        write = slots[rows, lengths - 1]
        # Equal contexts need no mask, and SDPA is faster without one.
        mask = None
        if min(positions) != max(positions):
            mask = (torch.arange(longest, device=kv.device)[None, :] < lengths[:, None])[:, None, None, :]
        return cls(kv, write, decode_slots=slots, decode_lengths=lengths, decode_mask=mask)

    def window_mask(self, window: int) -> torch.Tensor:
        """The decode mask for a sliding window: each token sees only its last `window` positions."""
        assert self.decode_slots is not None and self.decode_lengths is not None  # noqa: S101
        key_pos = torch.arange(self.decode_slots.shape[1], device=self.decode_slots.device)[None, :]
        query_pos = self.decode_lengths[:, None] - 1
        return ((key_pos <= query_pos) & (query_pos - key_pos < window))[:, None, None, :]


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Transformers attention-function signature: q (1, H, N, d), k (1, Hkv, N, dk), v (1, Hkv, N, dv) ->
    (1, N, H, dv). K and V may differ in width (multi-head latent attention); `s_aux` are attention sinks
    (gpt-oss): one logit per head that takes part in the softmax and is then dropped."""
    batch: AttentionBatch = kwargs["qllm_batch"]
    window: int | None = getattr(module, WINDOW, None)
    sinks = kwargs.get("s_aux")
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    k_cache, v_cache = batch.kv.k[layer], batch.kv.v[layer]
    k_cache.index_copy_(0, batch.write_slots, key[0].transpose(0, 1))
    v_cache.index_copy_(0, batch.write_slots, value[0].transpose(0, 1))

    # index_select rather than advanced indexing (`cache[slots]`): the same gather, 2-3x faster on CPU.
    if batch.decode_slots is not None:
        q = query[0].transpose(0, 1).unsqueeze(2)  # (B, H, 1, d)
        flat = batch.decode_slots.view(-1)
        rows = batch.decode_slots.shape
        k = k_cache.index_select(0, flat).view(*rows, *k_cache.shape[1:]).transpose(1, 2)  # (B, Hkv, L, dk)
        v = v_cache.index_select(0, flat).view(*rows, *v_cache.shape[1:]).transpose(1, 2)
        mask = batch.decode_mask if window is None else batch.window_mask(window)
        if sinks is not None:
            out = _attend_with_sinks(q, k, v, mask, scaling, sinks)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=scaling, enable_gqa=k.shape[1] != q.shape[1]
            )
        return out.squeeze(2).unsqueeze(0), None

    outs = []
    for s in batch.seqs:
        q = query[:, :, s.start : s.start + s.length]
        k = k_cache.index_select(0, s.context_slots).transpose(0, 1).unsqueeze(0)
        v = v_cache.index_select(0, s.context_slots).transpose(0, 1).unsqueeze(0)
        context = len(s.context_slots)
        gqa = k.shape[1] != q.shape[1]
        if sinks is not None:
            o = _attend_with_sinks(q, k, v, _causal_mask(s.length, context, window, q.device), scaling, sinks)
        elif context == s.length and (window is None or window >= context):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        else:
            mask = _causal_mask(s.length, context, window, q.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        outs.append(o)
    # Contiguous, as transformers' own attention functions return it: some modules `view` the output.
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def _attend_with_sinks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    sinks: torch.Tensor,
) -> torch.Tensor:
    """Attention whose softmax also spans one sink logit per head, as transformers' eager gpt-oss attention
    computes it (SDPA has no sinks). `mask` is True where a query may see a key; None sees every key."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scaling is None else scaling)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], 1).to(scores.dtype)
    logits = torch.cat([scores, sink], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = logits.softmax(dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


def _causal_mask(num_new: int, context: int, window: int | None, device: torch.device) -> torch.Tensor:
    """True where query i (at position context-num_new+i) may see key j."""
    q_pos = torch.arange(context - num_new, context, device=device)[:, None]
    k_pos = torch.arange(context, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= q_pos - k_pos < window
    return mask


SHAPES_NAME = "qllm_shapes"
"""The attention function `record_attention` is registered under, for `probe.attention_calls`."""
RECORDER = "qllm_recorder"
"""The keyword argument that carries the list `record_attention` appends to."""


@dataclass(frozen=True)
class AttentionCall:
    """What one layer's attention module hands the attention function, seen once at load."""

    layer: int
    num_kv_heads: int
    k_head_dim: int
    v_head_dim: int
    arguments: frozenset[str]
    """Names of the further keyword arguments it passes with a value (not None)."""
    windowed: bool
    """The model's mask hides the first position from the last query (a sliding window shorter than the call)."""


def record_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An attention function that records its call's shapes and arguments and returns zeros of the right
    shape: run once through the model's own forward at load, it tells the KV pool's layout and whether
    every layer's attention is one the paged attention implements."""
    calls: list[AttentionCall] = kwargs.pop(RECORDER)
    arguments = frozenset(k for k, v in kwargs.items() if v is not None)
    layer = int(getattr(module, "layer_idx", -1))
    windowed = False
    if attention_mask is not None:
        corner = attention_mask[..., -1, 0]
        windowed = not bool((corner if corner.dtype == torch.bool else corner == 0).all())
    shape = (int(key.shape[1]), int(key.shape[-1]), int(value.shape[-1]))
    calls.append(AttentionCall(layer, *shape, arguments, windowed))
    return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None


# Registration is by name in transformers' public, process-wide AttentionInterface; doing it again is harmless.
AttentionInterface.register(ATTENTION_NAME, paged_attention)
AttentionInterface.register(SHAPES_NAME, record_attention)
# The recorder needs the masks the model builds (the paged attention builds its own and takes none).
AttentionMaskInterface.register(SHAPES_NAME, sdpa_mask)


def set_window(module: torch.nn.Module, window: int | None) -> None:
    """Give a layer's attention module the sliding window the paged attention applies (None: full)."""
    setattr(module, WINDOW, window)
