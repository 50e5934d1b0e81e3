"""The choices of one call as their stream items reach the ingress: what each has produced so far, when the
call is done, and its usage."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from deployments.protocol import LogprobEntry, StreamItem
from qllm_core.request import FinishReason


@dataclass(frozen=True)
class Usage:
    """Token counts, as OpenAI's `usage` object gives them."""

    prompt_tokens: int
    completion_tokens: int

    def as_json(self) -> dict[str, int]:
        """`{"prompt_tokens", "completion_tokens", "total_tokens"}`."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def finish_reason(reason: FinishReason | None) -> str | None:
    """OpenAI's finish_reason: an abort (the client left) reads as a stop."""
    if reason is None:
        return None
    return "stop" if reason is FinishReason.ABORT else reason.value


@dataclass
class Choice:
    """One choice's progress. The whole answer (text, log-probabilities, echo) is kept only for an answer
    written at the end; a stream forwards each item and keeps the counts alone."""

    index: int
    items: int = 0
    """Items seen so far."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished: bool = False
    finish_reason: str | None = None
    text: str = ""
    prompt_text: str | None = None
    prompt_logprobs: tuple[LogprobEntry, ...] | None = None
    logprobs: list[LogprobEntry] | None = None

    @property
    def usage(self) -> Usage:
        """This choice's usage so far."""
        return Usage(self.prompt_tokens, self.completion_tokens)


@dataclass
class Choices:
    """Every choice of one call; `n` choices per prompt, numbered prompt by prompt."""

    count: int
    n: int
    keep: bool
    """Keep each choice's whole answer (an answer written at the end, not streamed)."""
    _choices: list[Choice] = field(init=False)

    def __post_init__(self) -> None:
        self._choices = [Choice(i) for i in range(self.count)]

    def add(self, item: StreamItem) -> Choice:
        """Take one item in; the choice it belongs to, updated."""
        choice = self._choices[item.index]
        choice.items += 1
        choice.prompt_tokens = item.prompt_tokens
        choice.completion_tokens = item.num_output_tokens
        choice.finished = item.finished
        choice.finish_reason = finish_reason(item.finish_reason)
        if self.keep:
            choice.text = item.text if item.finished else choice.text
            if item.prompt_text is not None:
                choice.prompt_text = item.prompt_text
            if item.prompt_logprobs is not None:
                choice.prompt_logprobs = item.prompt_logprobs
            if item.logprobs is not None:
                if choice.logprobs is None:
                    choice.logprobs = []
                choice.logprobs.extend(item.logprobs)
        return choice

    def __iter__(self) -> Iterator[Choice]:
        return iter(self._choices)

    @property
    def finished(self) -> bool:
        """Every choice has finished."""
        return all(c.finished for c in self._choices)

    def usage(self) -> Usage:
        """The call's usage: each prompt counted once (not once per choice), every choice's output."""
        prompts = sum(c.prompt_tokens for c in self._choices if c.index % self.n == 0)
        return Usage(prompts, sum(c.completion_tokens for c in self._choices))

    def finish_reasons(self) -> str | None:
        """The choices' finish reasons in order, comma-separated (for the request log)."""
        reasons = [c.finish_reason for c in self._choices if c.finish_reason is not None]
        return ",".join(reasons) if reasons else None
