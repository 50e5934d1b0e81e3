"""Per-sequence recurrent state beside the paged KV: a slot per request holding, for each recurrent layer,
its conv and recurrent states (Gated DeltaNet, Mamba-2, short convolutions, ...), in the shapes and dtypes
transformers' own cache keeps them.

The model's recurrent mixers read and write their state through transformers' `Cache` methods
(`get_conv_state`, `update_conv_state`, `get_recurrent_state`, `update_recurrent_state`,
`is_recording_past`); `SlotCache` answers them from the pool for the sequences of one call. A slot is
zeroed when a request gets it and freed with its KV (`KVCache.allocate`/`free`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qllm_core.errors import ConfigError


class StateReplayError(RuntimeError):
    """A sequence's recurrent state was asked to absorb tokens it already holds (a bug: a request given up
    from a suspended pass must lose its state, not replay its tokens into it)."""


@dataclass(frozen=True)
class StateShape:
    """One state tensor of one sequence: its shape without the batch dimension, and its dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes one sequence's tensor takes."""
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class LayerState:
    """A recurrent layer's states, by state index (most layers keep one of each; None: not kept)."""

    conv: tuple[StateShape | None, ...]
    recurrent: tuple[StateShape | None, ...]

    @property
    def nbytes(self) -> int:
        """Bytes one sequence's states take in this layer."""
        return sum(s.nbytes for s in (*self.conv, *self.recurrent) if s is not None)


@dataclass(frozen=True)
class StateLayout:
    """Each decoder layer's recurrent state (None: the layer keeps none), read at load from the model's own
    forward (`probe.state_layout`)."""

    layers: tuple[LayerState | None, ...]

    def block_cost(self, kv_bytes_per_token: int, block_size: int) -> int:
        """KV blocks a sequence's state is charged: its bytes over a block's (at least one)."""
        state = sum(layer.nbytes for layer in self.layers if layer is not None)
        per_block = kv_bytes_per_token * block_size
        return max(1, -(-state // per_block)) if per_block else 1


class StatePool:
    """`num_slots` state slots; a request holds at most one (`acquire` ... `release`)."""

    def __init__(self, layout: StateLayout, num_slots: int, block_cost: int, device: torch.device) -> None:
        self.layout = layout
        self.block_cost = block_cost
        """KV blocks each holder is charged (`KVCache` books them)."""
        self.conv: list[list[torch.Tensor | None]] = []
        self.recurrent: list[list[torch.Tensor | None]] = []
        for layer in layout.layers:
            conv, rec = (layer.conv, layer.recurrent) if layer is not None else ((), ())
            self.conv.append([_slots(s, num_slots, device) for s in conv])
            self.recurrent.append([_slots(s, num_slots, device) for s in rec])
        self._free = list(range(num_slots - 1, -1, -1))
        self._slot: dict[str, int] = {}
        self._seen: dict[int, list[int]] = {}
        """Per held slot, per layer: the tokens its state has absorbed."""

    def acquire(self, request_id: str) -> int:
        """A zeroed slot for a request new to the pool."""
        if not self._free:
            raise ConfigError("no recurrent-state slot is free; the KV pool must charge slots (a bug)")
        slot = self._free.pop()
        for tensors in (*self.conv, *self.recurrent):
            for t in tensors:
                if t is not None:
                    t[slot].zero_()
        self._slot[request_id] = slot
        self._seen[slot] = [0] * len(self.layout.layers)
        return slot

    def release(self, request_id: str) -> None:
        """Give a request's slot back (nothing when it holds none)."""
        slot = self._slot.pop(request_id, None)
        if slot is not None:
            del self._seen[slot]
            self._free.append(slot)

    def slot(self, request_id: str) -> int:
        """The request's slot."""
        return self._slot[request_id]

    def advance(self, layer: int, slots: list[int], starts: list[int], lengths: list[int]) -> None:
        """Book that layer `layer` fed `lengths` tokens from positions `starts` into the slots' states. A state
        that already holds a position it is fed again is refused (a replay); one fed from beyond what it holds
        is not: the cost model's calibration times throw-away passes over contexts it never prefilled."""
        for slot, start, n in zip(slots, starts, lengths, strict=True):
            seen = self._seen[slot]
            if seen[layer] > start:
                raise StateReplayError(
                    f"layer {layer}: a sequence's state holds {seen[layer]} tokens but is fed from position {start}"
                )
            seen[layer] = start + n


def _slots(shape: StateShape | None, num_slots: int, device: torch.device) -> torch.Tensor | None:
    if shape is None:
        return None
    return torch.zeros((num_slots, *shape.shape), dtype=shape.dtype, device=device)


class SlotCache:
    """What a recurrent mixer sees as its `cache` for one call over some sequences (batch order = `slots`):
    transformers' `Cache` state methods, answered from the pool. `commit` writes the call's states back
    (mixers also update the states they got in place, e.g. in a single-token decode)."""

    def __init__(self, pool: StatePool, slots: list[int], fresh: bool) -> None:
        """`fresh`: the sequences start at position 0 (no previous state); a call never mixes the two."""
        self._pool = pool
        self._slots = slots
        self._index = torch.tensor(slots, device=_device(pool))
        self._fresh = fresh
        self._live: dict[tuple[int, bool, int], torch.Tensor] = {}

    def _stored(self, layer: int, conv: bool, state_idx: int) -> torch.Tensor:
        key = (layer, conv, state_idx)
        if key not in self._live:
            pool = (self._pool.conv if conv else self._pool.recurrent)[layer][state_idx]
            if pool is None:
                raise ConfigError(f"layer {layer} keeps no {'conv' if conv else 'recurrent'} state {state_idx}")
            self._live[key] = pool.index_select(0, self._index)
        return self._live[key]

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        """The sequences' conv state, or None before their first token."""
        return None if self._fresh else self._stored(layer_idx, True, state_idx)

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        """The sequences' recurrent state, or None before their first token."""
        return None if self._fresh else self._stored(layer_idx, False, state_idx)

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        """True once the sequences have absorbed a token."""
        return not self._fresh

    def is_recording_past(self, layer_idx: int) -> bool:
        """Never: the pool keeps only what the next token needs."""
        return False

    def update_conv_state(
        self,
        conv_states: torch.Tensor,
        layer_idx: int,
        state_idx: int = 0,
        conv_kernel_size: int | None = None,
        **_: object,
    ) -> torch.Tensor:
        """As transformers' `LinearAttentionLayer`: the new inputs after the stored ones (or left-padded with
        zeros on the first call) are returned whole, and their last kernel-size columns kept."""
        pool = self._pool.conv[layer_idx][state_idx]
        assert pool is not None  # noqa: S101
        kernel = pool.shape[-1]
        if self._fresh:
            full = conv_states
            if full.shape[-1] < kernel:
                full = torch.nn.functional.pad(full, (kernel - full.shape[-1], 0), value=0)
        else:
            full = torch.cat([self._stored(layer_idx, True, state_idx), conv_states], dim=-1)
        self._live[(layer_idx, True, state_idx)] = full[..., -kernel:]
        return full

    def update_recurrent_state(
        self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **_: object
    ) -> torch.Tensor:
        """Keep the sequences' new recurrent state."""
        self._live[(layer_idx, False, state_idx)] = recurrent_states
        return recurrent_states

    def get_linear_cache(self, layer_idx: int) -> torch.Tensor | None:
        """MiniMax's name for its lightning attention's recurrent state."""
        return self.get_recurrent_state(layer_idx)

    def set_linear_cache(self, layer_idx: int, linear_cache: torch.Tensor) -> None:
        """MiniMax's name for keeping its lightning attention's new recurrent state."""
        self.update_recurrent_state(linear_cache, layer_idx)

    def commit(self) -> None:
        """Write every state of this call back to the sequences' slots."""
        for (layer, conv, state_idx), value in self._live.items():
            pool = (self._pool.conv if conv else self._pool.recurrent)[layer][state_idx]
            assert pool is not None  # noqa: S101
            pool.index_copy_(0, self._index, value.to(pool.dtype))


def _device(pool: StatePool) -> torch.device:
    for tensors in (*pool.conv, *pool.recurrent):
        for t in tensors:
            if t is not None:
                return t.device
    return torch.device("cpu")
