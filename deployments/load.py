"""Replica load as replicas report it, and the placement rules built on it (pure functions, no Ray).

Used by the PriorityRouter (its decisions) and by the request router inside Ray Serve's handle (the
fallback when the PriorityRouter cannot be reached), so both place requests the same way.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from qllm_core.stats import EngineStats

LS, BE = "latency_sensitive", "best_effort"
# An engine is "full" for BE once this many sequences are queued or running per batch slot.
_BE_SLOTS_PER_BATCH = 2


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica's load, as it reports it (also its Ray Serve routing stats)."""

    replica_id: str
    ls_waiting: int
    ls_running: int
    be_waiting: int
    be_running: int
    kv_usage: float
    max_batch_size: int
    recent_ls_ttft_s: tuple[float, ...]
    recent_be_ttft_s: tuple[float, ...]
    reported_at: float

    @classmethod
    def from_stats(cls, replica_id: str, stats: EngineStats, max_batch_size: int, now: float) -> ReplicaLoad:
        """Summarise an engine's stats."""
        ls, be = stats.classes[LS], stats.classes[BE]
        return cls(
            replica_id=replica_id,
            ls_waiting=ls.waiting,
            ls_running=ls.running + ls.ready,
            be_waiting=be.waiting,
            be_running=be.running + be.ready,
            kv_usage=stats.kv_usage,
            max_batch_size=max_batch_size,
            recent_ls_ttft_s=ls.recent_ttft_s,
            recent_be_ttft_s=be.recent_ttft_s,
            reported_at=now,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data for Ray Serve's routing stats and actor calls."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReplicaLoad:
        """Inverse of `to_dict`."""
        d = dict(data)
        d["recent_ls_ttft_s"] = tuple(d["recent_ls_ttft_s"])
        d["recent_be_ttft_s"] = tuple(d["recent_be_ttft_s"])
        return cls(**d)


@dataclass(frozen=True)
class Outlook:
    """A replica's prospects for new work, given its load and what was placed since it reported."""

    replica_id: str
    predicted_ls_ttft_s: float
    be_spare: int
    ls_attainment: float | None
    """Fraction of its recent LS requests that met the SLO (None before any)."""


def attainment(ttfts: Sequence[float], slo_s: float, window: int) -> float | None:
    """Fraction of the last `window` TTFTs at or under the SLO."""
    recent = list(ttfts)[-window:]
    return None if not recent else sum(t <= slo_s for t in recent) / len(recent)


def outlook(load: ReplicaLoad, placed_ls: int, placed_be: int, slo_s: float, window: int) -> Outlook:
    """Predicted LS TTFT: its typical LS TTFT times the LS prompts ahead of a new one (BE does not count:
    the engine preempts BE for LS). BE spare: batch slots left after everything queued and running."""
    typical = statistics.median(load.recent_ls_ttft_s[-window:]) if load.recent_ls_ttft_s else slo_s / 10
    predicted = typical * (1 + load.ls_waiting + placed_ls)
    occupied = load.ls_waiting + load.ls_running + load.be_waiting + load.be_running + placed_ls + placed_be
    spare = _BE_SLOTS_PER_BATCH * load.max_batch_size - occupied
    if load.kv_usage >= 0.95:
        spare = min(spare, 0)
    return Outlook(load.replica_id, predicted, spare, attainment(load.recent_ls_ttft_s, slo_s, window))


def at_risk(o: Outlook, slo_s: float, target: float) -> bool:
    """True when a replica's LS SLO is in danger: predicted TTFT near the SLO, or attainment below target."""
    return o.predicted_ls_ttft_s > 0.8 * slo_s or (o.ls_attainment is not None and o.ls_attainment < target)


def rank(priority: str, outlooks: Sequence[Outlook]) -> list[str]:
    """Replica ids, best first: LS by predicted TTFT, BE by spare capacity."""
    if priority == LS:
        ordered = sorted(outlooks, key=lambda o: (o.predicted_ls_ttft_s, -o.be_spare))
    else:
        ordered = sorted(outlooks, key=lambda o: (-o.be_spare, o.predicted_ls_ttft_s))
    return [o.replica_id for o in ordered]
