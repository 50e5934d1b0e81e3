"""The OpenAI-compatible wire basics: the error object, reading and parsing a body, server-sent events.

The request bodies are in `openai_requests`, the answers and stream chunks in `openai_responses`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
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


class Body(BaseModel):
    """A request body. Unknown fields are rejected so typos do not pass silently."""

    # No NaN or infinity in a float field (JSON's 1e999 reads as infinity).
    model_config = ConfigDict(extra="forbid", strict=False, allow_inf_nan=False)

    def check(self) -> None:
        """Refuse, with an `ApiError` naming the field, what parses but cannot be served; run after parsing."""


Parsed = TypeVar("Parsed", bound=Body)


async def read_body(chunks: AsyncIterable[bytes], content_length: str | None, max_bytes: int) -> bytes:
    """The request body, read no further than `max_bytes`: a declared length over the limit is refused before
    any byte is read, and a body without one as soon as what arrived passes it, so none is held whole."""
    declared = (content_length or "").strip()
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(f"the request body is {int(declared)} bytes", max_bytes)
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_bytes:
            raise _too_large("the request body is longer", max_bytes)
    return bytes(body)


def _too_large(what: str, max_bytes: int) -> ApiError:
    return ApiError(413, f"{what}; the limit is {max_bytes} bytes", code="body_too_large")


def parse_body(raw: bytes, model: type[Parsed]) -> Parsed:
    """Parse and validate a JSON body, mapping every failure to a 4xx that names the field."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the body is not valid UTF-8 (byte {exc.start})", code="invalid_encoding") from None
    data = _json_value(text)
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        # OpenAI's `param` names the top-level field; union member tags in pydantic's path would only confuse.
        first = exc.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        raise ApiError(
            400, f"{param}: {first['msg']}" if param else first["msg"], param=param, code="invalid_value"
        ) from None
    body.check()
    return body


def _refuse_constant(name: str) -> float:
    # Python's json reads NaN and Infinity, which JSON does not have (and no field takes).
    raise ValueError(f"{name} is not a JSON number")


def _json_value(text: str) -> object:
    """`text` as JSON, or a 400 however it fails: bad syntax, nesting deeper than Python's recursion limit
    (RecursionError), an integer literal longer than Python's int-from-string limit (ValueError), NaN or
    Infinity (which JSON does not have). A number too large for a float (1e999) reads as infinity, which
    the bodies' float fields refuse (`Body.model_config`)."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise ApiError(
            400, f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", code="invalid_json"
        ) from None
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply", code="invalid_json") from None
    except ValueError as exc:
        raise ApiError(400, f"the body cannot be read: {exc}", code="invalid_json") from None


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
