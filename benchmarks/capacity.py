"""The rate at which a target saturates: what `--rates-of-capacity` scales its rates by.

Method: `requests` requests of the run's workload (its lengths and classes) all arrive at once, so the
target works flat out with a queue behind it. The saturation rate is the completions per second between
the completion at the first quartile of the burst and the one at the third, (j - i) / (t_j - t_i): the
ramp-up and the drain tail, when the batch is not full, are left out, and while the burst's requests ask
for equal lengths (a reply cap makes most of them equal) they finish in waves of a batch, which two
boundaries half the burst apart span evenly. The third quartile must come before the last request got its
first token (requests were still queued throughout): more than four batches of requests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.metrics import RequestRecord
from benchmarks.runners import BenchmarkError, Runner
from benchmarks.workload import Workload

METHOD = (
    "all probe requests offered at once; completions per second between the burst's first- and third-quartile "
    "completions, requests still queued throughout"
)


@dataclass(frozen=True)
class CapacityProbe:
    """A target's saturation rate and how it was found."""

    rate_rps: float
    target: str
    """The target probed (fcfs in process, or the endpoint), or "given"."""
    method: str
    requests: int
    window_s: float | None
    completed_in_window: int | None

    @classmethod
    def given(cls, rate_rps: float) -> CapacityProbe:
        """A saturation rate stated by the user (not measured in this sweep)."""
        return cls(rate_rps, "given", "given on the command line", 0, None, None)


def capacity_from_records(records: Sequence[RequestRecord], target: str) -> CapacityProbe:
    """The saturation rate from a burst's records (see the module docstring)."""
    failed = [r for r in records if not r.completed]
    if failed:
        raise BenchmarkError(
            f"{target}: {len(failed)} of {len(records)} capacity-probe requests did not finish "
            f"({failed[0].error}); raise --drain-timeout-s or lower --capacity-probe-requests"
        )
    finishes = sorted(r.finished_s for r in records if r.finished_s is not None)
    i, j = len(finishes) // 4, (3 * len(finishes)) // 4
    last_start = max(r.first_token_s for r in records if r.first_token_s is not None)
    if j <= i or finishes[j] <= finishes[i] or finishes[j] > last_start:
        raise BenchmarkError(
            f"{target}: the capacity probe's queue ran dry before its third-quartile completion; give "
            "--capacity-probe-requests of more than four times the engine's max_batch_size"
        )
    window = finishes[j] - finishes[i]
    return CapacityProbe((j - i) / window, target, METHOD, len(records), window, j - i)


async def probe_capacity(runner: Runner, workload: Workload, drain_timeout_s: float) -> CapacityProbe:
    """Offer `workload`'s requests all at once to `runner` and measure its saturation rate."""
    burst = tuple(dataclasses.replace(r, arrival_s=0.0) for r in workload.requests)
    records = await runner.run(Workload(burst, workload.rate, "capacity probe"), drain_timeout_s)
    return capacity_from_records(records, runner.label)
