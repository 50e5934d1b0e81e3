"""The request bodies of /v1/completions and /v1/chat/completions, and what each becomes: the replica's
`GenerateRequest` (prompts, choices, the engine's `SamplingParams`) and the format of its answer.

Ranges of the sampling fields are checked once, by `SamplingParams` (qllm_core/params.py is their home);
what only the HTTP side knows (choices, content parts, fields the server cannot honour) is checked here.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

from deployments.openai_api import ApiError, Body
from deployments.openai_responses import AnswerFormat, ChatFormat, CompletionFormat
from deployments.protocol import ChatTurn, GenerateRequest, Prompt
from qllm_core.errors import InvalidRequestError
from qllm_core.params import MAX_LOGPROBS, SamplingParams
from qllm_core.request import PriorityClass

MAX_CHOICES = 128
"""Most sequences one call may ask for, `n` times its prompts (OpenAI bounds `n` at 128): each is an engine
request on one replica."""


def _unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="unsupported_value")


class StreamOptions(Body):
    """`stream_options`."""

    include_usage: bool = False
    """End the stream with a chunk carrying the call's usage."""
    continuous_usage_stats: bool = False
    """vLLM's extension: every chunk also carries its choice's usage so far. As in vLLM, only together with
    `include_usage`, so that a client asking for it alone gets what it would get from vLLM."""


class _Common(Body):
    """Fields shared by both endpoints. A sampling field left out takes `SamplingParams`' default."""

    kind: ClassVar[str]
    """The endpoint, as the request log names it."""
    id_prefix: ClassVar[str]
    default_max_tokens: ClassVar[int]

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    """vLLM's extension, with transformers' semantics."""
    logit_bias: dict[str, float] | None = None
    """Accepted only empty: the engine has no logit bias."""
    priority: str | None = None
    """qllm: `latency_sensitive`/`best_effort` (or `ls`/`be`); the x-qllm-priority header also works."""
    ttft_deadline_ms: float | None = Field(default=None, gt=0)
    """qllm: this request's own time-to-first-token deadline."""

    def check(self) -> None:
        """Refuse what parses but cannot be served."""
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is allowed only with stream: true", param="stream_options")
        if self.logit_bias:
            raise _unsupported("logit_bias", "logit_bias is not supported")
        if self.choices > MAX_CHOICES:
            raise ApiError(400, f"n times the prompts is {self.choices}; at most {MAX_CHOICES} are allowed", "n")

    def prompts(self) -> tuple[Prompt, ...]:
        """What to continue, one prompt per entry."""
        raise NotImplementedError

    @property
    def choices(self) -> int:
        """How many sequences the call asks for."""
        return len(self.prompts()) * self.n

    @property
    def include_usage(self) -> bool:
        """stream_options.include_usage."""
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """Usage in every chunk (see `StreamOptions.continuous_usage_stats`)."""
        return self.include_usage and self.stream_options is not None and self.stream_options.continuous_usage_stats

    def _logprob_counts(self) -> tuple[int | None, int | None]:
        """Alternatives per output token and per prompt token (None: no log-probabilities)."""
        return None, None

    def _max_tokens(self) -> tuple[str, int | None]:
        """The field that bounds the output, and its value."""
        return "max_tokens", self.max_tokens

    def sampling(self) -> SamplingParams:
        """The engine's sampling parameters; a value it refuses is a 400 naming the field sent."""
        bound_name, bound = self._max_tokens()
        logprobs, prompt_logprobs = self._logprob_counts()
        given: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
        }
        try:
            return SamplingParams(
                max_tokens=bound if bound is not None else self.default_max_tokens,
                stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
                stop_token_ids=tuple(self.stop_token_ids or ()),
                ignore_eos=self.ignore_eos,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                **{name: value for name, value in given.items() if value is not None},
            )
        except InvalidRequestError as exc:
            param = bound_name if exc.param == "max_tokens" else exc.param
            raise ApiError(400, exc.message, param=param) from None

    def to_request(self, request_id: str, priority: PriorityClass, ttft_deadline_s: float | None) -> GenerateRequest:
        """The call as the engine replica takes it."""
        first, *rest = self.prompts()
        return GenerateRequest(
            request_id,
            priority,
            first,
            self.sampling(),
            ttft_deadline_s=ttft_deadline_s,
            more_prompts=tuple(rest),
            n=self.n,
            echo=self._echo(),
        )

    def _echo(self) -> bool:
        return False

    def answer_format(self, request_id: str, model: str) -> AnswerFormat:
        """How the answer is written."""
        raise NotImplementedError


class CompletionRequest(_Common):
    """POST /v1/completions."""

    kind: ClassVar[str] = "completion"
    id_prefix: ClassVar[str] = "cmpl"
    default_max_tokens: ClassVar[int] = 16

    prompt: str | list[str] | list[int] | list[list[int]]
    """A text, a list of texts, a list of token ids, or a list of such lists: one set of choices for each."""
    echo: bool = False
    """Answer the prompt too, in front of each choice's text (and of its log-probabilities)."""
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """Each token's log-probability and this many most likely alternatives (prompt tokens too with echo)."""
    suffix: None = None
    best_of: int | None = None
    """Accepted only equal to `n`: every sequence generated is returned."""

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: str | list[str] | list[int] | list[list[int]]) -> object:
        if not value:
            raise ValueError("the prompt is empty")
        if isinstance(value, list) and any(isinstance(p, str | list) and not p for p in value):
            raise ValueError("a prompt in the list is empty")
        return value

    def check(self) -> None:
        """As for both endpoints, and `best_of`."""
        super().check()
        if self.best_of is not None and self.best_of != self.n:
            raise _unsupported("best_of", "best_of must equal n: every sequence generated is returned")

    def prompts(self) -> tuple[Prompt, ...]:
        """One `Prompt` per text or token-id list."""
        value = self.prompt
        if isinstance(value, str):
            return (Prompt(text=value),)
        if all(isinstance(p, int) for p in value):
            return (Prompt(token_ids=tuple(value)),)  # type: ignore[arg-type]
        return tuple(Prompt(text=p) if isinstance(p, str) else Prompt(token_ids=tuple(p)) for p in value)  # type: ignore[arg-type]

    def _logprob_counts(self) -> tuple[int | None, int | None]:
        return self.logprobs, self.logprobs if self.echo else None

    def _echo(self) -> bool:
        return self.echo

    def answer_format(self, request_id: str, model: str) -> AnswerFormat:
        """Text completions."""
        return CompletionFormat(
            request_id, model, logprobs=self.logprobs is not None, continuous_usage=self.continuous_usage
        )


class ContentPart(BaseModel):
    """One part of a message's content. Only text parts are read; the others (image_url, input_audio, file,
    refusal...) carry fields of their own, kept here only to be refused by `type` with the part named."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One chat turn. Clients hand a previous answer back as an assistant turn with the empty tool fields the
    openai client's message carries, so those are accepted while empty."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[JsonValue] | None = None
    function_call: JsonValue = None
    audio: JsonValue = None
    tool_call_id: str | None = None

    def check(self, at: str) -> None:
        """Refuse what a text-only model without tools cannot take; `at` is this turn's place in `messages`."""
        if self.role in ("tool", "function"):
            raise _unsupported(f"{at}.role", f"{self.role} messages are not supported: this server has no tools")
        asked = {"tool_calls": self.tool_calls, "function_call": self.function_call, "audio": self.audio}
        for field, value in (asked | {"refusal": self.refusal}).items():
            if value:
                raise _unsupported(f"{at}.{field}", f"{field} in a message is not supported")
        if self.content is None and self.role != "assistant":
            raise ApiError(400, "content may be null only on an assistant turn", param=f"{at}.content")
        for j, part in enumerate(self.content if isinstance(self.content, list) else []):
            where = f"{at}.content[{j}]"
            if part.type != "text":
                raise _unsupported(f"{where}.type", f"{part.type} content is not supported: this model reads text")
            if part.text is None:
                raise ApiError(400, "a text part needs its text", param=f"{where}.text")
            for extra in part.model_extra or {}:
                raise ApiError(400, f"unknown field {extra!r} in a text part", param=f"{where}.{extra}")

    def turn(self) -> ChatTurn:
        """The turn as the replica's chat template takes it. Text parts are joined with newlines, as vLLM
        joins them, so that a prompt reads the same on either server."""
        if isinstance(self.content, list):
            content = "\n".join(part.text or "" for part in self.content)
        else:
            content = self.content or ""
        return ChatTurn(self.role, content, self.name)


class ResponseFormat(BaseModel):
    """`response_format`: only `{"type": "text"}` (what every answer is) is accepted."""

    model_config = ConfigDict(extra="allow")
    type: str


_NO_TOOL = (None, "none", "auto")
"""`tool_choice` and `function_call` values that ask for no tool when none is offered."""


class ChatRequest(_Common):
    """POST /v1/chat/completions."""

    kind: ClassVar[str] = "chat"
    id_prefix: ClassVar[str] = "chatcmpl"
    default_max_tokens: ClassVar[int] = 256

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    """Wins over the older `max_tokens`."""
    logprobs: bool = False
    """Each output token's log-probability."""
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """With `logprobs`: this many most likely alternatives per token."""
    tools: list[JsonValue] | None = None
    tool_choice: JsonValue = None
    parallel_tool_calls: bool | None = None
    functions: list[JsonValue] | None = None
    function_call: JsonValue = None
    response_format: ResponseFormat | None = None

    def check(self) -> None:
        """As for both endpoints; then the messages, tools and response format."""
        super().check()
        for i, message in enumerate(self.messages):
            message.check(f"messages[{i}]")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        for name, value in (("tools", self.tools), ("functions", self.functions)):
            if value:
                raise _unsupported(name, f"{name} are not supported: this server does not call tools")
        for name, choice in (("tool_choice", self.tool_choice), ("function_call", self.function_call)):
            if choice not in _NO_TOOL:
                raise _unsupported(name, f"{name} {choice!r} is not supported: this server does not call tools")
        if self.response_format is not None and self.response_format.type != "text":
            raise _unsupported("response_format", f"response_format {self.response_format.type!r} is not supported")

    def prompts(self) -> tuple[Prompt, ...]:
        """The conversation, as one prompt."""
        return (Prompt(messages=tuple(m.turn() for m in self.messages)),)

    def _max_tokens(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return super()._max_tokens()

    def _logprob_counts(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0) if self.logprobs else None, None

    def answer_format(self, request_id: str, model: str) -> AnswerFormat:
        """Chat completions."""
        return ChatFormat(request_id, model, logprobs=self.logprobs, continuous_usage=self.continuous_usage)
