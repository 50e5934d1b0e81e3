"""The placement rules, as functions of replica load reports (no Ray, no clock of their own), and the log
of placements the reports do not show yet.

Used by the PriorityRouter (BE) and by the request router inside the ingress's handle (LS, and BE when
the PriorityRouter cannot be reached), so both place requests the same way, with the same configured
values (`RoutingRules`).
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from deployments.protocol import ClassLoad, Outlook, ReplicaLoad, TtftObservation
from deployments.settings import AppSettings
from qllm_core.request import PriorityClass
from qllm_core.stats import ClassStats, EngineStats

LS, BE = PriorityClass.LATENCY_SENSITIVE, PriorityClass.BEST_EFFORT
# An engine is "full" for BE once this many sequences are queued or running per batch slot.
_BE_SLOTS_PER_BATCH = 2
# KV usage from which a replica takes no more BE (what it has would be evicted for it).
_KV_FULL = 0.95
# A predicted LS TTFT above this share of the SLO leaves too little margin: the replica counts as at risk.
_RISK_MARGIN = 0.8
# The typical LS TTFT assumed before any replica has one: an idle engine answers well within the SLO.
_PRIOR_SHARE_OF_SLO = 0.1
# A report may not show a placement made this shortly before it was taken: the request was still on its
# way to the engine. Such placements stay counted.
_IN_TRANSIT_S = 0.05


@dataclass(frozen=True)
class RoutingRules:
    """The configured values the rules use. Plain numbers, so that they also travel as Ray Serve's
    `request_router_kwargs` (which must be JSON) to the request router in the ingress's handle."""

    ls_ttft_slo_s: float
    be_ttft_slo_s: float
    slo_target: float
    slo_window: int
    slo_window_s: float
    max_queued_ls: int
    max_queued_be: int
    be_hold_max_s: float

    @classmethod
    def of(cls, settings: AppSettings) -> RoutingRules:
        """The rules an application's settings configure."""
        return cls(
            ls_ttft_slo_s=settings.ls_ttft_slo_s,
            be_ttft_slo_s=settings.be_ttft_slo_s,
            slo_target=settings.slo_target,
            slo_window=settings.slo_window,
            slo_window_s=settings.slo_window_s,
            max_queued_ls=settings.max_queued_ls,
            max_queued_be=settings.max_queued_be,
            be_hold_max_s=settings.be_hold_max_s,
        )

    def slo_s(self, priority: PriorityClass) -> float:
        """A class's TTFT objective in seconds."""
        return self.ls_ttft_slo_s if priority is LS else self.be_ttft_slo_s

    def max_queued(self, priority: PriorityClass) -> int:
        """How many requests of a class may wait before more get 429."""
        return self.max_queued_ls if priority is LS else self.max_queued_be

    def retry_after_s(self, priority: PriorityClass) -> float:
        """What a rejected client is told to wait: BE, the router's hold bound; LS, a second."""
        return self.be_hold_max_s if priority is BE else 1.0


@dataclass(frozen=True)
class Unreported:
    """Placements on a replica that its last report does not show yet."""

    ls: int = 0
    be: int = 0

    def of(self, priority: PriorityClass) -> int:
        """The count of one class."""
        return self.ls if priority is LS else self.be


class PlacementLog:
    """The placements one placer (the PriorityRouter, or a request router in a handle) made, kept until the
    replica's reports show them. Times are wall-clock (`time.time()`), as reports are stamped."""

    def __init__(self) -> None:
        self._placed: dict[str, deque[tuple[float, PriorityClass, int]]] = {}

    def add(self, replica_id: str, priority: PriorityClass, at: float, sequences: int = 1) -> None:
        """A call of `priority` placed on the replica at `at`, fanning out to `sequences` engine requests
        there (as the replica's reports count them: one per choice)."""
        self._placed.setdefault(replica_id, deque()).append((at, priority, sequences))

    def unreported(self, load: ReplicaLoad) -> Unreported:
        """The placements `load` does not show: those made after it was taken, or shortly before."""
        placed = self._placed.get(load.replica_id)
        if not placed:
            return Unreported()
        while placed and placed[0][0] < load.reported_at - _IN_TRANSIT_S:
            placed.popleft()
        ls = sum(n for _, priority, n in placed if priority is LS)
        return Unreported(ls=ls, be=sum(n for _, _, n in placed) - ls)

    def keep_only(self, replica_ids: Collection[str]) -> None:
        """Forget replicas that are gone."""
        for rid in [rid for rid in self._placed if rid not in replica_ids]:
            del self._placed[rid]


def replica_load(
    replica_id: str, stats: EngineStats, max_batch_size: int, wall_now: float, mono_now: float
) -> ReplicaLoad:
    """An engine's stats as a load report. The engine stamps TTFTs with its own `time.monotonic()`
    (`mono_now` here); they are moved onto the wall clock (`wall_now`) so the router can age them."""
    offset = wall_now - mono_now

    def of(cls: ClassStats) -> ClassLoad:
        samples = tuple(TtftObservation(s.observed_at + offset, s.ttft_s) for s in cls.recent_ttft)
        return ClassLoad(waiting=cls.waiting, running=cls.running + cls.ready, recent_ttft=samples)

    return ReplicaLoad(
        replica_id=replica_id,
        ls=of(stats.classes[LS.label]),
        be=of(stats.classes[BE.label]),
        kv_usage=stats.kv_usage,
        max_batch_size=max_batch_size,
        reported_at=wall_now,
    )


def in_window(samples: Sequence[TtftObservation], rules: RoutingRules, now: float) -> list[float]:
    """The TTFTs observed in the last `slo_window_s` seconds (wall clock), at most the last `slo_window`."""
    cutoff = now - rules.slo_window_s
    return [s.ttft_s for s in samples[-rules.slo_window :] if s.at >= cutoff]


def attainment(ttfts: Sequence[float], slo_s: float) -> float | None:
    """Share of the TTFTs at or under the SLO; None without any."""
    return None if not ttfts else sum(t <= slo_s for t in ttfts) / len(ttfts)


def _typicals(windows: list[list[float]], default: float) -> list[float]:
    """Each replica's mean TTFT over its window (the mean, not the median: a replica that is slow now and
    then, behind a long BE prompt, shows in its tail); a replica with none in the window takes the fleet's,
    so it is neither avoided for an old burst nor preferred for being unknown."""
    fleet = [t for w in windows for t in w]
    prior = statistics.fmean(fleet) if fleet else default
    return [statistics.fmean(w) if w else prior for w in windows]


def outlooks(reports: Sequence[tuple[ReplicaLoad, Unreported]], rules: RoutingRules, now: float) -> list[Outlook]:
    """Each replica's prospects. A new request's TTFT there is predicted as its class's typical TTFT there
    times the prompts of that class ahead of it (for LS, BE does not count: the engine preempts BE for LS)."""
    ls_windows = [in_window(load.ls.recent_ttft, rules, now) for load, _ in reports]
    be_windows = [in_window(load.be.recent_ttft, rules, now) for load, _ in reports]
    prior = _PRIOR_SHARE_OF_SLO * rules.ls_ttft_slo_s
    ls_typical, be_typical = _typicals(ls_windows, prior), _typicals(be_windows, prior)
    result = []
    for i, (load, unreported) in enumerate(reports):
        predicted_ls = ls_typical[i] * (1 + load.ls.waiting + unreported.ls)
        predicted_be = be_typical[i] * (1 + load.be.waiting + unreported.be)
        spare = _BE_SLOTS_PER_BATCH * load.max_batch_size - load.in_flight - unreported.ls - unreported.be
        if load.kv_usage >= _KV_FULL:
            spare = min(spare, 0)
        ls_attainment = attainment(ls_windows[i], rules.ls_ttft_slo_s)
        be_attainment = attainment(be_windows[i], rules.be_ttft_slo_s)
        at_risk = predicted_ls > _RISK_MARGIN * rules.ls_ttft_slo_s or (
            ls_attainment is not None and ls_attainment < rules.slo_target
        )
        result.append(Outlook(load, predicted_ls, predicted_be, spare, ls_attainment, be_attainment, at_risk))
    return result


def rank(priority: PriorityClass, candidates: Sequence[Outlook]) -> tuple[str, ...]:
    """Replica ids, best first. LS: by predicted TTFT, then replicas not at risk, then BE spare. BE: away
    from replicas at risk, then from full ones, then where it is predicted to start soonest."""
    if priority is LS:
        ordered = sorted(candidates, key=lambda o: (o.predicted_ls_ttft_s, o.at_risk, -o.be_spare))
    else:
        ordered = sorted(candidates, key=lambda o: (o.at_risk, o.be_spare <= 0, o.predicted_be_ttft_s, -o.be_spare))
    return tuple(o.replica_id for o in ordered)


def can_take_be(candidate: Outlook) -> bool:
    """A replica takes BE now: it has spare slots and its LS SLO is not at risk."""
    return candidate.be_spare > 0 and not candidate.at_risk


def queued(priority: PriorityClass, reports: Sequence[tuple[ReplicaLoad, Unreported]]) -> int:
    """Requests of a class waiting at the replicas: as reported, plus those placed since."""
    return sum(load.of(priority).waiting + unreported.of(priority) for load, unreported in reports)
