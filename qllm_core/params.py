"""How a request picks its tokens: `SamplingParams`, with the one home of every range it accepts.

The HTTP side validates the same fields against the same bounds (deployments/openai_api.py reads them
from here), so a value is either accepted on both sides or refused on both with the same message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qllm_core.errors import InvalidRequestError

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
MAX_STOP_TOKEN_IDS = 64
"""Most stop token ids a request may name (each is checked against every sampled token)."""
MAX_LOGPROBS = 20
"""Most alternatives per position that `logprobs` and `prompt_logprobs` may ask for (OpenAI's top_logprobs bound)."""
TEMPERATURE_RANGE = (0.0, 2.0)
PENALTY_RANGE = (-2.0, 2.0)
"""presence_penalty and frequency_penalty, as OpenAI bounds them."""
REPETITION_PENALTY_MAX = 2.0


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
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already in the output (OpenAI's semantics)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it is already in the output."""
    repetition_penalty: float = 1.0
    """Divides positive (multiplies negative) logits of tokens in the prompt or the output, as transformers'
    `repetition_penalty` does; 1 is off."""
    logprobs: int | None = None
    """Return each generated token's log-probability and this many most likely alternatives (0: none)."""
    prompt_logprobs: int | None = None
    """Return each prompt token's log-probability (the first has none) and this many alternatives."""

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._check_sampling()
        self._check_stops()
        self._check_penalties()
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                check_int(name, value, low=0, high=MAX_LOGPROBS)

    def _check_sampling(self) -> None:
        check_int("max_tokens", self.max_tokens, low=1)
        check_float("temperature", self.temperature, *TEMPERATURE_RANGE)
        check_float("top_p", self.top_p, low=0.0, high=1.0)
        if self.top_p <= 0.0:
            raise InvalidRequestError("top_p must be in (0, 1]; use 1 to keep every token", param="top_p")
        check_int("top_k", self.top_k, low=0)
        if self.seed is not None:
            check_int("seed", self.seed, low=0, high=2**63 - 1)

    def _check_stops(self) -> None:
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError("stop must be a list of non-empty strings", param="stop")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise InvalidRequestError(f"at most {MAX_STOP_SEQUENCES} stop strings are allowed", param="stop")
        if any(len(s) > MAX_STOP_LENGTH for s in self.stop):
            raise InvalidRequestError(f"a stop string may have at most {MAX_STOP_LENGTH} characters", param="stop")
        if not isinstance(self.stop_token_ids, tuple):
            raise InvalidRequestError("stop_token_ids must be a list of token ids", param="stop_token_ids")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError(
                f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed", param="stop_token_ids"
            )
        for tid in self.stop_token_ids:
            check_int("stop_token_ids", tid, low=0)
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError("ignore_eos must be true or false", param="ignore_eos")

    def _check_penalties(self) -> None:
        check_float("presence_penalty", self.presence_penalty, *PENALTY_RANGE)
        check_float("frequency_penalty", self.frequency_penalty, *PENALTY_RANGE)
        check_float("repetition_penalty", self.repetition_penalty, low=0.0, high=REPETITION_PENALTY_MAX)
        if self.repetition_penalty <= 0.0:
            raise InvalidRequestError(
                f"repetition_penalty must be in (0, {REPETITION_PENALTY_MAX}]; use 1 for none",
                param="repetition_penalty",
            )

    @property
    def greedy(self) -> bool:
        """True when the most likely token is always taken."""
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """True when any penalty changes the logits."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """Raise InvalidRequestError naming `name` unless `value` is an int in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}", param=name)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise InvalidRequestError(f"{name} must be {bound}, got {value}", param=name)


def check_float(name: str, value: object, low: float, high: float) -> None:
    """Raise InvalidRequestError naming `name` unless `value` is a finite number in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{name} must be a number, got {value!r}", param=name)
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidRequestError(f"{name} must be between {low} and {high}, got {value}", param=name)
