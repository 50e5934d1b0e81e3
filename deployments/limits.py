"""What one call and one client may ask of the service, so that no single client can take a replica: the
per-call token budget, the bound on prompt log-probabilities, and the sequences each API key may have in
flight. The values are `AppSettings` fields (deployments/settings.py, their one home).

The budget is checked twice: at the ingress on what it knows without a tokenizer (a lower bound: a text
prompt counts one token), which refuses an absurd `n` or `max_tokens` before any replica sees it; and on the
replica on the exact token counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from deployments.auth import ApiKey, Client, identify
from deployments.openai_api import ApiError
from deployments.protocol import GenerateRequest
from deployments.settings import AppSettings
from qllm_core.errors import InvalidRequestError, PromptTooLongError
from qllm_core.request import PriorityClass

# A client over its in-flight limit is told to come back this soon: its own calls end within seconds.
_RETRY_AFTER_S = 1


def _count(value: int) -> str:
    """A count for a message. A client's max_tokens may have thousands of digits, and Python refuses to
    write an int past 4300 of them (ValueError): a 500 where a 413 was due."""
    return str(value) if value < 10**18 else "more than 10^18"


@dataclass(frozen=True)
class CallLimits:
    """The bounds on one call."""

    max_call_tokens: int
    """Sequences x (prompt tokens + max_tokens), summed over the call's prompts."""
    max_prompt_logprob_tokens: int
    """Prompt tokens whose log-probabilities one call may ask for (`echo` with `logprobs`), over its choices."""

    @classmethod
    def of(cls, settings: AppSettings) -> CallLimits:
        """The limits configured in `settings`."""
        return cls(settings.max_call_tokens, settings.max_prompt_logprob_tokens)

    def check(self, request: GenerateRequest, prompt_tokens: Sequence[int]) -> None:
        """Raise `PromptTooLongError` (413) when the call, with `prompt_tokens` per prompt, is over a bound."""
        max_tokens = request.params.max_tokens
        cost = request.n * sum(tokens + max_tokens for tokens in prompt_tokens)
        if cost > self.max_call_tokens:
            raise PromptTooLongError(
                f"this call asks for {_count(cost)} tokens (n x (prompt + max_tokens), summed over its prompts); "
                f"at most {self.max_call_tokens} are allowed: send fewer choices, shorter prompts or a "
                "smaller max_tokens",
                param="max_tokens",
            )
        if request.params.prompt_logprobs is not None:
            scored = request.n * sum(prompt_tokens)
            if scored > self.max_prompt_logprob_tokens:
                raise PromptTooLongError(
                    f"echo with logprobs scores {scored} prompt tokens in this call (n x prompt tokens); at "
                    f"most {self.max_prompt_logprob_tokens} are allowed: send shorter prompts or no logprobs",
                    param="echo",
                )

    def check_known(self, request: GenerateRequest) -> None:
        """`check` on what the ingress knows: token-id prompts by their length, any other prompt as one
        token (a lower bound, so nothing the replica would serve is refused here)."""
        known = [len(p.token_ids) if p.token_ids is not None else 1 for p in request.prompts]
        try:
            self.check(request, known)
        except PromptTooLongError as exc:
            raise ApiError(413, exc.message, param=exc.param, code="call_too_large") from None


@dataclass
class ClientQuota:
    """Sequences in flight per client (API key) on this ingress replica; a call that would pass the bound
    gets 429. Clients are told apart only by their keys: with no key configured there is no per-client
    bound (the per-call budget still holds)."""

    max_sequences: int
    _in_flight: dict[str, int] = field(default_factory=dict)

    def acquire(self, client: str, sequences: int) -> None:
        """Count a call's `sequences` for `client`, or refuse the call with a 429."""
        held = self._in_flight.get(client, 0)
        if held + sequences > self.max_sequences:
            raise ApiError(
                429,
                f"this API key has {held} sequences in flight and asks for {sequences} more; at most "
                f"{self.max_sequences} are allowed at once: retry when some have finished",
                code="too_many_sequences",
                headers={"Retry-After": str(_RETRY_AFTER_S)},
            )
        self._in_flight[client] = held + sequences

    def release(self, client: str, sequences: int) -> None:
        """A call of `client` has ended (answered, failed, or the client left)."""
        left = self._in_flight.get(client, 0) - sequences
        if left > 0:
            self._in_flight[client] = left
        else:
            self._in_flight.pop(client, None)

    def in_flight(self, client: str) -> int:
        """Sequences `client` has in flight now."""
        return self._in_flight.get(client, 0)


_ANONYMOUS = Client("anonymous")
"""Every client of an open API (no key configured): one client, with no per-client bound."""


class Gate:
    """What the ingress checks of a call before any replica sees it: the key, the class the client may ask
    for, the deadline floor, the call's budget on what is known, and the client's sequences in flight."""

    def __init__(self, settings: AppSettings, keys: tuple[ApiKey, ...] | None) -> None:
        self._keys = keys
        self._default_priority = settings.engine.default_priority
        self._min_deadline_ms = settings.min_ttft_deadline_ms
        self._limits = CallLimits.of(settings)
        self._quota = ClientQuota(settings.max_sequences_per_key)

    def client(self, authorization: str | None) -> Client:
        """The caller, or a 401 when keys are configured and the header carries none of them."""
        if self._keys is None:
            return _ANONYMOUS
        client = identify(authorization, self._keys)
        if client is None:
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return client

    def priority(self, client: Client, asked: str | None) -> PriorityClass:
        """The class asked for (the body's, else the header's, else the default), within what the key may."""
        default = PriorityClass.BEST_EFFORT.label if client.best_effort_only else self._default_priority
        try:
            priority = PriorityClass.parse(asked if asked is not None else default)
        except InvalidRequestError as exc:
            raise ApiError(400, exc.message, param="priority") from None
        if client.best_effort_only and priority is not PriorityClass.BEST_EFFORT:
            raise ApiError(
                403, "this API key may send only best_effort requests", param="priority", code="class_not_allowed"
            )
        return priority

    def deadline_s(self, ttft_deadline_ms: float | None) -> float | None:
        """The request's own TTFT deadline in seconds, no shorter than the floor (400 below it)."""
        if ttft_deadline_ms is None:
            return None
        if ttft_deadline_ms < self._min_deadline_ms:
            raise ApiError(
                400,
                f"ttft_deadline_ms must be at least {self._min_deadline_ms:g}, got {ttft_deadline_ms:g}",
                param="ttft_deadline_ms",
            )
        return ttft_deadline_ms / 1000

    def admit(self, client: Client, request: GenerateRequest) -> None:
        """Refuse a call over the budget (413) or over the client's in-flight bound (429); else count it
        in flight until `release`."""
        self._limits.check_known(request)
        if client is not _ANONYMOUS:
            self._quota.acquire(client.name, request.choices)

    def release(self, client: Client, request: GenerateRequest) -> None:
        """The call admitted by `admit` has ended."""
        if client is not _ANONYMOUS:
            self._quota.release(client.name, request.choices)
