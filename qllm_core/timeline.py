"""Where a request's time to first token went, as the engine saw it (the breakdown benchmarks report).

Measured cheaply: the engine keeps one running total of the time it has spent inside forward passes (its
busy clock), each pass its own running time, and each request the busy clock at its arrival and the
running time of the passes it was in. Time in other requests' passes is then a subtraction, with no
per-step work for requests that wait.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Timeline:
    """One request's time to first token, taken apart (seconds)."""

    ttft_s: float
    queued_s: float
    """Arrival to the start of its first pass."""
    prefill_passes: int
    """Passes its prompt took: one, or more when chunked, dropped or evicted and recomputed."""
    own_pass_s: float
    """Time the passes carrying it ran."""
    foreign_pass_s: float
    """Time passes without it ran between its arrival and its first token (what it waited for)."""
    shared_tokens: int
    """New tokens of other requests in the passes that carried its prompt (what made them longer)."""
    shared_requests: int
    """Other requests in those passes, counted once per pass."""

    @property
    def other_s(self) -> float:
        """The rest: the engine's work between passes (planning, sampling, outputs) and idle time."""
        return self.ttft_s - self.own_pass_s - self.foreign_pass_s


@dataclass
class TimelineMarks:
    """What a request accumulates until its first token, to build its `Timeline`."""

    busy_at_arrival: float = 0.0
    """The engine's busy clock when the request arrived."""
    own_pass_s: float = 0.0
    prefill_passes: int = 0
    shared_tokens: int = 0
    shared_requests: int = 0

    def timeline(self, ttft_s: float, queued_s: float, busy_now: float) -> Timeline:
        """The breakdown at the first token, `busy_now` being the busy clock then."""
        foreign = max(0.0, busy_now - self.busy_at_arrival - self.own_pass_s)
        return Timeline(
            ttft_s=ttft_s,
            queued_s=queued_s,
            prefill_passes=self.prefill_passes,
            own_pass_s=self.own_pass_s,
            foreign_pass_s=foreign,
            shared_tokens=self.shared_tokens,
            shared_requests=self.shared_requests,
        )
