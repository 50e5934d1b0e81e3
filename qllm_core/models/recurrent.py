"""A recurrent layer's token mixer (Gated DeltaNet, Mamba-2, short convolution, ...) over the engine's state
slots: the model's own module, called on each sequence of a flat batch with a `SlotCache` as its cache.

Sequences that each feed one token after earlier ones (decodes) run as one call, batched; a sequence that
starts at position 0 or feeds several tokens runs alone (its own batch of one, as transformers runs it).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from qllm_core.models.attention import AttentionBatch
from qllm_core.state_pool import SlotCache, StatePool


@dataclass(frozen=True)
class _Seq:
    """One sequence of the batch: its rows in the flat batch, first position and state slot."""

    offset: int
    length: int
    start: int
    slot: int


def _sequences(batch: AttentionBatch, pool: StatePool) -> list[_Seq]:
    kv = batch.kv
    if batch.decode_slots is not None:
        return [
            _Seq(i, 1, p, pool.slot(r)) for i, (r, p) in enumerate(zip(batch.request_ids, batch.positions, strict=True))
        ]
    rids = batch.request_ids or tuple(kv.owner(int(s.context_slots[0])) for s in batch.seqs)
    return [
        _Seq(s.start, s.length, len(s.context_slots) - s.length, pool.slot(r))
        for s, r in zip(batch.seqs, rids, strict=True)
    ]


def run_recurrent(module: nn.Module, layer: int, normed: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
    """The mixer's output (tokens, D) for the flat batch `normed`, each sequence continuing its own state."""
    pool = batch.kv.state
    if pool is None:
        raise RuntimeError("a recurrent layer needs a KV pool with state slots (KVCache.for_layout with a state)")
    seqs = _sequences(batch, pool)
    out = torch.empty_like(normed)
    decodes = [s for s in seqs if s.length == 1 and s.start > 0]
    groups = [[s] for s in seqs if not (s.length == 1 and s.start > 0)]
    if decodes:
        groups.append(decodes)
    for group in groups:
        rows = [s.offset for s in group] if group is decodes else None
        if rows is None:
            x = normed[group[0].offset : group[0].offset + group[0].length].unsqueeze(0)
        else:
            x = normed[rows].unsqueeze(1)  # (sequences, 1, D)
        cache = SlotCache(pool, [s.slot for s in group], fresh=group[0].start == 0)
        y = _call(module, x, cache)
        cache.commit()
        pool.advance(layer, [s.slot for s in group], [s.start for s in group], [s.length for s in group])
        if rows is None:
            out[group[0].offset : group[0].offset + group[0].length] = y[0]
        else:
            out[rows] = y[:, 0]
    return out


def _call(module: nn.Module, x: torch.Tensor, cache: SlotCache) -> torch.Tensor:
    params = inspect.signature(module.forward).parameters
    kwargs: dict[str, object] = {"cache": cache}
    for name in ("attention_mask", "position_embeddings"):  # MiniMax's lightning attention wants both named
        if name in params:
            kwargs[name] = None
    y = module(hidden_states=x, **kwargs)
    return y[0] if isinstance(y, tuple) else y  # type: ignore[no-any-return]
