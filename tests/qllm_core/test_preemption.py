"""Sub-iteration preemption: a BE pass stops at a layer or expert boundary and resumes exactly there."""

from __future__ import annotations

from collections import Counter

from qllm_core import EngineConfig, SamplingParams
from qllm_core.config import Granularity
from qllm_core.engine_core import EngineCore
from qllm_core.forward import ForwardPass, Stage
from qllm_core.request import PriorityClass
from qllm_core.scheduler import BatchPlan
from tests.conftest import DEVICE, drain

LONG = [(i * 37) % 500 + 3 for i in range(600)]
SHORT = [11, 22, 33]
GREEDY = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


UNITS: dict[ForwardPass, Counter[tuple[int, Stage, int]]] = {}
"""Every unit each pass of the cores below ran, as (layer, stage, first expert): through the engine's hook."""


def _record(p: ForwardPass, layer: int, stage: Stage, expert: int) -> None:
    UNITS.setdefault(p, Counter())[(layer, stage, expert)] += 1


def _core(**kw: object) -> EngineCore:
    return EngineCore(EngineConfig.from_dict({"model": "tiny", "device": DEVICE, **kw}), on_unit=_record)


def executed(p: ForwardPass) -> Counter[tuple[int, Stage, int]]:
    """How often each (layer, stage, first expert) unit of a pass ran."""
    return UNITS.get(p, Counter())


def _assert_each_unit_ran_once(p: ForwardPass, num_layers: int) -> None:
    assert p.done
    ran = executed(p)
    assert set(ran.values()) == {1}, {k: v for k, v in ran.items() if v != 1}
    for stage in (Stage.ATTENTION, Stage.ROUTE, Stage.COMBINE):
        assert sorted(layer for layer, s, _ in ran if s is stage) == list(range(num_layers))


def test_layer_preempted_pass_resumes_at_the_same_layer() -> None:
    core = _core(granularity="layer", policy="qllm")
    core.add_request("be", LONG, GREEDY, "be")
    for _ in range(3):  # embed, layer 0, layer 1
        core.step()
    be_pass = core.active
    assert be_pass is not None and (be_pass.stage, be_pass.layer) == (Stage.ATTENTION, 2)
    executed_before = sum(executed(be_pass).values())

    core.add_request("ls", SHORT, GREEDY, "ls")
    first_ls_token = None
    while first_ls_token is None:
        outs = core.step()
        first_ls_token = next((o for o in outs if o.request_id == "ls"), None)
        # While the LS pass runs, the BE pass stays frozen where it stopped.
        if core.active is not be_pass:
            assert core.suspended == [be_pass]
            assert (be_pass.stage, be_pass.layer) == (Stage.ATTENTION, 2)
            assert sum(executed(be_pass).values()) == executed_before
    assert not be_pass.done, "the LS request got its token before the BE prefill finished"
    assert core.requests["be"].preemptions == 1

    finals = drain(core)
    _assert_each_unit_ran_once(be_pass, core.model.num_layers)
    reference = _core(granularity="iteration", policy="fcfs")
    reference.add_request("be", LONG, GREEDY, "be")
    assert finals["be"].token_ids == drain(reference)["be"].token_ids


def test_expert_preempted_pass_resumes_at_the_next_expert() -> None:
    core = _core(granularity="expert", policy="qllm")
    core.add_request("be", LONG, GREEDY, "be")
    while core.active is None or core.active.stage is not Stage.EXPERT_SPAN or core.active.layer != 1:
        core.step()
    core.step()  # one expert of layer 1 done, more to go
    be_pass = core.active
    assert be_pass is not None and be_pass.stage is Stage.EXPERT_SPAN
    position = (be_pass.layer, be_pass.stage)
    executed_before = dict(executed(be_pass))

    core.add_request("ls", SHORT, GREEDY, "ls")
    core.step()
    assert core.suspended == [be_pass] and core.active is not be_pass
    while "ls" in core.requests and not core.requests["ls"].output_token_ids:
        core.step()
        if be_pass in core.suspended:
            assert (be_pass.layer, be_pass.stage) == position
            assert dict(executed(be_pass)) == executed_before

    finals = drain(core)
    _assert_each_unit_ran_once(be_pass, core.model.num_layers)
    reference = _core(granularity="iteration", policy="fcfs")
    reference.add_request("be", LONG, GREEDY, "be")
    assert finals["be"].token_ids == drain(reference)["be"].token_ids


def _first_token_order(policy: str, granularity: str) -> list[str]:
    core = _core(granularity=granularity, policy=policy)
    core.add_request("be", LONG, GREEDY, "be")
    outputs = core.step()  # the BE prefill is under way (or, at iteration granularity, done)
    core.add_request("ls", SHORT, GREEDY, "ls")
    order: list[str] = []
    while outputs or core.has_work():
        for out in outputs:
            if out.num_output_tokens == 1:
                order.append(out.request_id)
        outputs = core.step()
    return order


def test_ls_during_long_be_prefill_gets_its_first_token_first() -> None:
    assert _first_token_order("qllm", "layer") == ["ls", "be"]
    assert _first_token_order("qllm", "expert") == ["ls", "be"]


def test_iteration_level_policies_make_ls_wait_for_the_be_prefill() -> None:
    assert _first_token_order("fcfs", "layer") == ["be", "ls"]
    assert _first_token_order("priority", "layer") == ["be", "ls"]
    assert _first_token_order("qllm", "iteration") == ["be", "ls"]


def test_an_aged_be_pass_advances_between_ls_passes_under_continuous_ls_load() -> None:
    clock = [0.0]
    core = EngineCore(
        EngineConfig(model="tiny", device=DEVICE, granularity="layer", be_max_wait_s=1.0), clock=lambda: clock[0]
    )
    core.add_request("be", LONG, GREEDY, "be")
    core.step()
    core.add_request("ls0", SHORT, GREEDY, "ls")
    core.step()
    be_pass = core.suspended[0]
    clock[0] = 1.5  # suspended for longer than the bound
    resumed_with_ls_waiting = 0
    for i in range(60):  # a steady stream of LS prompts, one every third step, 50 ms a step
        clock[0] += 0.05
        if i % 3 == 0:
            core.add_request(f"ls{i + 1}", [12 + i, 22, 33], GREEDY, "ls")
        was_suspended = be_pass in core.suspended
        ls_waiting = bool(core.table.queues().waiting[PriorityClass.LATENCY_SENSITIVE])
        core.step()
        resumed_with_ls_waiting += was_suspended and ls_waiting and core.active is be_pass
        if be_pass.done:
            break
    # It finished its prefill under that load, resuming (a layer at a time) even while LS prompts waited.
    assert be_pass.done and resumed_with_ls_waiting > 0
    assert core.requests["be"].preemptions > 1, "it was still preempted for LS prompts after aging"


def test_policy_is_asked_once_per_pass_until_a_request_arrives() -> None:
    core = _core(granularity="expert", policy="qllm")
    asked: list[int] = []
    decide = core.policy.should_preempt

    def counting(view: object) -> bool:
        asked.append(core.stats().passes_completed)
        return decide(view)  # type: ignore[arg-type]

    core.policy.should_preempt = counting  # type: ignore[method-assign]
    core.add_request("be", LONG, GREEDY, "be")
    for _ in range(20):  # twenty preemption points of the BE prefill, nothing new: asked once
        core.step()
    assert len(asked) == 1 and core.stats().preemptions == 0
    core.add_request("ls", SHORT, GREEDY, "ls")
    core.step()  # asked again, and this time it preempts
    assert len(asked) == 2 and core.stats().preemptions == 1
    drain(core)
    # The suspended BE prefill does not run between the LS request's decode steps: it resumes once, after them.
    assert core.stats().preemptions == 1 and core.stats().resumes == 1


def test_a_pass_the_policy_could_never_preempt_runs_without_preemption_points() -> None:
    core = _core(granularity="expert", policy="fcfs")
    core.add_request("be", LONG, GREEDY, "be")
    for _ in range(GREEDY.max_tokens):  # the prefill, then each decode pass: one step each, experts fused
        done = core.stats().passes_completed
        assert core.step() and core.active is None and core.stats().passes_completed == done + 1
    assert not core.has_work()


def test_qllm_stops_a_be_prefill_between_experts_and_a_decode_pass_between_layers() -> None:
    core = _core(granularity="expert", policy="qllm")
    core.add_request("be", LONG, GREEDY, "be")
    core.step()
    prefill = core.active
    assert prefill is not None and prefill.granularity is Granularity.EXPERT
    while core.active is prefill:
        core.step()
    assert any(stage is Stage.EXPERT_SPAN for _, stage, _ in executed(prefill))
    assert not any(stage is Stage.ALL_EXPERTS for _, stage, _ in executed(prefill))
    core.step()
    decode = core.active
    # A decode-sized pass stops between layers, where an LS pass can merge into it, with its experts fused.
    assert decode is not None and decode.granularity is Granularity.LAYER
    drain(core)
    assert any(stage is Stage.ALL_EXPERTS for _, stage, _ in executed(decode))
    assert not any(stage is Stage.EXPERT_SPAN for _, stage, _ in executed(decode))


def test_an_ls_prompt_merges_into_the_decode_pass_it_preempted_when_merging_is_on() -> None:
    core = _core(granularity="layer", policy="qllm", dtype="float64", merge_ls_into_be=True)
    reference = _core(granularity="iteration", policy="fcfs", dtype="float64")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for c in (core, reference):
        for i in range(4):
            c.add_request(f"be{i}", LONG[i * 10 : i * 10 + 40], params, "be")
    while not core.requests["be0"].output_token_ids:
        core.step()
    while core.active is None or core.active.layer != 2:  # a decode pass two layers in
        core.step()
    decode = core.active
    assert decode.num_tokens == 4
    core.add_request("ls", SHORT, params, "ls")
    reference.add_request("ls", SHORT, params, "ls")
    core.step()
    assert core.suspended == [decode]
    while core.stats().merges == 0:
        core.step()
    assert core.active is decode and {e.request.request_id for e in decode.entries} >= {"ls", "be0"}
    finals = drain(core)
    expected = drain(reference)
    assert {k: v.token_ids for k, v in finals.items()} == {k: v.token_ids for k, v in expected.items()}


def test_a_chunked_prompt_gives_the_greedy_output_of_the_whole_prompt() -> None:
    chunked = _core(policy="chunked", chunk_tokens=64, granularity="iteration", dtype="float64")
    whole = _core(policy="fcfs", granularity="iteration", dtype="float64")
    prompts = {"long": LONG, "short": SHORT, "mid": LONG[:150]}
    for core in (chunked, whole):
        for rid, prompt in prompts.items():
            core.add_request(rid, prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), "be")
    passes: list[int] = []
    start = chunked.passes.start

    def recording(plan: BatchPlan, *args: object) -> ForwardPass:
        passes.append(sum(plan.num_tokens))
        return start(plan, *args)  # type: ignore[arg-type]

    chunked.passes.start = recording  # type: ignore[method-assign]
    finals: dict[str, object] = {}
    while chunked.has_work():
        finals |= {o.request_id: o for o in chunked.step() if o.finished}
        chunked.audit()
    expected = drain(whole)
    assert {k: v.token_ids for k, v in finals.items()} == {k: v.token_ids for k, v in expected.items()}  # type: ignore[attr-defined]
    assert chunked.requests == {} and chunked.kv.used_blocks == 0
    assert max(passes) <= 64, "no pass went over the token budget"
    assert sum(passes) == len(LONG) + 150 + len(SHORT) + 3 * 7, "every prompt token fed once, then 7 decodes each"


def test_a_preemption_is_counted_under_the_granularity_the_pass_ran_at() -> None:
    # Configured for experts, qllm runs a decode-sized pass at layer granularity: the metric says "layer".
    core = _core(granularity="expert", policy="qllm")
    core.add_request("be", SHORT, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), "be")
    while core.active is None or core.active.num_tokens != 1 or core.active.layer != 1:
        core.step()
    decode = core.active
    assert decode.granularity is Granularity.LAYER
    core.add_request("ls", SHORT, GREEDY, "ls")
    core.step()
    assert core.suspended == [decode]
    preemptions = core.metrics.preemptions
    assert preemptions.labels("layer")._value.get() == 1  # type: ignore[attr-defined]
    assert preemptions.labels("expert")._value.get() == 0  # type: ignore[attr-defined]
