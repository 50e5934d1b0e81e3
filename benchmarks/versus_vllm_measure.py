"""The versus-vLLM run's measurements, each against one server through a `StreamingRunner`.

- `idle_ttft`: one request at a time, the minimum TTFT of `trials` calls per prompt length (the least
  disturbed call: what the server can do, not what the shared machine let it do that second).
- `lone_decode`: one request decoding alone; the median over calls of its mean gap between tokens.
- `batch_decode`: `batch` requests sent together; output tokens per second while all of them decode (from
  the moment the last one got its first token to the moment the first one got its last).
- `sustained_rate`: the highest Poisson rate at which the server keeps up with a workload: every request
  finishes, and the last within `drain_s` of the last arrival (its queue drains). Rates double from
  `start_rps` until one is lost (or halve until one is kept), then bisect between the last kept and the
  first lost. Each rate gets fresh prompts (`with_fresh_prompts`), so no run finds another's in a cache.
- `load_run`: one run of a workload; the per-class metrics of `benchmarks.metrics`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from benchmarks.metrics import RequestRecord, RunMetrics, summarize
from benchmarks.runners import BenchmarkError
from benchmarks.versus_vllm_client import CallTimes, PromptSource, StreamingRunner
from benchmarks.workload import Workload


@dataclass(frozen=True)
class IdleTtft:
    """TTFT of one prompt length on the idle server."""

    prompt_len: int
    min_s: float
    samples_s: tuple[float, ...]
    response_ids: tuple[str | None, ...]
    """The calls' response ids, in the order of `samples_s` (qllm's name its access-log lines)."""


@dataclass(frozen=True)
class LoneDecode:
    """Time per output token of one request decoding alone."""

    prompt_len: int
    output_tokens: int
    median_s: float
    samples_s: tuple[float, ...]


@dataclass(frozen=True)
class BatchDecode:
    """Decode throughput of `batch` requests decoding together."""

    batch: int
    prompt_len: int
    output_tokens: int
    tokens_per_s: float
    window_s: float
    tokens_in_window: int


@dataclass(frozen=True)
class RateTrial:
    """One rate tried by `sustained_rate`."""

    rate_rps: float
    kept_up: bool
    completed: int
    requests: int
    drain_s: float | None
    """Last finish minus last arrival; None when a request failed."""


@dataclass(frozen=True)
class SustainedRate:
    """The highest rate kept up with, and every rate tried."""

    rate_rps: float | None
    """None when even the first rate was lost."""
    drain_limit_s: float
    trials: tuple[RateTrial, ...]


async def idle_ttft(
    runner: StreamingRunner, prompts: PromptSource, lengths: Sequence[int], trials: int
) -> list[IdleTtft]:
    """The idle TTFT of each prompt length (see the module docstring)."""
    if trials < 1:
        raise BenchmarkError(f"trials must be >= 1, got {trials}")
    out: list[IdleTtft] = []
    for length in lengths:
        calls = [await runner.call(prompts.spec(length, 1)) for _ in range(trials)]
        samples = tuple(c.ttft_s for c in calls)
        out.append(IdleTtft(length, min(samples), samples, tuple(c.response_id for c in calls)))
    return out


async def lone_decode(
    runner: StreamingRunner, prompts: PromptSource, trials: int, prompt_len: int = 16, output_tokens: int = 64
) -> LoneDecode:
    """Time per token of a lone request (see the module docstring)."""
    if trials < 1 or output_tokens < 2:
        raise BenchmarkError("lone decode needs trials >= 1 and output_tokens >= 2")
    samples: list[float] = []
    for _ in range(trials):
        tpot = (await runner.call(prompts.spec(prompt_len, output_tokens))).tpot_s
        assert tpot is not None  # call() checked that every asked-for token came
        samples.append(tpot)
    return LoneDecode(prompt_len, output_tokens, statistics.median(samples), tuple(samples))


def decode_window(calls: Sequence[CallTimes]) -> tuple[float, int]:
    """The window in which every call was decoding, and the tokens that arrived inside it."""
    start = max(c.token_s[0] for c in calls)
    end = min(c.token_s[-1] for c in calls)
    if end <= start:
        raise BenchmarkError("the batch never decoded together (a request finished before another started)")
    return end - start, sum(1 for c in calls for t in c.token_s if start < t <= end)


async def batch_decode(
    runner: StreamingRunner, prompts: PromptSource, batch: int, prompt_len: int = 64, output_tokens: int = 64
) -> BatchDecode:
    """Decode throughput at `batch` (see the module docstring)."""
    if batch < 1 or output_tokens < 4:
        raise BenchmarkError("batch decode needs batch >= 1 and output_tokens >= 4")
    specs = [prompts.spec(prompt_len, output_tokens, "be", i) for i in range(batch)]
    calls = await asyncio.gather(*(runner.call(s) for s in specs))
    window, tokens = decode_window(calls)
    return BatchDecode(batch, prompt_len, output_tokens, tokens / window, window, tokens)


def kept_up(records: Sequence[RequestRecord], workload: Workload, drain_limit_s: float) -> RateTrial:
    """Whether a run kept up: every request finished, the last within `drain_limit_s` of the last arrival."""
    done = [r for r in records if r.completed and r.finished_s is not None]
    drain = None
    if len(done) == len(records):
        drain = max(r.finished_s for r in done if r.finished_s is not None) - workload.span_s
    ok = drain is not None and drain <= drain_limit_s
    return RateTrial(workload.rate, ok, len(done), len(records), drain)


async def sustained_rate(
    runner: StreamingRunner,
    workload_at: Callable[[float], Workload],
    start_rps: float,
    drain_limit_s: float,
    bisections: int = 3,
    halvings: int = 4,
) -> SustainedRate:
    """The highest Poisson rate kept up with (see the module docstring)."""
    if start_rps <= 0 or drain_limit_s <= 0:
        raise BenchmarkError("sustained_rate needs start_rps > 0 and drain_limit_s > 0")
    trials: list[RateTrial] = []

    async def attempt(rate: float) -> bool:
        workload = workload_at(rate)
        # A lost rate is stopped soon after the limit: waiting out an overloaded queue tells nothing more.
        records = await runner.run(workload, drain_timeout_s=drain_limit_s + 5.0)
        trials.append(kept_up(records, workload, drain_limit_s))
        return trials[-1].kept_up

    good: float | None = None
    bad = start_rps
    if await attempt(start_rps):
        good, bad = start_rps, start_rps * 2
        while await attempt(bad):
            good, bad = bad, bad * 2
    else:
        for _ in range(halvings):
            if await attempt(bad / 2):
                good = bad / 2
                break
            bad /= 2
    if good is None:
        return SustainedRate(None, drain_limit_s, tuple(trials))
    for _ in range(bisections):
        mid = (good + bad) / 2
        if await attempt(mid):
            good = mid
        else:
            bad = mid
    return SustainedRate(good, drain_limit_s, tuple(trials))


async def load_run(runner: StreamingRunner, workload: Workload, slo_s: float, drain_timeout_s: float) -> RunMetrics:
    """Per-class TTFT, TPOT and turnaround of one run of `workload`."""
    records = await runner.run(workload, drain_timeout_s=drain_timeout_s)
    return summarize(records, slo_s)


def with_fresh_prompts(workload: Workload, prompts: PromptSource) -> Workload:
    """`workload` with each prompt replaced by a fresh one of its length: a workload sent twice to one
    server (at two rates) must not find its prompts in the server's prefix cache the second time."""
    requests = tuple(
        dataclasses.replace(r, prompt_token_ids=prompts.prompt(max(2, r.prompt_len or 2)), prompt_text=None)
        for r in workload.requests
    )
    return dataclasses.replace(workload, requests=requests)
