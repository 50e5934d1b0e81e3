"""Incremental detokenization: each step decodes a few tokens per request, not its whole output."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass
class _Window:
    prefix: int = 0
    """First token of the decode window: one already shown, so the window starts in the right context."""
    read: int = 0
    """Tokens whose text is in `text`."""
    text: str = ""


class Detokenizer:
    """The text of each request's output so far, at a cost per step independent of the output's length.

    Decoding every output token at every step is quadratic over a long answer. As vLLM does, each step
    decodes the window from `prefix` to the end and keeps what the new tokens added beyond the window's
    old part; a window that ends in half a UTF-8 character waits for its next byte. Decoders that drop a
    leading space at the start of a text do so at the start of both window decodes, so the difference is
    exact. A finished request's text is one full decode (`full`): exactly the tokenizer's.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._decode: Callable[[list[int]], str]
        if backend is not None and not tokenizer.clean_up_tokenization_spaces:
            # The Rust tokenizer directly: the Python wrapper's input conversion costs more than the decode.
            self._decode = lambda ids: str(backend.decode(ids, skip_special_tokens=True))
        else:
            self._decode = lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True))
        self._windows: dict[str, _Window] = {}

    def text(self, request_id: str, token_ids: list[int]) -> str:
        """Text of `token_ids` (the request's whole output so far), short of a trailing half character."""
        w = self._windows.setdefault(request_id, _Window())
        old = self._decode(token_ids[w.prefix : w.read]) if w.read > w.prefix else ""
        new = self._decode(token_ids[w.prefix :])
        if len(new) > len(old) and not new.endswith("\ufffd"):
            w.text += new[len(old) :]
            w.prefix, w.read = w.read, len(token_ids)
        return w.text

    def full(self, token_ids: list[int]) -> str:
        """One decode of the whole output, for a finished request."""
        return self._decode(token_ids)

    def forget(self, request_id: str) -> None:
        """Drop a finished request's window."""
        self._windows.pop(request_id, None)
