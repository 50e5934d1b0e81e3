"""qllm benchmarks: open-loop LS/BE workloads, runners (in-process engine or HTTP endpoint), metrics and sweeps.

Modules, one job each:

- `workload`: the requests of one run (Poisson arrivals with ShareGPT-like lengths, or a replayed trace).
- `runners`: send a workload open-loop to an engine in this process or to an OpenAI-compatible endpoint.
- `metrics`: per-class TTFT, SLO attainment, turnaround and TPOT; throughput.
- `sweep`: every rate x policy, plus the SLO calibration and the machine description.
- `report` and `plots`: JSON, Markdown and PNG outputs.
- `progress`: the progress bar.
- `cli`: the `qllm-bench` console script.
"""

from benchmarks.metrics import ClassMetrics, Distribution, RequestRecord, RunMetrics, percentile, summarize
from benchmarks.workload import (
    LengthDistribution,
    RequestSpec,
    TraceError,
    Workload,
    WorkloadError,
    WorkloadSettings,
    load_trace,
    poisson_workload,
)

__all__ = [
    "ClassMetrics",
    "Distribution",
    "LengthDistribution",
    "RequestRecord",
    "RequestSpec",
    "RunMetrics",
    "TraceError",
    "Workload",
    "WorkloadError",
    "WorkloadSettings",
    "load_trace",
    "percentile",
    "poisson_workload",
    "summarize",
]
