"""The engine-owned KV memory: a fixed pool of blocks, handed to requests and checked on every change."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qllm_core.state_pool import StateLayout, StatePool
from qllm_core.transfer import to_device


class KVAccountingError(RuntimeError):
    """The pool's books do not balance (a bug, never a user error)."""


# Below this many positions, building slot ids in Python beats tensor arithmetic (measured on CPU).
_SHORT_RANGE = 128


@dataclass(frozen=True)
class LayerKV:
    """What one token's KV looks like in one layer."""

    num_kv_heads: int
    k_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class KVLayout:
    """What one token's KV looks like in each layer (None: the layer keeps no KV, e.g. a recurrent layer):
    the model says (`StagedModel.kv_layout`), the pool holds."""

    layers: tuple[LayerKV | None, ...]
    state: StateLayout | None = None
    """Each layer's recurrent state, for a model with recurrent layers (the pool then has state slots)."""

    @classmethod
    def uniform(cls, num_layers: int, num_kv_heads: int, k_head_dim: int, v_head_dim: int | None = None) -> KVLayout:
        """Every layer keeps KV of one shape."""
        return cls((LayerKV(num_kv_heads, k_head_dim, v_head_dim or k_head_dim),) * num_layers)

    @property
    def num_layers(self) -> int:
        """Decoder layers, with or without KV."""
        return len(self.layers)

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes one token's K and V take over every layer."""
        return dtype.itemsize * sum(kv.num_kv_heads * (kv.k_head_dim + kv.v_head_dim) for kv in self.layers if kv)


class KVCache:
    """Paged KV memory for every layer: `num_blocks` blocks of `block_size` token slots each.

    K and V for layer `l` live in `k[l]` / `v[l]`, shaped (num_slots, kv_heads, k_head_dim) and
    (num_slots, kv_heads, v_head_dim), each layer with its own heads and widths (they differ between
    layers in Gemma 4 and MiMo, and between keys and values in multi-head latent attention); a layer that
    keeps no KV has None there. One block table serves every layer: a request owns a list of blocks and
    token position `p` lives in slot `table[p // block_size] * block_size + p % block_size` of each layer.

    With `state` (a model with recurrent layers), a request also gets a state slot on its first
    `allocate` and gives it back on `free`; the slot is charged `state.block_cost` blocks of the pool,
    so admission and memory relief count it as they count KV.
    """

    def __init__(
        self,
        layout: KVLayout,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        state: StatePool | None = None,
    ) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.layout = layout
        slots = num_blocks * block_size
        self.k: list[torch.Tensor | None] = [
            None if kv is None else torch.zeros((slots, kv.num_kv_heads, kv.k_head_dim), dtype=dtype, device=device)
            for kv in layout.layers
        ]
        self.v: list[torch.Tensor | None] = [
            None if kv is None else torch.zeros((slots, kv.num_kv_heads, kv.v_head_dim), dtype=dtype, device=device)
            for kv in layout.layers
        ]
        self.device = device
        self.state = state
        # Popping from the end hands out low block ids first, which keeps tests readable.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[str, list[int]] = {}
        self._charged: dict[str, list[int]] = {}
        """Blocks each request's state slot is charged (held out of the free list, not in its table)."""
        # Kept apart from the free list, so that `check` compares two books in O(1); `audit` recounts it.
        self._used = 0

    @classmethod
    def for_layout(
        cls,
        layout: KVLayout,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        """A pool shaped for a model's KV layout and, for a model with recurrent layers, its state slots:
        as many as the pool can charge (every holder is charged `block_cost` blocks)."""
        pool = None
        state = layout.state
        if state is not None:
            cost = state.block_cost(layout.bytes_per_token(dtype), block_size)
            pool = StatePool(state, max(1, num_blocks // cost), cost, device)
        return cls(layout, num_blocks, block_size, dtype, device, state=pool)

    @property
    def free_blocks(self) -> int:
        """Blocks no request holds."""
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        """Blocks held by requests."""
        return self._used

    @property
    def capacity_tokens(self) -> int:
        """Token slots in the whole pool."""
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def request_blocks(self, num_tokens: int) -> int:
        """Blocks a request of `num_tokens` tokens holds at most: its KV and, on a model with recurrent layers,
        its state slot's charge (what admission must compare with `num_blocks`)."""
        return self.blocks_for(num_tokens) + (self.state.block_cost if self.state is not None else 0)

    def extra_blocks(self, request_id: str, num_tokens: int) -> int:
        """Blocks a request must still get so that it holds `num_tokens` tokens (and, on a model with
        recurrent layers, its state slot when it has none yet)."""
        table = self._tables.get(request_id)
        charge = self.state.block_cost if self.state is not None and table is None else 0
        return max(0, self.blocks_for(num_tokens) - len(table or ())) + charge

    def allocate(self, request_id: str, num_tokens: int) -> None:
        """Grow a request's table to hold `num_tokens` tokens; the caller checked `extra_blocks` fits. A
        request new to the pool also gets a zeroed state slot when the model has recurrent layers."""
        need = self.extra_blocks(request_id, num_tokens)
        if need > len(self._free):
            raise KVAccountingError(
                f"request {request_id} needs {need} blocks but only {len(self._free)} are free; "
                "the scheduler must check capacity before allocating"
            )
        if request_id not in self._tables and self.state is not None:
            self.state.acquire(request_id)
            charged = [self._free.pop() for _ in range(self.state.block_cost)]
            self._charged[request_id] = charged
            self._used += len(charged)
            need -= len(charged)
        table = self._tables.setdefault(request_id, [])
        for _ in range(need):
            table.append(self._free.pop())
        self._used += need
        self.check()

    def free(self, request_id: str) -> int:
        """Return every block of a request (and its state slot) to the pool; returns how many blocks were freed."""
        table = self._tables.pop(request_id, []) + self._charged.pop(request_id, [])
        if self.state is not None:
            self.state.release(request_id)
        self._free.extend(reversed(table))
        self._used -= len(table)
        self.check()
        return len(table)

    def holds(self, request_id: str) -> bool:
        """True when the request owns blocks."""
        return request_id in self._tables

    def owner(self, slot: int) -> str:
        """The request whose table holds KV slot `slot` (a linear search: for models with recurrent state only)."""
        block = slot // self.block_size
        return next(rid for rid, table in self._tables.items() if block in table)

    def slots(self, request_id: str, start: int, end: int) -> torch.Tensor:
        """Slot indices of token positions [start, end) of a request, on the cache's device."""
        table, bs = self._tables[request_id], self.block_size
        if end - start <= _SHORT_RANGE:  # a few positions (a short prompt): plain Python is cheapest
            flat = [table[p // bs] * bs + p % bs for p in range(start, end)]
            return to_device(flat, self.device)
        # A long range (a prompt and its context): per-block tensor arithmetic, constant in length.
        first = start // bs
        blocks = torch.tensor(table[first : -(-end // bs)], dtype=torch.long)
        flat_t = (blocks[:, None] * bs + torch.arange(bs)).flatten()[start - first * bs : end - first * bs]
        return to_device(flat_t, self.device)

    def block_tables(self, request_ids: list[str]) -> torch.Tensor:
        """(batch, longest table) block ids of the requests, padded with block 0, on the cache's device."""
        tables = [self._tables[rid] for rid in request_ids]
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        return to_device(padded, self.device)

    def check(self) -> None:
        """Verify free + used == total (cheap: run on every change)."""
        free, used = len(self._free), self.used_blocks
        if free + used != self.num_blocks:
            raise KVAccountingError(f"KV books broken: free={free} + used={used} != total={self.num_blocks}")

    def audit(self) -> None:
        """`check` plus: no block is owned twice or both owned and free (O(blocks): for tests and debugging)."""
        self.check()
        owned = [b for books in (self._tables, self._charged) for t in books.values() for b in t]
        if len(owned) != self._used:
            raise KVAccountingError(f"KV books broken: the tables hold {len(owned)} blocks but used={self._used}")
        if len(set(owned) | set(self._free)) != self.num_blocks:
            raise KVAccountingError(
                f"KV books broken: {self.num_blocks} blocks in total but "
                f"{len(set(owned) | set(self._free))} distinct ids tracked (a block is owned twice)"
            )
