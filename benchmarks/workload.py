"""Workloads: the requests of one benchmark run, each with its arrival time, class, prompt and output length.

Two sources:

- `poisson_workload`: open-loop Poisson arrivals at a given rate; each request is latency-sensitive (LS)
  with probability `ls_share`, else best-effort (BE); prompt and output lengths are drawn from capped
  lognormal distributions, the shape of ShareGPT's heavy-tailed conversation lengths, or from a
  `PairPool` of real (prompt, reply) lengths (a dataset's, see `benchmarks.sharegpt`).
- `benchmarks.trace.load_trace`: a JSONL file replayed exactly (one request per line).

Everything is seeded. One seed gives the same sequence of (class, lengths, prompt tokens, unit gaps) at
every rate: only the arrival times scale with 1/rate, so the runs of a sweep differ in load alone
(common random numbers), and a run repeats exactly.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, cast

from benchmarks.checks import is_int, is_number, positive
from qllm_core.errors import InvalidRequestError
from qllm_core.request import PriorityClass

Priority = Literal["ls", "be"]
"""A class by its short name (`PriorityClass.short`); `PriorityClass` is the home of the names."""
PRIORITIES = cast(tuple[Priority, ...], tuple(c.short for c in PriorityClass))


class WorkloadError(ValueError):
    """A workload setting is out of range or inconsistent; the message says what to change."""


def short_priority(value: object) -> Priority:
    """A class as the benchmarks name it ("ls" or "be"), from any name `PriorityClass` accepts
    ("latency_sensitive", "LS", ...); WorkloadError otherwise."""
    try:
        return cast(Priority, PriorityClass.parse(value).short)  # type: ignore[arg-type]
    except InvalidRequestError as exc:
        raise WorkloadError(str(exc)) from None


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


@dataclass(frozen=True)
class LengthDistribution:
    """Token lengths drawn from a lognormal, rounded and clipped to [minimum, cap].

    `mean` is the mean *after* capping: the lognormal's location is solved so that capping does not
    pull the mean down (rounding and the lower bound move it by far less than the sampling noise for
    means of a few tokens or more). `sigma` is the spread of log-lengths; 0 makes every length `mean`.
    """

    mean: float
    cap: int
    sigma: float = 1.0
    minimum: int = 1

    def __post_init__(self) -> None:
        if not is_int(self.minimum) or self.minimum < 1:
            raise WorkloadError(f"minimum length must be an integer >= 1, got {self.minimum!r}")
        if not is_int(self.cap) or self.cap < self.minimum:
            raise WorkloadError(f"length cap must be an integer >= {self.minimum}, got {self.cap!r}")
        if not is_number(self.sigma) or self.sigma < 0:
            raise WorkloadError(f"length sigma must be a finite number >= 0, got {self.sigma!r}")
        if not is_number(self.mean):
            raise WorkloadError(f"mean length must be a finite number, got {self.mean!r}")
        if self.sigma == 0:
            if not self.minimum <= self.mean <= self.cap:
                raise WorkloadError(f"mean length {self.mean} must lie in [{self.minimum}, {self.cap}] (the cap)")
        elif not self.minimum <= self.mean < self.cap:
            raise WorkloadError(
                f"mean length {self.mean} must be at least {self.minimum} and below the cap {self.cap}; "
                "raise the cap or lower the mean (or set sigma 0 for a constant length)"
            )

    def capped_mean(self, mu: float) -> float:
        """E[min(X, cap)] for X ~ lognormal(mu, sigma) (closed form)."""
        s = self.sigma
        log_cap = math.log(self.cap)
        below = math.exp(mu + s * s / 2.0) * _normal_cdf((log_cap - mu - s * s) / s)
        return below + self.cap * (1.0 - _normal_cdf((log_cap - mu) / s))

    @property
    def mu(self) -> float:
        """The lognormal location whose capped mean is `mean` (bisection; the capped mean rises with mu)."""
        if self.sigma == 0:
            return math.log(self.mean)
        low = math.log(self.mean) - self.sigma * self.sigma - 10.0
        high = math.log(self.cap) + 10.0
        for _ in range(200):
            mid = (low + high) / 2.0
            if self.capped_mean(mid) < self.mean:
                low = mid
            else:
                high = mid
        return (low + high) / 2.0

    def sampler(self) -> _LengthSampler:
        """A sampler with the location solved once."""
        return _LengthSampler(self, self.mu)


@dataclass(frozen=True)
class _LengthSampler:
    dist: LengthDistribution
    mu: float

    def sample(self, rng: random.Random) -> int:
        d = self.dist
        x = rng.lognormvariate(self.mu, d.sigma) if d.sigma > 0 else d.mean
        return min(d.cap, max(d.minimum, round(x)))


@dataclass(frozen=True)
class LengthPair:
    """One (prompt, reply) pair of a dataset, as token counts; the prompt text is kept only when the counts
    came from the model's tokenizer, so that the prompt sent is the real one."""

    prompt_len: int
    reply_len: int
    prompt_text: str | None = None


@dataclass(frozen=True)
class PairPool:
    """The pairs a workload draws its lengths from (uniformly, seeded), instead of the lognormals.

    `encode` turns a pair's prompt text into the model's token ids (with the tokenizer that counted it); a
    pair without text, or a pool without `encode`, gets random token ids of its length, as a trace's
    `prompt_len` does (the random-weight presets' toy tokenizers make text meaningless there).
    """

    pairs: tuple[LengthPair, ...]
    source: str
    max_tokens_cap: int | None = None
    """Replies longer than this ask for this many tokens (to fit runs in time); None keeps them whole."""
    encode: Callable[[str], Sequence[int]] | None = None

    def __post_init__(self) -> None:
        if not self.pairs:
            raise WorkloadError(f"{self.source} has no (prompt, reply) pairs to draw from")
        if self.max_tokens_cap is not None:
            positive("max_tokens_cap", self.max_tokens_cap, WorkloadError, integer=True)

    def max_tokens(self, pair: LengthPair) -> int:
        """What a request drawn from `pair` asks for: its reply's length, capped."""
        cap = self.max_tokens_cap
        return pair.reply_len if cap is None else min(pair.reply_len, cap)


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload: when it arrives (seconds after the run starts), its class and its sizes.

    Exactly one of `prompt_token_ids` and `prompt_text` is set.
    """

    index: int
    arrival_s: float
    priority: Priority
    max_tokens: int
    prompt_token_ids: tuple[int, ...] | None = None
    prompt_text: str | None = None

    def __post_init__(self) -> None:
        if not is_number(self.arrival_s) or self.arrival_s < 0:
            raise WorkloadError(f"request {self.index}: arrival_s must be a finite number >= 0, got {self.arrival_s!r}")
        if self.priority not in PRIORITIES:
            raise WorkloadError(f"request {self.index}: priority must be 'ls' or 'be', got {self.priority!r}")
        positive(f"request {self.index}: max_tokens", self.max_tokens, WorkloadError, integer=True)
        if (self.prompt_token_ids is None) == (self.prompt_text is None):
            raise WorkloadError(f"request {self.index}: give exactly one of prompt_token_ids or prompt_text")
        if self.prompt_token_ids is not None and (
            not self.prompt_token_ids or not all(is_int(t) and t >= 0 for t in self.prompt_token_ids)
        ):
            raise WorkloadError(f"request {self.index}: prompt_token_ids must be a non-empty list of token ids >= 0")
        if self.prompt_text is not None and (not isinstance(self.prompt_text, str) or not self.prompt_text):
            raise WorkloadError(f"request {self.index}: prompt text must be a non-empty string")

    @property
    def prompt(self) -> str | list[int]:
        """The prompt as an API takes it: text, or a list of token ids."""
        if self.prompt_token_ids is not None:
            return list(self.prompt_token_ids)
        assert self.prompt_text is not None
        return self.prompt_text

    @property
    def prompt_len(self) -> int | None:
        """Prompt length in tokens; None for a text prompt (its length depends on the server's tokenizer)."""
        return None if self.prompt_token_ids is None else len(self.prompt_token_ids)


@dataclass(frozen=True)
class Workload:
    """The requests of one run in arrival order, and the rate they are offered at (requests per second)."""

    requests: tuple[RequestSpec, ...]
    rate: float
    source: str

    def __post_init__(self) -> None:
        if not self.requests:
            raise WorkloadError(f"workload from {self.source} has no requests")
        positive("workload rate", self.rate, WorkloadError, unit="requests per second")
        arrivals = [r.arrival_s for r in self.requests]
        if arrivals != sorted(arrivals):
            raise WorkloadError("workload requests must be in arrival order")

    @property
    def span_s(self) -> float:
        """Time of the last arrival."""
        return self.requests[-1].arrival_s

    def count(self, priority: Priority) -> int:
        """How many requests of a class."""
        return sum(1 for r in self.requests if r.priority == priority)

    def scaled_to(self, rate: float) -> Workload:
        """The same requests with arrival times stretched or squeezed so they are offered at `rate`."""
        positive("rate", rate, WorkloadError, unit="requests per second")
        factor = self.rate / rate
        return Workload(
            tuple(dataclasses.replace(r, arrival_s=r.arrival_s * factor) for r in self.requests), rate, self.source
        )

    def summary(self) -> WorkloadSummary:
        """Counts and sizes, for reports."""
        lens = [r.prompt_len for r in self.requests if r.prompt_len is not None]
        return WorkloadSummary(
            source=self.source,
            rate=self.rate,
            requests=len(self.requests),
            ls=self.count("ls"),
            be=self.count("be"),
            span_s=self.span_s,
            mean_prompt_len=sum(lens) / len(lens) if lens else None,
            mean_max_tokens=sum(r.max_tokens for r in self.requests) / len(self.requests),
        )


@dataclass(frozen=True)
class WorkloadSummary:
    """A workload's counts and sizes."""

    source: str
    rate: float
    requests: int
    ls: int
    be: int
    span_s: float
    mean_prompt_len: float | None
    """Over the token-id prompts (None when every prompt is text)."""
    mean_max_tokens: float


DEFAULT_NUM_REQUESTS = 50


@dataclass(frozen=True)
class WorkloadSettings:
    """How to generate requests. Give `num_requests` (exactly that many), `duration_s` (every arrival
    before that time) or `ls_requests` (until that many LS requests arrived), each at most `max_requests`;
    with none, `DEFAULT_NUM_REQUESTS`."""

    ls_share: float = 0.2
    prompt_len: LengthDistribution = LengthDistribution(mean=220, cap=1024, sigma=1.0)
    max_tokens: LengthDistribution = LengthDistribution(mean=50, cap=128, sigma=0.5)
    num_requests: int | None = None
    duration_s: float | None = None
    ls_requests: int | None = None
    """Generate arrivals until this many are LS (percentiles need samples), at most `max_requests` in all."""
    max_requests: int = 2000
    seed: int = 0
    token_low: int = 3
    token_high: int = 500
    """Prompt token ids are drawn uniformly from [token_low, token_high) (stay inside the model's vocabulary)."""

    def __post_init__(self) -> None:
        if not is_number(self.ls_share) or not 0.0 <= self.ls_share <= 1.0:
            raise WorkloadError(f"ls_share must be a fraction in [0, 1], got {self.ls_share!r}")
        positive("max_requests", self.max_requests, WorkloadError, integer=True)
        if sum(x is not None for x in (self.num_requests, self.duration_s, self.ls_requests)) > 1:
            raise WorkloadError("give one of num_requests, duration_s and ls_requests, not several")
        if self.ls_requests is not None:
            if not is_int(self.ls_requests) or not 1 <= self.ls_requests <= self.max_requests:
                raise WorkloadError(
                    f"ls_requests must be an integer in [1, {self.max_requests}] (max_requests), "
                    f"got {self.ls_requests!r}"
                )
            if self.ls_share <= 0:
                raise WorkloadError("ls_requests needs ls_share > 0: with no LS requests the count is never reached")
        if self.num_requests is not None and (
            not is_int(self.num_requests) or not 1 <= self.num_requests <= self.max_requests
        ):
            raise WorkloadError(
                f"num_requests must be an integer in [1, {self.max_requests}] (max_requests), got {self.num_requests!r}"
            )
        if self.duration_s is not None:
            positive("duration_s", self.duration_s, WorkloadError, unit="seconds")
        if not is_int(self.seed) or self.seed < 0:
            raise WorkloadError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not (is_int(self.token_low) and is_int(self.token_high) and 0 <= self.token_low < self.token_high):
            raise WorkloadError(
                f"token range [{self.token_low}, {self.token_high}) is empty or negative; need 0 <= low < high"
            )

    @property
    def request_limit(self) -> int:
        """Most requests a generated workload has."""
        if self.num_requests is not None:
            return self.num_requests
        if self.duration_s is not None or self.ls_requests is not None:
            return self.max_requests
        return min(DEFAULT_NUM_REQUESTS, self.max_requests)


def poisson_workload(settings: WorkloadSettings, rate: float, pool: PairPool | None = None) -> Workload:
    """Open-loop Poisson arrivals at `rate` requests per second (first arrival one gap after 0); lengths from
    the settings' lognormals, or from `pool`'s pairs when one is given."""
    positive("rate", rate, WorkloadError, unit="requests per second")
    rng = random.Random(settings.seed)
    prompt_len = settings.prompt_len.sampler()
    max_tokens = settings.max_tokens.sampler()
    limit = settings.request_limit
    requests: list[RequestSpec] = []
    ls_count = 0
    t = 0.0
    while len(requests) < limit and (settings.ls_requests is None or ls_count < settings.ls_requests):
        # Same draws in the same order at every rate: unit gap, class, lengths, tokens.
        t += rng.expovariate(1.0) / rate
        if settings.duration_s is not None and t > settings.duration_s:
            break
        priority: Priority = "ls" if rng.random() < settings.ls_share else "be"
        ls_count += priority == "ls"
        ids: tuple[int, ...] | None = None
        if pool is None:
            n_prompt = prompt_len.sample(rng)
            n_out = max_tokens.sample(rng)
        else:
            pair = pool.pairs[rng.randrange(len(pool.pairs))]
            n_prompt, n_out = pair.prompt_len, pool.max_tokens(pair)
            if pool.encode is not None and pair.prompt_text is not None:
                ids = tuple(pool.encode(pair.prompt_text))
        if ids is None:
            ids = tuple(rng.randrange(settings.token_low, settings.token_high) for _ in range(n_prompt))
        requests.append(RequestSpec(len(requests), t, priority, n_out, prompt_token_ids=ids))
    if not requests:
        raise WorkloadError(
            f"no request arrived within duration_s={settings.duration_s} at rate {rate}; run longer or faster"
        )
    return Workload(tuple(requests), rate, "poisson" if pool is None else f"poisson, lengths from {pool.source}")
