"""The answers of /v1/completions and /v1/chat/completions: the whole body, or the stream's chunks.

Choices are numbered as OpenAI numbers them (`n` per prompt, prompt by prompt). Every body carries `usage`;
a stream ends with a usage chunk with `stream_options.include_usage`, and with `continuous_usage_stats`
every chunk carries its choice's usage so far.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from deployments.choices import Choice, Choices, Usage
from deployments.openai_logprobs import CompletionLogprobs, chat_logprobs
from deployments.protocol import StreamItem


class AnswerFormat:
    """How one call's answer is written; one instance per call (a stream's formats keep state)."""

    body_object: ClassVar[str]
    chunk_object: ClassVar[str]

    def __init__(self, request_id: str, model: str, *, logprobs: bool, continuous_usage: bool) -> None:
        self._id = request_id
        self._model = model
        self._created = int(time.time())
        self._logprobs = logprobs
        self._continuous_usage = continuous_usage

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self._id, "object": obj, "created": self._created, "model": self._model, "choices": choices}

    def body(self, choices: Choices) -> dict[str, Any]:
        """The answer written at the end, with every choice and the call's usage."""
        return self._envelope(self.body_object, [self._whole(c) for c in choices]) | {
            "usage": choices.usage().as_json()
        }

    def chunks(self, item: StreamItem, choice: Choice) -> list[dict[str, Any]]:
        """The chunks one stream item makes (none when it adds nothing a client would see)."""
        chunks = [self._envelope(self.chunk_object, [c]) for c in self._stream_choices(item, choice)]
        if self._continuous_usage:
            for chunk in chunks:
                chunk["usage"] = choice.usage.as_json()
        return chunks

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """The last chunk with `stream_options.include_usage`: no choices, the call's usage."""
        return self._envelope(self.chunk_object, []) | {"usage": usage.as_json()}

    def _whole(self, choice: Choice) -> dict[str, Any]:
        raise NotImplementedError

    def _stream_choices(self, item: StreamItem, choice: Choice) -> list[dict[str, Any]]:
        raise NotImplementedError


class CompletionFormat(AnswerFormat):
    """/v1/completions: `text`, with the echoed prompt in front of it; legacy `logprobs` lists."""

    body_object: ClassVar[str] = "text_completion"
    chunk_object: ClassVar[str] = "text_completion"

    def __init__(self, request_id: str, model: str, *, logprobs: bool, continuous_usage: bool) -> None:
        super().__init__(request_id, model, logprobs=logprobs, continuous_usage=continuous_usage)
        self._offsets: dict[int, CompletionLogprobs] = {}

    def _logprobs_of(self, index: int) -> CompletionLogprobs:
        if index not in self._offsets:
            self._offsets[index] = CompletionLogprobs()
        return self._offsets[index]

    def _whole(self, choice: Choice) -> dict[str, Any]:
        entries = [*(choice.prompt_logprobs or ()), *(choice.logprobs or ())]
        return {
            "index": choice.index,
            "text": (choice.prompt_text or "") + choice.text,
            "logprobs": CompletionLogprobs().format(entries) if self._logprobs else None,
            "finish_reason": choice.finish_reason,
        }

    def _stream_choices(self, item: StreamItem, choice: Choice) -> list[dict[str, Any]]:
        text = (item.prompt_text or "") + item.text_delta
        entries = [*(item.prompt_logprobs or ()), *(item.logprobs or ())]
        if not (text or entries or item.finished):
            return []
        logprobs = self._logprobs_of(item.index).format(entries) if self._logprobs else None
        return [{"index": item.index, "text": text, "logprobs": logprobs, "finish_reason": choice.finish_reason}]


class ChatFormat(AnswerFormat):
    """/v1/chat/completions: an assistant `message`, or in a stream its role and then `content` deltas."""

    body_object: ClassVar[str] = "chat.completion"
    chunk_object: ClassVar[str] = "chat.completion.chunk"

    def _whole(self, choice: Choice) -> dict[str, Any]:
        return {
            "index": choice.index,
            "message": {"role": "assistant", "content": choice.text},
            "logprobs": chat_logprobs(choice.logprobs or ()) if self._logprobs else None,
            "finish_reason": choice.finish_reason,
        }

    def _stream_choices(self, item: StreamItem, choice: Choice) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if choice.items == 1:  # a choice's first chunk names the role, as OpenAI's do
            role = {"role": "assistant", "content": ""}
            out.append({"index": item.index, "delta": role, "logprobs": None, "finish_reason": None})
        entries = item.logprobs or ()
        if item.text_delta or entries or item.finished:
            logprobs = chat_logprobs(entries) if self._logprobs else None
            delta = {"content": item.text_delta}
            finish = choice.finish_reason
            out.append({"index": item.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
        return out
