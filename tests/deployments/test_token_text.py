"""Token strings and bytes for the log-probability fields, with the built-in byte-level tokenizer."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from deployments.token_text import TokenTexts
from qllm_core.logprobs import TokenLogprob
from qllm_core.models.builtin import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return build_tokenizer(512)


def test_the_bytes_of_split_characters_add_up_to_the_text(tokenizer: PreTrainedTokenizerBase) -> None:
    texts = TokenTexts(tokenizer)
    ids = tokenizer("héllo wörld", add_special_tokens=False).input_ids
    tokens = [texts.of(i) for i in ids]
    assert any(t.text == "\ufffd" for t in tokens)  # the tokenizer splits é and ö: the test means something
    assert b"".join(t.utf8 for t in tokens).decode("utf-8") == "héllo wörld"


def test_a_special_token_is_written_out(tokenizer: PreTrainedTokenizerBase) -> None:
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert TokenTexts(tokenizer).of(eos).text == "<|endoftext|>"


def test_a_prompts_first_token_keeps_its_text_without_a_logprob(tokenizer: PreTrainedTokenizerBase) -> None:
    texts = TokenTexts(tokenizer)
    ids = tokenizer("hi there", add_special_tokens=False).input_ids
    scored = [None, *(TokenLogprob(i, -1.0, ((i, -1.0),)) for i in ids[1:])]
    entries = texts.prompt_entries(ids, scored)
    assert entries[0].logprob is None and entries[0].top == ()
    assert "".join(e.token.text for e in entries) == "hi there"
    assert all(e.logprob == -1.0 and e.top[0].token == e.token for e in entries[1:])
