"""The engine's load as plain data: what `Engine.stats()` returns and replicas report. No torch here, so
the HTTP side and the router can read it without loading the model stack."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TtftSample:
    """One request's time to first token, and when it was observed."""

    observed_at: float
    """`time.monotonic()` of the engine's process when the first token came (compare only within it)."""
    ttft_s: float


@dataclass(frozen=True)
class ClassStats:
    """One class's load."""

    waiting: int
    """Queued for a prefill (or the rest of one)."""
    ready: int
    """Queued for a decode step."""
    running: int
    """Inside a forward pass (active or suspended)."""
    recent_ttft: tuple[TtftSample, ...]
    """The latest TTFTs of this class, oldest first (at most `EngineConfig.ttft_window`)."""

    @property
    def recent_ttft_s(self) -> tuple[float, ...]:
        """The latest TTFTs alone, oldest first."""
        return tuple(s.ttft_s for s in self.recent_ttft)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, as `Engine.stats()` returns it."""

    classes: dict[str, ClassStats]
    """Per class, keyed by `PriorityClass.label`."""
    kv_used_blocks: int
    kv_total_blocks: int
    active_pass: str | None
    """Where the running pass stands ("attention@layer3"), or None."""
    suspended_passes: int
    passes_completed: int
    preemptions: int
    """Passes suspended for more urgent work."""
    merges: int
    resumes: int = 0
    """Suspended passes run again."""

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use."""
        return self.kv_used_blocks / self.kv_total_blocks
