"""Requests: priority classes, sampling parameters, the request state machine and its timestamps."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from qllm_core.errors import InvalidRequestError

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256


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


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature=0 is greedy and deterministic; a seed makes sampling repeatable."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 keeps every token."""
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_float("temperature", self.temperature, low=0.0, high=2.0)
        _check_float("top_p", self.top_p, low=0.0, high=1.0)
        if self.top_p <= 0.0:
            raise InvalidRequestError("top_p must be in (0, 1]; use 1 to keep every token", param="top_p")
        _check_int("top_k", self.top_k, low=0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=2**63 - 1)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError("stop must be a list of non-empty strings", param="stop")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise InvalidRequestError(f"at most {MAX_STOP_SEQUENCES} stop strings are allowed", param="stop")
        if any(len(s) > MAX_STOP_LENGTH for s in self.stop):
            raise InvalidRequestError(f"a stop string may have at most {MAX_STOP_LENGTH} characters", param="stop")
        if not isinstance(self.stop_token_ids, tuple):
            raise InvalidRequestError("stop_token_ids must be a list of token ids", param="stop_token_ids")
        for tid in self.stop_token_ids:
            _check_int("stop_token_ids", tid, low=0)
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError("ignore_eos must be true or false", param="ignore_eos")

    @property
    def greedy(self) -> bool:
        """True when the most likely token is always taken."""
        return self.temperature == 0.0 or self.top_k == 1


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}", param=name)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise InvalidRequestError(f"{name} must be {bound}, got {value}", param=name)


def _check_float(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{name} must be a number, got {value!r}", param=name)
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidRequestError(f"{name} must be between {low} and {high}, got {value}", param=name)


class RequestState(enum.Enum):
    """A request's life. WAITING needs a prefill (first, or again after its KV was dropped); READY has its
    KV cached and waits for its next decode step; RUNNING is inside a forward pass (active or suspended)."""

    WAITING = "waiting"
    READY = "ready"
    RUNNING = "running"
    FINISHED = "finished"


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

    @property
    def queue_wait(self) -> float | None:
        """Time from arrival to first being scheduled."""
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival


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
    evictions: int = 0
    """Times its KV was dropped under memory pressure (to be recomputed)."""
    times: RequestTimes = field(init=False)

    def __post_init__(self) -> None:
        self.times = RequestTimes(arrival=self.arrival)

    def move_to(self, new: RequestState) -> None:
        """Change state along an allowed edge of the state machine."""
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"request {self.request_id}: illegal transition {self.state.value} -> {new.value}")
        self.state = new

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by the output so far."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        """Prompt plus output length."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def needs_prefill(self) -> bool:
        """True when more than one token must be fed (a first prefill, or a recompute)."""
        return self.num_tokens - self.num_cached_tokens > 1

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


@dataclass(frozen=True)
class RequestOutput:
    """What a caller sees after each step: what is new since this request's previous output.

    Only the new tokens and text travel each step: a cumulative copy would make a long answer quadratic.
    The finished output also carries the whole output (`token_ids`, `text`), built once.
    """

    request_id: str
    priority: PriorityClass
    prompt_token_count: int
    new_token_ids: tuple[int, ...]
    """Tokens generated since the previous output."""
    num_output_tokens: int
    """Tokens generated so far."""
    text_delta: str
    """Text since the previous output. It never ends in half a UTF-8 character or in what may be the start
    of a stop string (both wait for the next token), so the deltas of a request add up to its final text."""
    finished: bool
    finish_reason: FinishReason | None = None
    error: str | None = None
    ttft_s: float | None = None
    preemptions: int = 0
    token_ids: tuple[int, ...] = ()
    """The whole output, on the finished output only (empty before)."""
    text: str = ""
    """The whole text, on the finished output only (empty before)."""
