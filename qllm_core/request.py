"""Requests as the engine tracks them: priority classes, the request state machine and its timestamps."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from qllm_core.errors import InvalidRequestError
from qllm_core.logprobs import TokenLogprob
from qllm_core.params import SamplingParams
from qllm_core.timeline import TimelineMarks


class PriorityClass(enum.IntEnum):
    """Request classes; a lower value is more urgent."""

    LATENCY_SENSITIVE = 0
    BEST_EFFORT = 1

    @property
    def label(self) -> str:
        """The name used in APIs and metric labels."""
        return self.name.lower()

    @property
    def short(self) -> str:
        """The short alias (`ls` or `be`)."""
        return "ls" if self is PriorityClass.LATENCY_SENSITIVE else "be"

    @classmethod
    def parse(cls, value: str | PriorityClass) -> PriorityClass:
        """Accept `latency_sensitive`/`best_effort` or `ls`/`be` (any case)."""
        if isinstance(value, PriorityClass):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            for member in cls:
                if key in (member.label, member.short):
                    return member
        raise InvalidRequestError(
            f"priority {value!r} is not a class; use 'latency_sensitive' ('ls') or 'best_effort' ('be')",
            param="priority",
        )


class FinishReason(enum.Enum):
    """Why a request stopped."""

    LENGTH = "length"  # max_tokens reached
    STOP = "stop"  # EOS, a stop token id or a stop string
    ABORT = "abort"  # aborted by the caller
    ERROR = "error"  # the engine failed while running it


class RequestState(enum.IntEnum):
    """A request's life. WAITING needs a prefill (first, the rest of a chunked one, or again after its KV was
    dropped); READY has its KV cached and waits for its next decode step; RUNNING is inside a forward pass
    (active or suspended). An IntEnum: the engine counts requests per state on every move."""

    WAITING = 0
    READY = 1
    RUNNING = 2
    FINISHED = 3

    @property
    def label(self) -> str:
        """The name shown in messages ("waiting")."""
        return self.name.lower()


_TRANSITIONS: dict[RequestState, frozenset[RequestState]] = {
    RequestState.WAITING: frozenset({RequestState.RUNNING, RequestState.FINISHED}),
    RequestState.RUNNING: frozenset({RequestState.READY, RequestState.WAITING, RequestState.FINISHED}),
    RequestState.READY: frozenset({RequestState.RUNNING, RequestState.WAITING, RequestState.FINISHED}),
    RequestState.FINISHED: frozenset(),
}


@dataclass
class RequestTimes:
    """Monotonic timestamps (seconds, `time.monotonic()`) of a request's life."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    tokens: list[float] = field(default_factory=list)
    finished: float | None = None

    @property
    def ttft(self) -> float | None:
        """Time to first token."""
        return None if self.first_token is None else self.first_token - self.arrival


@dataclass
class Request:
    """One generation request as the engine tracks it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: PriorityClass
    arrival: float
    ttft_deadline_s: float | None = None
    output_token_ids: list[int] = field(default_factory=list)
    state: RequestState = RequestState.WAITING
    num_cached_tokens: int = 0
    """Tokens whose KV is in the cache."""
    finish_reason: FinishReason | None = None
    preemptions: int = 0
    """Times a pass holding this request was suspended for more urgent work."""
    times: RequestTimes = field(init=False)
    marks: TimelineMarks = field(init=False)
    """What its `Timeline` is built from."""
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    """Prompt log-probabilities gathered chunk by chunk (with `SamplingParams.prompt_logprobs`)."""

    def __post_init__(self) -> None:
        self.times = RequestTimes(arrival=self.arrival)
        self.marks = TimelineMarks()

    def move_to(self, new: RequestState) -> None:
        """Change state along an allowed edge of the state machine."""
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"request {self.request_id}: illegal transition {self.state.label} -> {new.label}")
        self.state = new

    def token_slice(self, start: int, end: int) -> tuple[int, ...]:
        """Tokens [start, end) of the prompt followed by the output so far (no copy of the whole)."""
        prompt = self.prompt_token_ids
        if end <= len(prompt):
            return tuple(prompt[start:end])
        n = len(prompt)
        return (*prompt[start:], *self.output_token_ids[max(0, start - n) : end - n])

    @property
    def num_tokens(self) -> int:
        """Prompt plus output length."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncached_tokens(self) -> int:
        """Tokens to feed before its next token can be sampled."""
        return self.num_tokens - self.num_cached_tokens

    @property
    def needs_prefill(self) -> bool:
        """True when more than one token must be fed (a first prefill, the rest of a chunked one, or a recompute)."""
        return self.num_uncached_tokens > 1

    @property
    def queue_state(self) -> RequestState:
        """Where it waits when no pass holds it: READY with only its last token to feed, else WAITING."""
        return RequestState.WAITING if self.needs_prefill else RequestState.READY

    @property
    def deadline_at(self) -> float:
        """When its first token is due; infinity without a deadline."""
        return math.inf if self.ttft_deadline_s is None else self.arrival + self.ttft_deadline_s

    @property
    def waiting_since(self) -> float:
        """When it last made progress (its last token, else its arrival): the start of its current wait."""
        return self.times.tokens[-1] if self.times.tokens else self.arrival

    @property
    def finished(self) -> bool:
        """True once it has finished for any reason."""
        return self.state is RequestState.FINISHED
