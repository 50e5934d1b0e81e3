"""Typed errors raised by the engine. Each message says what to change."""

from __future__ import annotations


class QllmError(Exception):
    """Base class of every error qllm raises on purpose."""


class ConfigError(QllmError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class InvalidRequestError(QllmError, ValueError):
    """A request carries an invalid parameter; `param` names it (OpenAI's error object has the same field)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class PromptTooLongError(InvalidRequestError):
    """The prompt (with the requested output) does not fit the model's context or the KV cache."""


class DuplicateRequestError(InvalidRequestError):
    """A request id is already in use by a request that has not finished."""


class EngineStoppedError(QllmError, RuntimeError):
    """The engine was shut down, or its step loop died; nothing new is accepted."""


class EngineStalledError(QllmError, RuntimeError):
    """The engine's step loop has work but has not finished a step for longer than the health bound."""


class RequestFailedError(QllmError, RuntimeError):
    """The engine could not finish a request (an internal failure while running its batch)."""
