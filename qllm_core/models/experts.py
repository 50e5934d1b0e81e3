"""A fused experts module's arithmetic, one expert or a span of experts at a time.

Transformers 5 keeps a layer's routed experts in one module with stacked weights and describes their
layout in flags that its own kernels read (`use_experts_implementation`: `has_gate`, `has_bias`,
`is_transposed`, `has_post_expert_norm`, and the module's `_apply_gate`). The engine runs spans of experts
between preemption points, so it needs the same arithmetic outside the module: `ExpertKernel` reads
those flags once at load and runs one expert as the eager loop does, a span through `grouped_mm` as the
grouped kernel does, or (on a CPU, decode-sized) all experts as one padded batched product.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qllm_core.errors import ConfigError

# The flags transformers' `use_experts_implementation` sets on a fused experts module.
_FLAGS = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm")


class ExpertKernel:
    """One fused experts module's weights and arithmetic, resolved once at load."""

    def __init__(self, experts: nn.Module, family: str) -> None:
        """Raises ConfigError when `experts` is not a transformers fused-experts module."""
        missing = [f for f in (*_FLAGS, "num_experts", "down_proj") if not hasattr(experts, f)]
        if missing:
            raise ConfigError(
                f"model type {family!r} is not supported: its experts module {type(experts).__name__} is not "
                f"transformers' fused experts interface (it lacks {', '.join(missing)})"
            )
        e: Any = experts
        self.module = experts
        self.num_experts = int(e.num_experts)
        self.has_gate: bool = bool(e.has_gate)
        self.transposed: bool = bool(e.is_transposed)
        self.up: torch.Tensor = e.gate_up_proj if self.has_gate else e.up_proj
        self.down: torch.Tensor = e.down_proj
        self.up_bias: torch.Tensor | None = None
        self.down_bias: torch.Tensor | None = None
        if e.has_bias:
            self.up_bias = e.gate_up_proj_bias if self.has_gate else e.up_proj_bias
            self.down_bias = e.down_proj_bias
        self.post_norm: nn.Module | None = e.post_expert_norm if e.has_post_expert_norm else None
        # The module's own gating (clamps, interleaved halves) or plain activation, as its kernels call it.
        self.gate_fn = e._apply_gate if self.has_gate else e.act_fn
        # Each expert's weights as views of the stacked parameters (no copy), taken once so that a step does
        # not index them again.
        self.per_expert = list(
            zip(
                self.up.unbind(0),
                self.down.unbind(0),
                self.up_bias.unbind(0) if self.up_bias is not None else [None] * self.num_experts,
                self.down_bias.unbind(0) if self.down_bias is not None else [None] * self.num_experts,
                strict=True,
            )
        )

    @property
    def standard(self) -> bool:
        """True for the plain SwiGLU layout (no biases, weights (out, in), no post-expert norm)."""
        return self.up_bias is None and not self.transposed and self.post_norm is None

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # As the eager loops: `x @ W` for transposed weights, `linear(x, W)` otherwise, then a separate bias add.
        out = x @ weight if self.transposed else nn.functional.linear(x, weight)
        return out if bias is None else out + bias

    def one(self, expert: int, hidden: torch.Tensor) -> torch.Tensor:
        """One expert on its rows, with the eager loop's arithmetic."""
        up, down, up_bias, down_bias = self.per_expert[expert]
        out = self._linear(self.gate_fn(self._linear(hidden, up, up_bias)), down, down_bias)
        return out if self.post_norm is None else self.post_norm(out)

    def grouped(self, first: int, end: int, hidden: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Experts [first, end) on their rows (grouped by expert, `offsets` ending each group), one `grouped_mm`
        per projection, as transformers' grouped kernel runs a whole layer's experts."""
        up = self.up[first:end]
        down = self.down[first:end]
        if not self.transposed:
            up, down = up.transpose(-2, -1), down.transpose(-2, -1)
        out = nn.functional.grouped_mm(hidden, up, offs=offsets)
        if self.up_bias is not None:
            out = out + self._row_bias(self.up_bias, first, offsets, hidden.shape[0])
        out = nn.functional.grouped_mm(self.gate_fn(out), down, offs=offsets)
        if self.down_bias is not None:
            out = out + self._row_bias(self.down_bias, first, offsets, hidden.shape[0])
        return out if self.post_norm is None else self.post_norm(out)

    @staticmethod
    def _row_bias(bias: torch.Tensor, first: int, offsets: torch.Tensor, rows: int) -> torch.Tensor:
        """Each row's expert bias for a span grouped by `offsets` (a tensor op: no host read)."""
        row_expert = torch.searchsorted(
            offsets, torch.arange(rows, device=offsets.device, dtype=offsets.dtype), right=True
        )
        return bias.index_select(0, row_expert + first)

    def few_rows(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """A layer's routed experts for a few tokens (a lone decode, a small decode batch), expert by expert
        with plain matrix products on the hit experts' own weights: on a CPU the general kernels' sorting,
        histogram and padding cost more than the products at this size. CPU only: it reads the routing on
        the host (one `tolist`, free on a CPU, a sync on an accelerator).

        As transformers' grouped kernel: each (token, slot) row's expert output times its weight, summed over
        the slots in slot order; a token routed nowhere (index `num_experts`) adds nothing."""
        tokens, k = index.shape
        if tokens == 1:  # a lone decode: no gather, no scatter
            out = None
            for slot, expert in enumerate(index[0].tolist()):
                row = self.one(expert, hidden) * weights[:, slot : slot + 1] if expert < self.num_experts else None
                row = hidden.new_zeros(hidden.shape) if row is None else row
                out = row if out is None else out + row
            return out.to(hidden.dtype)  # type: ignore[union-attr]
        flat = index.reshape(-1).tolist()
        rows = hidden.new_zeros(tokens * k, self.down.shape[-1] if self.transposed else self.down.shape[-2])
        for expert in sorted(set(flat)):
            if expert >= self.num_experts:
                continue
            hits = torch.tensor([i for i, e in enumerate(flat) if e == expert], device=hidden.device)
            rows.index_copy_(0, hits, self.one(expert, hidden.index_select(0, hits // k)).to(rows.dtype))
        weighted = rows * weights.reshape(-1, 1)
        return weighted.view(tokens, k, -1).sum(dim=1).to(hidden.dtype)

    def batched(self, padded: torch.Tensor) -> torch.Tensor:
        """Every expert on its rows, padded to one length, (experts, rows, hidden) -> same: one batched matrix
        product per projection, which a multi-core CPU spreads over the experts. Standard layout only."""
        out = torch.bmm(padded, self.up.transpose(-2, -1))
        return torch.bmm(self.gate_fn(out), self.down.transpose(-2, -1))
