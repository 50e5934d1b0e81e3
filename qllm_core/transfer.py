"""Host data to device tensors without stalling the host.

On CUDA a plain `torch.tensor(data, device="cuda")` copies from pageable memory, which waits for all
queued GPU work: the host could not queue the next unit while the GPU runs this one. Staging through
pinned memory makes the copy asynchronous; PyTorch's pinned allocator keeps the buffer until the copy
has run, so dropping it at once is safe.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(data: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """`data` (ints, or a CPU tensor) as a long tensor on `device`; on CUDA the copy does not block the host."""
    host = torch.as_tensor(data, dtype=torch.long)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
