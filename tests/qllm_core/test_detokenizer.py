"""Incremental detokenization gives the tokenizer's own text, token by token, for byte-level and
Metaspace (SentencePiece-style) decoders, with multi-byte characters split across tokens."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from qllm_core.detokenizer import Detokenizer
from qllm_core.models.builtin import build_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "naïve café — déjà vu, 東京 と 大阪, emoji 🚀🔥 and ∑ math",
    "  leading spaces, trailing spaces  ",
    "line one\nline two\n\ttabbed",
]


def _metaspace_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)]],
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS[:1] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    return build_tokenizer(384) if request.param == "byte_level" else _metaspace_tokenizer()


def _stream(detok: Detokenizer, ids: list[int]) -> list[str]:
    return [detok.text("r", ids[: i + 1]) for i in range(len(ids))]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_is_the_full_decode(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = Detokenizer(tokenizer)
    streamed = _stream(detok, ids)
    for i, partial in enumerate(streamed):
        full = str(tokenizer.decode(ids[: i + 1], skip_special_tokens=True))
        # Never a half character, always a prefix of what the whole decode says.
        assert "\ufffd" not in partial and full.startswith(partial), (i, partial, full)
        assert full.rstrip("\ufffd") == partial or full.endswith("\ufffd")
    assert streamed[-1] == detok.full(ids) == tokenizer.decode(ids, skip_special_tokens=True)


def test_random_token_sequences_stream_a_prefix_of_the_decode(tokenizer: PreTrainedTokenizerBase) -> None:
    # Random ids include invalid byte sequences; the stream may hold back a tail but never says otherwise.
    rng = random.Random(0)
    for trial in range(20):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 40))]
        detok = Detokenizer(tokenizer)
        streamed = _stream(detok, ids)
        full = str(tokenizer.decode(ids, skip_special_tokens=True))
        assert all(full.startswith(t) for t in streamed), (trial, ids)
        assert detok.full(ids) == full


def test_special_tokens_are_skipped_and_windows_forgotten() -> None:
    tok = build_tokenizer(384)
    detok = Detokenizer(tok)
    ids = tok("hello world", add_special_tokens=False).input_ids
    eos = tok.eos_token_id
    assert detok.text("a", [*ids, eos]) == "hello world"
    detok.forget("a")
    assert detok.text("a", ids[:1]) == tok.decode(ids[:1])
