"""The async front: streaming, many concurrent callers, abort and cancellation, bad input, shutdown."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from qllm_core import (
    DuplicateRequestError,
    Engine,
    EngineConfig,
    EngineStoppedError,
    FinishReason,
    InvalidRequestError,
    PromptTooLongError,
    RequestOutput,
    SamplingParams,
)
from qllm_core.engine import Command
from qllm_core.metrics import ENGINE_METRICS, PrometheusBackend, exported_names
from tests.conftest import DEVICE


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    e = Engine(EngineConfig(model="tiny", device=DEVICE, dtype="float32"))
    yield e
    e.shutdown()


async def collect(it: object) -> list[RequestOutput]:
    return [out async for out in it]  # type: ignore[attr-defined]


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_streams_each_new_token_and_the_whole_output_at_the_end(engine: Engine) -> None:
    outs = await collect(
        engine.generate(prompt="hello", params=SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    )
    assert [o.num_output_tokens for o in outs] == list(range(1, 9))
    assert all(len(o.new_token_ids) == 1 for o in outs)
    assert all(not o.finished and not o.token_ids for o in outs[:-1]) and outs[-1].finished
    assert outs[-1].finish_reason is FinishReason.LENGTH
    assert outs[-1].token_ids == tuple(t for o in outs for t in o.new_token_ids)
    assert outs[-1].text == engine.tokenizer.decode(list(outs[-1].token_ids), skip_special_tokens=True)
    assert "".join(o.text_delta for o in outs) == outs[-1].text
    assert outs[-1].ttft_s is not None and outs[-1].ttft_s > 0


async def test_greedy_is_deterministic_and_seeded_sampling_repeats(engine: Engine) -> None:
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    a = await collect(engine.generate(prompt="the fox", params=greedy))
    b = await collect(engine.generate(prompt_token_ids=engine.tokenizer("the fox").input_ids, params=greedy))
    assert a[-1].token_ids == b[-1].token_ids
    seeded = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=42, ignore_eos=True)
    c = await collect(engine.generate(prompt="the fox", params=seeded))
    d = await collect(engine.generate(prompt="the fox", params=seeded))
    assert c[-1].token_ids == d[-1].token_ids


async def test_stop_strings_cut_the_text_and_finish_with_stop(engine: Engine) -> None:
    free = await collect(engine.generate(prompt="hi", params=SamplingParams(max_tokens=12, temperature=0.0)))
    text = free[-1].text
    assert len(text) >= 4
    stop = text[2:4]
    outs = await collect(
        engine.generate(prompt="hi", params=SamplingParams(max_tokens=12, temperature=0.0, stop=[stop]))
    )
    assert outs[-1].finish_reason is FinishReason.STOP
    assert stop not in outs[-1].text and text.startswith(outs[-1].text)
    assert "".join(o.text_delta for o in outs) == outs[-1].text


async def test_many_concurrent_callers_of_both_classes(engine: Engine) -> None:
    async def one(i: int) -> RequestOutput:
        params = SamplingParams(max_tokens=5 + i % 7, temperature=0.0, ignore_eos=True)
        outs = await collect(
            engine.generate(prompt=f"request number {i}", params=params, priority="ls" if i % 3 else "be")
        )
        return outs[-1]

    finals = await asyncio.gather(*(one(i) for i in range(40)))
    assert [len(f.token_ids) for f in finals] == [5 + i % 7 for i in range(40)]
    await wait_for(lambda: engine.stats().kv_used_blocks == 0)
    stats = engine.stats()
    assert stats.classes["latency_sensitive"].recent_ttft_s and stats.classes["best_effort"].recent_ttft_s


async def test_abort_frees_the_kv_and_ends_the_stream(engine: Engine) -> None:
    stream = engine.generate(
        prompt="abort me", params=SamplingParams(max_tokens=2000, ignore_eos=True), request_id="to-abort"
    )
    first = await stream.__anext__()
    assert not first.finished and engine.stats().kv_used_blocks > 0
    assert await engine.abort("to-abort")
    rest = [o async for o in stream]
    assert rest and rest[-1].finished and rest[-1].finish_reason is FinishReason.ABORT
    await wait_for(lambda: engine.stats().kv_used_blocks == 0, timeout=1.0)
    assert not await engine.abort("to-abort"), "a finished request is unknown"


async def test_a_caller_that_stops_listening_has_its_request_aborted(engine: Engine) -> None:
    stream = engine.generate(prompt="walk away", params=SamplingParams(max_tokens=2000, ignore_eos=True))
    await stream.__anext__()
    await stream.aclose()  # type: ignore[attr-defined]
    await wait_for(lambda: engine.stats().kv_used_blocks == 0, timeout=1.0)
    assert sum(c.running + c.ready + c.waiting for c in engine.stats().classes.values()) == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "param"),
    [
        ({"prompt": ""}, InvalidRequestError, "prompt"),
        ({}, InvalidRequestError, "prompt"),
        ({"prompt": "a", "prompt_token_ids": [1]}, InvalidRequestError, "prompt"),
        ({"prompt_token_ids": []}, InvalidRequestError, "prompt"),
        ({"prompt_token_ids": [10**6]}, InvalidRequestError, "prompt"),
        ({"prompt_token_ids": ["a"]}, InvalidRequestError, "prompt"),
        ({"prompt": "a", "priority": "urgent"}, InvalidRequestError, "priority"),
        ({"prompt": "a", "ttft_deadline_s": -1}, InvalidRequestError, "ttft_deadline_s"),
        ({"prompt_token_ids": [5] * 5000}, PromptTooLongError, "prompt"),
        ({"prompt": "a", "params": SamplingParams(max_tokens=4096)}, PromptTooLongError, "max_tokens"),
        ({"prompt": "a", "params": SamplingParams(stop_token_ids=[100000])}, InvalidRequestError, "stop_token_ids"),
    ],
)
async def test_bad_input_gets_a_typed_error_and_the_engine_keeps_serving(
    engine: Engine, kwargs: dict[str, object], error: type[Exception], param: str
) -> None:
    with pytest.raises(error) as info:
        await collect(engine.generate(**kwargs))  # type: ignore[arg-type]
    assert info.value.param == param  # type: ignore[attr-defined]
    outs = await collect(engine.generate(prompt="still here", params=SamplingParams(max_tokens=3, ignore_eos=True)))
    assert len(outs[-1].token_ids) == 3


async def test_duplicate_request_id_is_refused_while_in_flight(engine: Engine) -> None:
    stream = engine.generate(prompt="one", params=SamplingParams(max_tokens=500, ignore_eos=True), request_id="dup")
    await stream.__anext__()
    with pytest.raises(DuplicateRequestError, match="already in use"):
        await collect(engine.generate(prompt="two", request_id="dup"))
    await engine.abort("dup")
    await collect(stream)


async def test_metrics_are_recorded_per_class(engine: Engine) -> None:
    await collect(engine.generate(prompt="m", params=SamplingParams(max_tokens=2), priority="be"))
    backend = engine.metrics.backend
    assert isinstance(backend, PrometheusBackend)
    collected = [s for m in backend.registry.collect() for s in m.samples]
    # Every sample is one the specs announce (the dashboard and rules are checked against the same names).
    assert {s.name for s in collected if not s.name.endswith("_created")} <= exported_names(ENGINE_METRICS)
    samples = {(s.name, s.labels.get("priority_class")): s.value for s in collected}
    assert samples[("qllm_time_to_first_token_seconds_count", "best_effort")] >= 1
    assert samples[("qllm_requests_finished_total", "best_effort")] >= 1


async def test_shutdown_ends_streams_and_refuses_new_work() -> None:
    e = Engine(EngineConfig(model="tiny", device=DEVICE))
    stream = e.generate(prompt="long", params=SamplingParams(max_tokens=3000, ignore_eos=True))
    await stream.__anext__()
    e.shutdown()
    with pytest.raises(EngineStoppedError):
        await collect(stream)
    with pytest.raises(EngineStoppedError):
        await collect(e.generate(prompt="late"))


async def test_arrival_is_stamped_at_submission_not_when_the_engine_gets_to_it() -> None:
    e = Engine(EngineConfig(model="tiny", device=DEVICE, policy="fcfs", granularity="iteration"))
    try:
        long_be = e.generate(prompt_token_ids=[7] * 3500, params=SamplingParams(max_tokens=1), priority="be")
        be_task = asyncio.create_task(collect(long_be))
        await asyncio.sleep(0.01)  # the BE pass is running; the LS request waits for its end
        start = asyncio.get_running_loop().time()
        ls = await collect(e.generate(prompt="ls", params=SamplingParams(max_tokens=1), priority="ls"))
        wall = asyncio.get_running_loop().time() - start
        await be_task
        assert ls[-1].ttft_s is not None and ls[-1].ttft_s >= 0.8 * wall
    finally:
        e.shutdown()


@pytest.mark.parametrize("granularity", ["layer", "expert"])
async def test_ls_arriving_mid_pass_is_noticed_at_the_next_preemption_point(granularity: str) -> None:
    """The loop runs a pass on through points the policy declined, but a queued command stops it there."""
    e = Engine(EngineConfig(model="tiny", device=DEVICE, policy="qllm", granularity=granularity))
    try:
        be = asyncio.create_task(
            collect(e.generate(prompt_token_ids=[7] * 3500, params=SamplingParams(max_tokens=1), priority="be"))
        )
        await wait_for(lambda: e.stats().classes["best_effort"].running == 1)
        ls = await collect(e.generate(prompt="ls", params=SamplingParams(max_tokens=1), priority="ls"))
        be_out = await be
        assert ls[-1].finished and be_out[-1].finished
        assert be_out[-1].preemptions == 1, "the BE prefill must have been suspended for the LS request"
        assert e.stats().preemptions == 1
    finally:
        e.shutdown()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the loop thread dies: expected
async def test_a_caller_queued_behind_a_failure_that_kills_the_loop_gets_engine_stopped() -> None:
    engine = Engine(EngineConfig(model="tiny", device=DEVICE))
    gate = threading.Event()
    engine._commands.put(Command(gate.wait, print))  # hold the loop inside its command drain

    class Fatal(BaseException):
        """Beyond what a command's failure guard catches (as KeyboardInterrupt is)."""

    def poison() -> None:
        raise Fatal("the interpreter is going down")

    engine._commands.put(Command(poison, print))
    first = asyncio.ensure_future(anext(engine.generate(prompt="hello", params=SamplingParams(max_tokens=4))))
    await asyncio.sleep(0.2)  # its `add` is queued behind the poison
    gate.set()
    with pytest.raises(EngineStoppedError):
        await asyncio.wait_for(first, timeout=10)
    with pytest.raises(EngineStoppedError):
        engine.check_health(60.0)
    # The dead loop's exception is reported when its thread ends: end it here, where it is expected.
    engine._thread.join(timeout=10)
    assert not engine._thread.is_alive()


async def test_a_command_that_raises_fails_only_its_caller_and_the_engine_keeps_serving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = Engine(EngineConfig(model="tiny", device=DEVICE))
    try:

        def broken_abort(request_id: str) -> list[RequestOutput]:
            raise RuntimeError(f"a bug while aborting {request_id}")

        monkeypatch.setattr(engine._core, "abort", broken_abort)
        with pytest.raises(RuntimeError, match="a bug while aborting r1"):
            await engine.abort("r1")
        monkeypatch.undo()
        outs = await collect(engine.generate(prompt="still here", params=SamplingParams(max_tokens=3)))
        assert outs[-1].finished and outs[-1].num_output_tokens == 3
        engine.check_health(60.0)
    finally:
        engine.shutdown()


async def test_a_request_cancelled_before_the_engine_accepts_it_never_runs_and_holds_no_kv() -> None:
    engine = Engine(EngineConfig(model="tiny", device=DEVICE))
    gate = threading.Event()
    try:
        entered = threading.Event()

        def hold() -> None:
            entered.set()
            gate.wait()

        engine._commands.put(Command(hold, print))  # the loop is busy: the add below waits in the queue
        await wait_for(entered.is_set)
        stream = engine.generate(prompt_token_ids=[5] * 40, params=SamplingParams(max_tokens=200, ignore_eos=True))
        first = asyncio.ensure_future(anext(stream))
        await wait_for(lambda: engine._commands.qsize() == 1)  # its add is queued
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        gate.set()
        await wait_for(lambda: engine._commands.qsize() == 0 and not engine._core.has_work())
        assert engine._core.kv.used_blocks == 0 and not engine._core.requests
        engine._core.audit()
        metrics = engine.metrics
        assert metrics.requests.labels("latency_sensitive", "abort")._value.get() == 1  # type: ignore[attr-defined]
        assert metrics.generated_tokens.labels("latency_sensitive")._value.get() == 0  # type: ignore[attr-defined]
    finally:
        gate.set()
        engine.shutdown()
