"""An abort frees the request's KV at once wherever it is, and the requests that shared its pass lose nothing."""

from __future__ import annotations

from qllm_core import EngineConfig, FinishReason, SamplingParams
from qllm_core.engine_core import EngineCore
from qllm_core.forward import Stage
from qllm_core.request import RequestState
from tests.conftest import DEVICE, drain

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
BE_PROMPTS = {"be0": [5] * 300, "be1": [9, 8, 7] * 90}
LS_PROMPT = [6] * 20


def _core(granularity: str) -> EngineCore:
    return EngineCore(
        EngineConfig(model="tiny", device=DEVICE, dtype="float64", granularity=granularity, max_batch_size=8)
    )


def _expected() -> dict[str, tuple[int, ...]]:
    alone = _core("iteration")
    for rid, prompt in BE_PROMPTS.items():
        alone.add_request(rid, prompt, GREEDY, "be")
    return {rid: out.token_ids for rid, out in drain(alone).items()}


def _suspend_be_pass(core: EngineCore, stage: Stage) -> None:
    for rid, prompt in BE_PROMPTS.items():
        core.add_request(rid, prompt, GREEDY, "be")
    while core.active is None or core.active.stage is not stage or core.active.layer != 1:
        core.step()
    if stage is Stage.EXPERT_SPAN:
        core.step()  # one span of layer 1 done: between two experts
    core.add_request("ls", LS_PROMPT, GREEDY, "ls")
    core.step()
    assert len(core.suspended) == 1 and core.suspended[0].stage is stage


def test_abort_in_a_pass_suspended_between_layers_frees_the_kv_at_once_and_the_rest_finish_exactly() -> None:
    core = _core("layer")
    _suspend_be_pass(core, Stage.ATTENTION)
    used = core.kv.used_blocks
    [out] = core.abort("be0")
    assert out.finished and out.finish_reason is FinishReason.ABORT
    assert "be0" not in core.requests and core.kv.used_blocks == used - core.kv.blocks_for(300)
    core.audit()
    finals = drain(core)
    assert finals["be1"].token_ids == _expected()["be1"]
    assert core.kv.used_blocks == 0


def test_abort_in_a_pass_suspended_between_experts_requeues_the_others_with_their_kv() -> None:
    core = _core("expert")
    _suspend_be_pass(core, Stage.EXPERT_SPAN)
    [out] = core.abort("be0")
    assert out.finish_reason is FinishReason.ABORT
    assert not core.suspended, "its work is given up: it could not lose a request in the middle of a layer"
    assert core.requests["be1"].state is RequestState.WAITING and core.kv.holds("be1")
    core.audit()
    assert drain(core)["be1"].token_ids == _expected()["be1"]
    assert core.kv.used_blocks == 0


def test_abort_in_the_running_pass_between_experts_takes_effect_at_the_next_layer() -> None:
    core = _core("expert")
    for rid, prompt in BE_PROMPTS.items():
        core.add_request(rid, prompt, GREEDY, "be")
    while core.active is None or core.active.stage is not Stage.EXPERT_SPAN:
        core.step()
    core.step()
    assert core.active is not None and core.active.stage is Stage.EXPERT_SPAN
    layer = core.active.layer
    assert core.abort("be0") == [], "between two experts it cannot leave yet"
    ended = []
    while "be0" in core.requests:
        ended += [o for o in core.step() if o.request_id == "be0"]
    assert [o.finish_reason for o in ended] == [FinishReason.ABORT]
    assert core.active is not None and core.active.layer == layer + 1 and core.active.at_layer_boundary
    assert not core.kv.holds("be0")
    core.audit()
    assert drain(core)["be1"].token_ids == _expected()["be1"]
