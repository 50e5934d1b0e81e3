"""Token strings and bytes for OpenAI's log-probability fields, made on the engine replica (the tokenizer is
there, not at the ingress)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from tokenizers import decoders
from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

from deployments.protocol import LogprobEntry, ScoredToken, TokenText
from qllm_core.logprobs import TokenLogprob

# SentencePiece's byte-fallback tokens stand for one byte each: '<0xE2>'.
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenTexts:
    """Each token's `TokenText`, made once per token id (so at most one per vocabulary entry is kept)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        byte_level = backend is not None and isinstance(backend.decoder, decoders.ByteLevel)
        # A byte-level BPE writes each byte as one printable character: the inverse map gives a token's bytes
        # even where it holds only part of a character (and its decoded text shows U+FFFD).
        self._byte_of = {char: byte for byte, char in bytes_to_unicode().items()} if byte_level else None
        self._known: dict[int, TokenText] = {}

    def of(self, token_id: int) -> TokenText:
        """The token's text (decoded alone, special tokens written out) and its own bytes."""
        known = self._known.get(token_id)
        if known is None:
            text = str(self._tokenizer.decode([token_id]))
            known = TokenText(text, self._bytes(token_id, text))
            self._known[token_id] = known
        return known

    def _bytes(self, token_id: int, text: str) -> bytes:
        piece = str(self._tokenizer.convert_ids_to_tokens(token_id))
        if self._byte_of is not None and all(char in self._byte_of for char in piece):
            return bytes(self._byte_of[char] for char in piece)
        byte = _BYTE_TOKEN.fullmatch(piece)
        if byte is not None:
            return bytes([int(byte.group(1), 16)])
        return text.encode("utf-8")

    def entry(self, logprob: TokenLogprob) -> LogprobEntry:
        """One position's entry, its alternatives named."""
        top = tuple(ScoredToken(self.of(token_id), value) for token_id, value in logprob.top)
        return LogprobEntry(self.of(logprob.token_id), logprob.logprob, top)

    def prompt_entries(
        self, prompt_ids: Sequence[int], logprobs: Sequence[TokenLogprob | None]
    ) -> tuple[LogprobEntry, ...]:
        """A prompt's entries; a position the engine has no log-probability for (the first) keeps its token."""
        return tuple(
            LogprobEntry(self.of(token_id), None) if lp is None else self.entry(lp)
            for token_id, lp in zip(prompt_ids, logprobs, strict=True)
        )
