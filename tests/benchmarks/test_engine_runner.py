"""The in-process runner on the tiny model: runs are bounded in time, failures are reported, not hidden."""

from __future__ import annotations

import time

import pytest

from benchmarks.runners import BenchmarkError, EngineRunner
from benchmarks.workload import RequestSpec, Workload
from qllm_core import EngineConfig


def _config() -> EngineConfig:
    return EngineConfig(model="tiny", device="cpu", policy="qllm", granularity="layer")


async def test_drain_timeout_bounds_a_run_and_frees_the_engine() -> None:
    # Two requests far longer than the timeout (thousands of decode steps each).
    long = tuple(RequestSpec(i, 0.0, "be", 3000, prompt_token_ids=(5, 6, 7)) for i in range(2))
    async with EngineRunner(_config()) as runner:
        start = time.monotonic()
        records = await runner.run(Workload(long, 1.0, "test"), drain_timeout_s=0.5)
        assert time.monotonic() - start < 5.0
        assert all(not r.completed and r.error == "not finished within the drain timeout" for r in records)
        assert all(0 < r.output_tokens < 3000 for r in records)
        # The cancelled requests were aborted: a new one is served at once, not queued behind them.
        (after,) = await runner.run(Workload((RequestSpec(0, 0.0, "be", 4, (9, 9)),), 1.0, "test"), 10.0)
    assert after.completed and after.ttft_s is not None and after.ttft_s < 0.5


async def test_warmup_failure_is_loud_and_calibration_measures_a_decode_step() -> None:
    async with EngineRunner(_config(), label="qllm:layer") as runner:
        with pytest.raises(BenchmarkError, match=r"qllm:layer: 1 of 1 warm-up requests failed: .*token ids"):
            await runner.warmup(1, token_range=(600, 700))  # beyond the vocabulary of 512
        decode_s = await runner.measure_decode_iteration(batch=2, prompt_len=8, max_tokens=5)
    assert 0 < decode_s < 0.5


async def test_runner_must_be_started() -> None:
    runner = EngineRunner(_config())
    (record,) = await runner.run(Workload((RequestSpec(0, 0.0, "ls", 2, (4,)),), 1.0, "test"), 5.0)
    assert record.error is not None and "not started" in record.error
