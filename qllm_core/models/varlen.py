"""One padded attention call for the sequences of a mixed pass (prompts, chunks and decodes together).

A mixed pass's sequences differ in new tokens and in context. Rather than one attention call per
sequence and layer, the pass's sequences are cut once into groups of like size (decodes apart from
prompts, prompts only with prompts of their shape, decodes wasting at most `PAD_SLACK` on padding),
and each group is laid out once per pass as a padded batch: (sequences, longest run) queries against
(sequences, longest context) keys, with a boolean mask built once per window size. Every layer then
runs one gather of K/V and one SDPA call per group.

Padding never produces a row of its own: a padded query repeats its sequence's last query (so it sees
a real key and its softmax is defined) and is dropped from the output; a padded key repeats its
sequence's last slot and lies past every real query's position, so causality already hides it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from qllm_core.transfer import to_device


class Run(Protocol):
    """A sequence's share of a flat batch (`attention.SeqSlice`)."""

    @property
    def start(self) -> int:
        """Offset of its first new token in the flat batch."""

    @property
    def length(self) -> int:
        """New tokens it feeds in this pass."""

    @property
    def context_slots(self) -> torch.Tensor:
        """KV slots of all its positions up to and including the new tokens."""


@dataclass(frozen=True)
class QueryGroup:
    """Sequences attended by one padded SDPA call, laid out once per pass."""

    num_seqs: int
    query_len: int
    """The longest run of new tokens in the group."""
    context_len: int
    """The longest context in the group (its new tokens included)."""
    rows: torch.Tensor | None
    """(num_seqs * query_len,) flat-batch row of each padded query; None when its queries are one run of
    the flat batch, from row `first` (one sequence, or sequences side by side unpadded)."""
    first: int
    """The flat-batch row of its first query."""
    slots: torch.Tensor
    """(num_seqs * context_len,) KV slot of each padded key."""
    query_pos: torch.Tensor
    """(num_seqs, query_len, 1) position of each padded query."""
    causal: bool
    """Sequences of one length, each from position 0: without a window, SDPA's own causal mask is the mask."""
    full: bool
    """Every query sees its sequence's whole context, and no key is padding (decodes of equal context)."""
    take: torch.Tensor | None
    """Where each real query sits in the padded output, in `dest` order; None when none is padding."""
    dest: torch.Tensor | None
    """The group's flat-batch rows, in order; None when they are one run (`rows` is None)."""
    _masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict, compare=False, repr=False)

    def mask(self, window: int | None, explicit: bool = False) -> torch.Tensor | None:
        """(num_seqs, 1, query_len, context_len) True where a query may see a key, for a sliding `window`
        (None: full attention); None where SDPA needs no mask (unless `explicit`). Built once per pass and
        window, whichever layer asks first."""
        fits = window is None or window >= self.context_len
        if not explicit and fits and self.full:
            return None
        if not explicit and fits and self.causal:
            return None
        key = window if not explicit else -1 - (window or 0)
        if key not in self._masks:
            keys = torch.arange(self.context_len, device=self.slots.device)
            visible = keys <= self.query_pos
            if window is not None:
                visible &= self.query_pos - keys < window
            self._masks[key] = visible.unsqueeze(1)
        return self._masks[key]


PAD_SLACK = 1.25
"""A group's padded (sequences x longest run x longest context) may be at most this times its sequences'
own (run x context): measured on a 2-core CPU (bench preset), gathering and attending padding costs
more than the calls it saves once sequences differ much (a 128-token chunk padded with 14 decodes'
contexts ran 1.4-2.4x slower than one call per sequence)."""


def build_groups(seqs: Sequence[Run], device: torch.device) -> tuple[QueryGroup, ...]:
    """The pass's sequences (in flat-batch order) as few padded groups: decodes apart from prompts and
    chunks, and sequences of similar size together, each group wasting at most `PAD_SLACK` on padding."""
    order = sorted(range(len(seqs)), key=lambda i: (seqs[i].length, len(seqs[i].context_slots)))
    parts: list[list[int]] = []
    for i in order:
        if parts and _fits([seqs[j] for j in (*parts[-1], i)]):
            parts[-1].append(i)
        else:
            parts.append([i])
    return tuple(_group([seqs[i] for i in sorted(part)], device) for part in parts)


def _fits(seqs: list[Run]) -> bool:
    """Whether these sequences make one group: decodes within `PAD_SLACK`, or prompts and chunks of one
    shape (a padded prompt would need a mask, which forgoes SDPA's causal kernel: slower than one call
    per prompt whenever lengths differ, measured as for `PAD_SLACK`)."""
    if len({s.length == 1 for s in seqs}) > 1:
        return False
    if seqs[0].length != 1:
        return len({(s.length, len(s.context_slots)) for s in seqs}) == 1
    padded = len(seqs) * max(s.length for s in seqs) * max(len(s.context_slots) for s in seqs)
    return padded <= PAD_SLACK * sum(s.length * len(s.context_slots) for s in seqs)


def _group(seqs: list[Run], device: torch.device) -> QueryGroup:
    query_len = max(s.length for s in seqs)
    contexts = [len(s.context_slots) for s in seqs]
    context_len = max(contexts)
    rows: list[int] = []
    positions: list[int] = []
    take: list[int] = []
    slots = []
    for i, (s, context) in enumerate(zip(seqs, contexts, strict=True)):
        pad = query_len - s.length
        rows.extend([*range(s.start, s.start + s.length), *[s.start + s.length - 1] * pad])
        first = context - s.length
        positions.extend([*range(first, context), *[context - 1] * pad])
        take.extend(range(i * query_len, i * query_len + s.length))
        slots.append(s.context_slots)
        if context < context_len:
            slots.append(s.context_slots[-1:].expand(context_len - context))
    unpadded = all(s.length == query_len for s in seqs)
    dest = [r for s in seqs for r in range(s.start, s.start + s.length)]
    one_run = unpadded and dest == list(range(dest[0], dest[0] + len(dest)))
    return QueryGroup(
        num_seqs=len(seqs),
        query_len=query_len,
        context_len=context_len,
        rows=None if one_run else to_device(rows, device),
        first=dest[0],
        slots=torch.cat(slots),
        query_pos=to_device(positions, device).view(len(seqs), query_len, 1),
        causal=unpadded and all(c == s.length for s, c in zip(seqs, contexts, strict=True)),
        full=query_len == 1 and min(contexts) == context_len,
        take=None if unpadded else to_device(take, device),
        dest=None if one_run else to_device(dest, device),
    )


def attend_groups(
    groups: tuple[QueryGroup, ...],
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    window: int | None,
    scaling: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """Attention of a flat batch's queries (1, H, N, d) over the paged cache, one SDPA call per group ->
    (1, N, H, dv), contiguous."""
    flat = query[0].transpose(0, 1)  # (N, H, d)
    heads, outs = flat.shape[1], []
    for g in groups:
        q = flat.narrow(0, g.first, g.num_seqs * g.query_len) if g.rows is None else flat.index_select(0, g.rows)
        q = q.reshape(g.num_seqs, g.query_len, heads, -1).transpose(1, 2)  # (S, H, Lq, d)
        # index_select rather than advanced indexing (`cache[slots]`): the same gather, 2-3x faster on CPU.
        k = k_cache.index_select(0, g.slots).view(g.num_seqs, g.context_len, *k_cache.shape[1:]).transpose(1, 2)
        v = v_cache.index_select(0, g.slots).view(g.num_seqs, g.context_len, *v_cache.shape[1:]).transpose(1, 2)
        if sinks is not None:
            o = attend_with_sinks(q, k, v, g.mask(window, explicit=True), scaling, sinks)
        else:
            mask = g.mask(window)
            gqa = k.shape[1] != heads
            causal = mask is None and g.causal
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=gqa)
        o = o.transpose(1, 2).reshape(g.num_seqs * g.query_len, heads, -1)
        outs.append(o if g.take is None else o.index_select(0, g.take))
    if len(groups) == 1 and groups[0].rows is None:  # one run from row 0: the whole batch, in order
        # Contiguous, as transformers' own attention functions return it: some modules `view` the output.
        return outs[0].unsqueeze(0).contiguous()
    out = flat.new_empty(flat.shape[0], heads, outs[0].shape[-1])
    for g, o in zip(groups, outs, strict=True):
        if g.dest is None:
            out.narrow(0, g.first, o.shape[0]).copy_(o)
        else:
            out.index_copy_(0, g.dest, o)
    return out.unsqueeze(0)


def attend_with_sinks(
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
