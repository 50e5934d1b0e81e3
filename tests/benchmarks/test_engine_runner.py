"""The in-process runners on the tiny model (the engine on a thread, and in a child process): runs are bounded
in time, failures are reported, not hidden, and each request's engine timeline comes back."""

from __future__ import annotations

import time

import pytest

from benchmarks.child_runner import ChildRunner
from benchmarks.engine_runner import EngineRunner
from benchmarks.metrics import EngineCounts
from benchmarks.runners import BenchmarkError, Runner
from benchmarks.workload import RequestSpec, Workload
from qllm_core import EngineConfig, Granularity

RUNNERS = [EngineRunner, ChildRunner]


def _config() -> EngineConfig:
    return EngineConfig(model="tiny", device="cpu", policy="qllm", granularity=Granularity.LAYER)


@pytest.mark.parametrize("make", RUNNERS)
async def test_drain_timeout_bounds_a_run_and_frees_the_engine(make: type[Runner]) -> None:
    # Two requests far longer than the timeout (thousands of decode steps each).
    long = tuple(RequestSpec(i, 0.0, "be", 3000, prompt_token_ids=(5, 6, 7)) for i in range(2))
    async with make(_config()) as runner:  # type: ignore[call-arg]
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


@pytest.mark.parametrize("make", RUNNERS)
async def test_runner_must_be_started(make: type[Runner]) -> None:
    runner = make(_config())  # type: ignore[call-arg]
    (record,) = await runner.run(Workload((RequestSpec(0, 0.0, "ls", 2, (4,)),), 1.0, "test"), 5.0)
    assert record.error is not None and "not started" in record.error


@pytest.mark.parametrize("make", RUNNERS)
async def test_each_request_brings_back_the_engine_timeline_of_its_first_token(make: type[Runner]) -> None:
    specs = tuple(
        RequestSpec(i, 0.01 * i, "ls" if i % 2 else "be", 3, prompt_token_ids=tuple(range(5, 5 + 8 * (i + 1))))
        for i in range(4)
    )
    async with make(_config(), label="tiny") as runner:  # type: ignore[call-arg]
        records = await runner.run(Workload(specs, 100.0, "test"), drain_timeout_s=30)
        # A request the engine rejects fails as data, and the runner goes on serving.
        (bad,) = await runner.run(Workload((RequestSpec(0, 0.0, "ls", 2, (900,)),), 1.0, "test"), 10.0)
    assert bad.error is not None and not bad.completed
    for record, spec in zip(records, specs, strict=True):
        assert record.completed and record.output_tokens == 3, record.error
        t = record.timeline
        assert t is not None and record.ttft_s is not None
        assert record.prompt_tokens == spec.prompt_len
        assert t.prefill_passes >= 1 and t.own_pass_s > 0
        # The engine's clock starts after the client's send and stops before the client sees the token.
        assert 0 < t.ttft_s <= record.ttft_s
        assert t.queued_s <= t.ttft_s and t.own_pass_s + t.foreign_pass_s <= t.ttft_s + 1e-9


@pytest.mark.parametrize("make", RUNNERS)
async def test_engine_counts_around_a_run_count_its_passes(make: type[Runner]) -> None:
    # One request of 4 tokens alone under fcfs at iteration: a prefill pass and 3 decode passes, no preemption.
    config = EngineConfig(model="tiny", device="cpu", policy="fcfs", granularity=Granularity.ITERATION)
    async with make(config) as runner:  # type: ignore[call-arg]
        before = await runner.engine_counts()
        (record,) = await runner.run(Workload((RequestSpec(0, 0.0, "ls", 4, (5, 6, 7)),), 1.0, "test"), 10.0)
        after = await runner.engine_counts()
    assert record.completed and before is not None and after is not None
    assert after.since(before) == EngineCounts(passes=4, preemptions=0, merges=0)
