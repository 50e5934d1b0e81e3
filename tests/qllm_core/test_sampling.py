"""Penalties and log-probabilities are transformers' arithmetic: checked against the model run by hand."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from qllm_core import EngineConfig, SamplingParams, head
from qllm_core.engine_core import EngineCore
from tests.conftest import DEVICE, drain

PROMPT = [5, 17, 99, 250, 3, 3, 42, 42, 42, 7]
STEPS = 10


@pytest.fixture(scope="module")
def core() -> EngineCore:
    return EngineCore(EngineConfig(model="tiny", device=DEVICE, dtype="float64", granularity="iteration"))


@pytest.fixture(scope="module")
def model(core: EngineCore) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(core.loaded.path, dtype=torch.float64, experts_implementation="eager")


def _run(core: EngineCore, params: SamplingParams, prompt: list[int] = PROMPT, rid: str = "r") -> list:
    core.add_request(rid, prompt, params, "ls")
    outs = []
    while core.has_work():
        outs += [o for o in core.step() if o.request_id == rid]
    return outs


def _logits(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_repetition_penalty_gives_transformers_greedy_output(core: EngineCore, model: PreTrainedModel) -> None:
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True, repetition_penalty=1.8)
    got = _run(core, params)[-1].token_ids
    expected = model.generate(
        torch.tensor([PROMPT]), max_new_tokens=STEPS, do_sample=False, repetition_penalty=1.8, eos_token_id=None
    )[0, len(PROMPT) :]
    assert list(got) == expected.tolist()
    plain = _run(core, SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True))[-1].token_ids
    assert got != plain, "the penalty must change this output, or the test shows nothing"


def test_presence_and_frequency_penalties_follow_openai_semantics(core: EngineCore, model: PreTrainedModel) -> None:
    params = SamplingParams(
        max_tokens=STEPS, temperature=0.0, ignore_eos=True, presence_penalty=1.5, frequency_penalty=0.7
    )
    got = list(_run(core, params)[-1].token_ids)
    ids = list(PROMPT)
    expected: list[int] = []
    for _ in range(STEPS):
        logits = _logits(model, ids)[-1].clone()
        counts = torch.bincount(torch.tensor(expected, dtype=torch.long), minlength=logits.numel()).double()
        logits -= 0.7 * counts + 1.5 * (counts > 0).double()  # over the output only, not the prompt
        expected.append(int(logits.argmax()))
        ids.append(expected[-1])
    assert got == expected
    plain = _run(core, SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True), rid="plain")
    assert got != list(plain[-1].token_ids), "the penalties must change this output, or the test shows nothing"


def test_token_logprobs_are_the_models_log_softmax_with_top_alternatives(
    core: EngineCore, model: PreTrainedModel
) -> None:
    outs = _run(core, SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True, logprobs=3))
    tokens = list(outs[-1].token_ids)
    full = _logits(model, PROMPT + tokens)
    reference = torch.log_softmax(full[len(PROMPT) - 1 : -1], dim=-1)
    for step, out in enumerate(outs):
        assert out.new_logprobs is not None and len(out.new_logprobs) == 1
        lp = out.new_logprobs[0]
        assert lp.token_id == tokens[step]
        assert lp.logprob == pytest.approx(float(reference[step, tokens[step]]), abs=1e-6)
        top = torch.topk(reference[step], 3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-6)
        assert lp.top[0][0] == lp.token_id, "greedy takes the most likely token"


@pytest.mark.parametrize(("chunk", "head_rows"), [(None, 256), (4, 256), (None, 3)])
def test_prompt_logprobs_score_every_prompt_token_after_the_first(
    core: EngineCore, model: PreTrainedModel, chunk: int | None, head_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`head_rows`: the head computes prompt positions' full-vocabulary logits that many at a time."""
    monkeypatch.setattr(head, "PROMPT_LOGPROB_ROWS", head_rows)
    engine = core
    if chunk is not None:  # chunked: the prompt's positions arrive over several passes
        engine = EngineCore(
            EngineConfig(model="tiny", device=DEVICE, dtype="float64", policy="chunked", chunk_tokens=chunk),
            loaded=core.loaded,
        )
    outs = _run(engine, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2), rid=f"p{chunk}-{head_rows}")
    first = outs[0].prompt_logprobs
    assert first is not None and len(first) == len(PROMPT) and first[0] is None
    assert all(o.prompt_logprobs is None for o in outs[1:]), "sent once, with the first token"
    reference = torch.log_softmax(_logits(model, PROMPT)[:-1], dim=-1)
    for i, lp in enumerate(first[1:]):
        assert lp is not None and lp.token_id == PROMPT[i + 1]
        assert lp.logprob == pytest.approx(float(reference[i, PROMPT[i + 1]]), abs=1e-6)
        assert [t for t, _ in lp.top] == torch.topk(reference[i], 2).indices.tolist()


def test_penalized_requests_are_exact_in_a_batch_with_plain_ones(core: EngineCore) -> None:
    penalized = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True, repetition_penalty=1.8)
    plain = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True)
    alone = {"a": _run(core, penalized, rid="a1")[-1].token_ids, "b": _run(core, plain, rid="b1")[-1].token_ids}
    core.add_request("a", PROMPT, penalized, "ls")
    core.add_request("b", PROMPT, plain, "be")
    together = drain(core)
    assert {k: v.token_ids for k, v in together.items()} == alone
