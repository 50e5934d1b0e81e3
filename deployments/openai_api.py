"""The OpenAI-compatible wire format: request bodies, the error object, responses and stream chunks."""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from qllm_core.params import MAX_STOP_SEQUENCES

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error answered with the OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """`{"error": {"message", "type", "param", "code"}}`."""
        return {
            "error": {
                "message": self.message,
                "type": _STATUS_TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }


class _Common(BaseModel):
    """Fields shared by both endpoints. Unknown fields are rejected so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid", strict=False)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(default=None, ge=0)
    ignore_eos: bool = False
    user: str | None = None
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    """Penalties are not implemented: only 0 is accepted."""
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    logprobs: Literal[False] | None = None
    priority: str | None = None
    """qllm: `latency_sensitive`/`best_effort` (or `ls`/`be`); the x-qllm-priority header also works."""
    ttft_deadline_ms: float | None = Field(default=None, gt=0)
    """qllm: this request's own time-to-first-token deadline."""

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop strings are allowed")
        return value

    def sampling(self, default_max_tokens: int) -> dict[str, Any]:
        """Keyword arguments for `qllm_core.SamplingParams` (validated again there)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return {
            "max_tokens": self.max_tokens if self.max_tokens is not None else default_max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": stop,
            "stop_token_ids": list(self.stop_token_ids or []),
            "ignore_eos": self.ignore_eos,
        }

    @property
    def include_usage(self) -> bool:
        """stream_options.include_usage."""
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Common):
    """POST /v1/completions."""

    prompt: str | list[int]
    echo: Literal[False] = False
    suffix: None = None
    best_of: Literal[1] | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: str | list[int]) -> str | list[int]:
        if not value:
            raise ValueError("the prompt is empty")
        return value


class ChatMessage(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class ChatRequest(_Common):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def sampling(self, default_max_tokens: int) -> dict[str, Any]:
        """As for completions; `max_completion_tokens` wins over the older `max_tokens`."""
        params = super().sampling(default_max_tokens)
        if self.max_completion_tokens is not None:
            params["max_tokens"] = self.max_completion_tokens
        return params


def parse_body(raw: bytes, model: type[_Common], max_bytes: int) -> _Common:
    """Parse and validate a JSON body, mapping every failure to a 4xx that names the field."""
    if len(raw) > max_bytes:
        raise ApiError(413, f"the request body is {len(raw)} bytes; the limit is {max_bytes}", code="body_too_large")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the body is not valid UTF-8 (byte {exc.start})", code="invalid_encoding") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(
            400, f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # OpenAI's `param` names the top-level field; union member tags in pydantic's path would only confuse.
        first = exc.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        raise ApiError(
            400, f"{param}: {first['msg']}" if param else first["msg"], param=param, code="invalid_value"
        ) from None


def completion_body(request_id: str, model: str, text: str, finish: str | None, usage: dict[str, int]) -> dict:
    """A non-streaming /v1/completions response."""
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
        "usage": usage,
    }


def chat_body(request_id: str, model: str, text: str, finish: str | None, usage: dict[str, int]) -> dict:
    """A non-streaming /v1/chat/completions response."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
        ],
        "usage": usage,
    }


def completion_chunk(request_id: str, model: str, delta: str, finish: str | None) -> dict:
    """One streamed /v1/completions chunk."""
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}],
    }


def chat_chunk(request_id: str, model: str, delta: dict[str, str], finish: str | None) -> dict:
    """One streamed /v1/chat/completions chunk."""
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def usage_chunk(request_id: str, model: str, obj: str, usage: dict[str, int]) -> dict:
    """The final chunk carrying usage when stream_options.include_usage is set."""
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": usage}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
