"""qllm benchmarks: open-loop LS/BE workloads, runners (in-process engine or HTTP endpoint), metrics and sweeps.

Modules, one job each:

- `workload`: the requests of one run (Poisson arrivals, lengths from lognormals or a dataset's pairs).
- `trace`: a JSONL trace replayed exactly, and written back.
- `sharegpt`: ShareGPT's (prompt, reply) lengths, filtered as vLLM's serving benchmark does.
- `runners`: the open-loop driver and the HTTP runner (any OpenAI-compatible endpoint).
- `engine_runner`, `child_runner`: a `qllm_core.Engine` on a thread of this process, or in a child process.
- `calibration`: isolated TTFT by prompt length before and after each run (the slowdown's denominator).
- `capacity`: the saturation rate that `--rates-of-capacity` scales.
- `metrics`: per-class TTFT, slowdown, SLO attainment, turnaround and TPOT, the engine's TTFT breakdown;
  throughput.
- `aggregate`: each metric over seeds, per target and rate; LS goodput.
- `sweep_settings`, `sweep`, `results`: what a sweep runs, running it, and what it produced.
- `report` and `plots`: JSON, Markdown and PNG outputs.
- `progress`: the progress bar.
- `cli`: the `qllm-bench` console script.

Shared by `qllm-bench` and the side benchmarks (`engine_bench`, `host_overhead`, `decode_profile`, `router_bench`,
`soak`, `make_checkpoint`):

- `machine`: the machine description every results file carries.
- `json_form`: dataclasses to JSON and back by field name, and the one writer of results files.
- `checks`: the number checks of every setting (finite, integer, positive).
- `script_args`: the side benchmarks' shared options (`--model`, `--device`, `--dtype`, `--out`) and where
  results go.
"""

from benchmarks.metrics import ClassMetrics, Distribution, RequestRecord, RunMetrics, percentile, summarize
from benchmarks.trace import TraceError, load_trace
from benchmarks.workload import (
    LengthDistribution,
    RequestSpec,
    Workload,
    WorkloadError,
    WorkloadSettings,
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
