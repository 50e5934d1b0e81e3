"""Attention over the engine's paged KV cache, plugged into the model's own attention modules.

The engine calls each layer's own `self_attn` module (so projections, q/k norms, clipping and RoPE are
the model's code) on a flat batch of tokens from many sequences. Transformers hands the projected,
rotated q/k/v to an attention function chosen by name through its public `AttentionInterface`; ours
writes the new K/V into the request's KV blocks and attends each sequence to its own context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from qllm_core.cache import KVCache
from qllm_core.models.varlen import QueryGroup, attend_groups, attend_with_sinks, build_groups
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
    """Per-pass attention metadata, built once and shared by every layer: either per-sequence slices with
    their padded query groups (any mix of prefills and decodes, `varlen.py`) or, when every sequence feeds
    one token, one padded decode layout from the block tables."""

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
    request_ids: tuple[str, ...] = ()
    """The sequences' requests in batch order, where the builder knows them (recurrent state slots need them)."""
    positions: tuple[int, ...] = ()
    """A decode layout's positions (host side), in batch order."""
    groups: tuple[QueryGroup, ...] = ()
    """The slices as padded groups, one attention call each (`varlen.build_groups`); empty for a decode layout."""
    _window_masks: dict[int, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)
    """A decode layout's mask per sliding window, built by the first layer that asks."""

    @classmethod
    def for_runs(cls, kv: KVCache, runs: list[tuple[str, int, int]]) -> AttentionBatch:
        """Any mix of prefills and decodes: per-sequence slices for runs of new tokens, each (request id, first
        position, tokens), in flat-batch order, attended as padded groups; the requests' blocks must hold them."""
        seqs, writes, offset = [], [], 0
        for request_id, start, n in runs:
            seqs.append(SeqSlice(offset, n, kv.slots(request_id, 0, start + n)))
            writes.append(kv.slots(request_id, start, start + n))
            offset += n
        slices = tuple(seqs)
        groups = build_groups(slices, kv.device)
        return cls(kv, torch.cat(writes), seqs=slices, request_ids=tuple(r[0] for r in runs), groups=groups)

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
        return cls(
            kv,
            write,
            decode_slots=slots,
            decode_lengths=lengths,
            decode_mask=mask,
            request_ids=tuple(request_ids),
            positions=tuple(positions),
        )

    def window_mask(self, window: int) -> torch.Tensor:
        """The decode mask for a sliding window: each token sees only its last `window` positions (built once
        per pass and window)."""
        assert self.decode_slots is not None and self.decode_lengths is not None  # noqa: S101
        mask = self._window_masks.get(window)
        if mask is None:
            key_pos = torch.arange(self.decode_slots.shape[1], device=self.decode_slots.device)[None, :]
            query_pos = self.decode_lengths[:, None] - 1
            mask = ((key_pos <= query_pos) & (query_pos - key_pos < window))[:, None, None, :]
            self._window_masks[window] = mask
        return mask


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
    if k_cache is None or v_cache is None:
        raise RuntimeError(f"layer {layer} runs softmax attention but the KV pool keeps no KV for it")
    k_cache.index_copy_(0, batch.write_slots, key[0].transpose(0, 1))
    v_cache.index_copy_(0, batch.write_slots, value[0].transpose(0, 1))

    # index_select rather than advanced indexing (`cache[slots]`): the same gather, 2-3x faster on CPU.
    if batch.decode_slots is not None:
        q = query[0].transpose(0, 1).unsqueeze(2)  # (B, H, 1, d)
        flat = batch.decode_slots.view(-1)
        rows = batch.decode_slots.shape
        k = k_cache.index_select(0, flat).view(*rows, *k_cache.shape[1:]).transpose(1, 2)  # (B, Hkv, L, dk)
        v = v_cache.index_select(0, flat).view(*rows, *v_cache.shape[1:]).transpose(1, 2)
        # A window at least as long as the longest context hides nothing: the padding mask is the whole mask.
        unwindowed = window is None or window >= batch.decode_slots.shape[1]
        mask = batch.decode_mask if unwindowed else batch.window_mask(window)  # type: ignore[arg-type]
        if sinks is not None:
            out = attend_with_sinks(q, k, v, mask, scaling, sinks)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=scaling, enable_gqa=k.shape[1] != q.shape[1]
            )
        return out.squeeze(2).unsqueeze(0), None

    return attend_groups(batch.groups, query, k_cache, v_cache, window, scaling, sinks), None


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
