"""The engine-owned KV memory: a fixed pool of blocks, handed to requests and checked on every change."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qllm_core.transfer import to_device


class KVAccountingError(RuntimeError):
    """The pool's books do not balance (a bug, never a user error)."""


# Below this many positions, building slot ids in Python beats tensor arithmetic (measured on CPU).
_SHORT_RANGE = 128


@dataclass(frozen=True)
class KVLayout:
    """What one token's KV looks like in every layer: the model says (`StagedModel.kv_layout`), the pool holds."""

    num_layers: int
    num_kv_heads: int
    k_head_dim: int
    v_head_dim: int


class KVCache:
    """Paged KV memory for every layer: `num_blocks` blocks of `block_size` token slots each.

    K and V for layer `l` live in `k[l]` / `v[l]`, shaped (num_slots, kv_heads, k_head_dim) and
    (num_slots, kv_heads, v_head_dim): the widths differ in multi-head latent attention (DeepSeek-V2/V3,
    whose keys carry a rotary part the values lack). A request owns a list of blocks (its block table)
    and token position `p` lives in slot `table[p // block_size] * block_size + p % block_size`.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        v_head_dim: int | None = None,
    ) -> None:
        """`v_head_dim`: the values' width when it differs from the keys' (`head_dim`)."""
        self.block_size = block_size
        self.num_blocks = num_blocks
        slots = (num_layers, num_blocks * block_size, num_kv_heads)
        self.k = torch.zeros((*slots, head_dim), dtype=dtype, device=device)
        self.v = torch.zeros((*slots, v_head_dim or head_dim), dtype=dtype, device=device)
        self.device = device
        # Popping from the end hands out low block ids first, which keeps tests readable.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[str, list[int]] = {}
        # Kept apart from the free list, so that `check` compares two books in O(1); `audit` recounts it.
        self._used = 0

    @classmethod
    def for_layout(
        cls, layout: KVLayout, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> KVCache:
        """A pool shaped for a model's KV layout."""
        return cls(
            layout.num_layers,
            layout.num_kv_heads,
            layout.k_head_dim,
            num_blocks,
            block_size,
            dtype,
            device,
            v_head_dim=layout.v_head_dim,
        )

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

    def extra_blocks(self, request_id: str, num_tokens: int) -> int:
        """Blocks a request must still get so that it holds `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(self._tables.get(request_id, ())))

    def allocate(self, request_id: str, num_tokens: int) -> None:
        """Grow a request's table to hold `num_tokens` tokens; the caller checked `extra_blocks` fits."""
        need = self.extra_blocks(request_id, num_tokens)
        if need > len(self._free):
            raise KVAccountingError(
                f"request {request_id} needs {need} blocks but only {len(self._free)} are free; "
                "the scheduler must check capacity before allocating"
            )
        table = self._tables.setdefault(request_id, [])
        for _ in range(need):
            table.append(self._free.pop())
        self._used += need
        self.check()

    def free(self, request_id: str) -> int:
        """Return every block of a request to the pool; returns how many were freed."""
        table = self._tables.pop(request_id, [])
        self._free.extend(reversed(table))
        self._used -= len(table)
        self.check()
        return len(table)

    def holds(self, request_id: str) -> bool:
        """True when the request owns blocks."""
        return request_id in self._tables

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
        owned = [b for t in self._tables.values() for b in t]
        if len(owned) != self._used:
            raise KVAccountingError(f"KV books broken: the tables hold {len(owned)} blocks but used={self._used}")
        if len(set(owned) | set(self._free)) != self.num_blocks:
            raise KVAccountingError(
                f"KV books broken: {self.num_blocks} blocks in total but "
                f"{len(set(owned) | set(self._free))} distinct ids tracked (a block is owned twice)"
            )
