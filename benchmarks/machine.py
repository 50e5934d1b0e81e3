"""Where a benchmark ran: the machine description every results file carries."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class Machine:
    """Platform, CPUs, Python and torch of the process that measured."""

    platform: str
    machine: str
    processor: str | None
    python: str
    cpu_count: int | None
    cpus_usable: int | None
    """Containers often pin fewer cores than the host has."""
    torch: str | None
    torch_threads: int | None
    cuda: str | None
    """The GPU torch sees, if any."""


def machine_info() -> Machine:
    """This machine (and the GPU, if torch sees one; torch is optional here, so the HTTP tools run without it)."""
    try:
        import torch
    except ImportError:
        torch_version, threads, cuda = None, None, None
    else:
        torch_version, threads = torch.__version__, torch.get_num_threads()
        cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return Machine(
        platform=platform.platform(),
        machine=platform.machine(),
        processor=platform.processor() or None,
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        cpus_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        torch=torch_version,
        torch_threads=threads,
        cuda=cuda,
    )
