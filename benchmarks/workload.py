"""Workloads: the requests of one benchmark run, each with its arrival time, class, prompt and output length.

Two sources:

- `poisson_workload`: open-loop Poisson arrivals at a given rate; each request is latency-sensitive (LS)
  with probability `ls_share`, else best-effort (BE); prompt and output lengths are drawn from capped
  lognormal distributions, the shape of ShareGPT's heavy-tailed conversation lengths.
- `load_trace`: a JSONL file replayed exactly (one request per line).

Everything is seeded. One seed gives the same sequence of (class, lengths, prompt tokens, unit gaps) at
every rate: only the arrival times scale with 1/rate, so the runs of a sweep differ in load alone
(common random numbers), and a run repeats exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Priority = Literal["ls", "be"]
PRIORITIES: tuple[Priority, ...] = ("ls", "be")
_PRIORITY_ALIASES: dict[str, Priority] = {
    "ls": "ls",
    "latency_sensitive": "ls",
    "be": "be",
    "best_effort": "be",
}


class WorkloadError(ValueError):
    """A workload setting is out of range or inconsistent; the message says what to change."""


class TraceError(WorkloadError):
    """A trace file cannot be replayed; the message names the file, the line and the field."""


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


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
        if not _is_int(self.minimum) or self.minimum < 1:
            raise WorkloadError(f"minimum length must be an integer >= 1, got {self.minimum!r}")
        if not _is_int(self.cap) or self.cap < self.minimum:
            raise WorkloadError(f"length cap must be an integer >= {self.minimum}, got {self.cap!r}")
        if not _is_number(self.sigma) or self.sigma < 0:
            raise WorkloadError(f"length sigma must be a finite number >= 0, got {self.sigma!r}")
        if not _is_number(self.mean):
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
        if not _is_number(self.arrival_s) or self.arrival_s < 0:
            raise WorkloadError(f"request {self.index}: arrival_s must be a finite number >= 0, got {self.arrival_s!r}")
        if self.priority not in PRIORITIES:
            raise WorkloadError(f"request {self.index}: priority must be 'ls' or 'be', got {self.priority!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise WorkloadError(f"request {self.index}: max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if (self.prompt_token_ids is None) == (self.prompt_text is None):
            raise WorkloadError(f"request {self.index}: give exactly one of prompt_token_ids or prompt_text")
        if self.prompt_token_ids is not None and (
            not self.prompt_token_ids or not all(_is_int(t) and t >= 0 for t in self.prompt_token_ids)
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
        if not _is_number(self.rate) or self.rate <= 0:
            raise WorkloadError(f"workload rate must be a positive number of requests per second, got {self.rate!r}")
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
        if not _is_number(rate) or rate <= 0:
            raise WorkloadError(f"rate must be a positive number of requests per second, got {rate!r}")
        factor = self.rate / rate
        return Workload(
            tuple(dataclasses.replace(r, arrival_s=r.arrival_s * factor) for r in self.requests), rate, self.source
        )

    def summary(self) -> dict[str, Any]:
        """Counts and sizes, for reports."""
        lens = [r.prompt_len for r in self.requests if r.prompt_len is not None]
        return {
            "source": self.source,
            "rate": self.rate,
            "requests": len(self.requests),
            "ls": self.count("ls"),
            "be": self.count("be"),
            "span_s": self.span_s,
            "mean_prompt_len": sum(lens) / len(lens) if lens else None,
            "mean_max_tokens": sum(r.max_tokens for r in self.requests) / len(self.requests),
        }


DEFAULT_NUM_REQUESTS = 50


@dataclass(frozen=True)
class WorkloadSettings:
    """How to generate requests. Give `num_requests` (exactly that many) or `duration_s` (every arrival
    before that time, at most `max_requests`); with neither, `DEFAULT_NUM_REQUESTS`."""

    ls_share: float = 0.2
    prompt_len: LengthDistribution = LengthDistribution(mean=220, cap=1024, sigma=1.0)
    max_tokens: LengthDistribution = LengthDistribution(mean=50, cap=128, sigma=0.5)
    num_requests: int | None = None
    duration_s: float | None = None
    max_requests: int = 2000
    seed: int = 0
    token_low: int = 3
    token_high: int = 500
    """Prompt token ids are drawn uniformly from [token_low, token_high) (stay inside the model's vocabulary)."""

    def __post_init__(self) -> None:
        if not _is_number(self.ls_share) or not 0.0 <= self.ls_share <= 1.0:
            raise WorkloadError(f"ls_share must be a fraction in [0, 1], got {self.ls_share!r}")
        if not _is_int(self.max_requests) or self.max_requests < 1:
            raise WorkloadError(f"max_requests must be an integer >= 1, got {self.max_requests!r}")
        if self.num_requests is not None and self.duration_s is not None:
            raise WorkloadError("give num_requests or duration_s, not both")
        if self.num_requests is not None and (
            not _is_int(self.num_requests) or not 1 <= self.num_requests <= self.max_requests
        ):
            raise WorkloadError(
                f"num_requests must be an integer in [1, {self.max_requests}] (max_requests), got {self.num_requests!r}"
            )
        if self.duration_s is not None and (not _is_number(self.duration_s) or self.duration_s <= 0):
            raise WorkloadError(f"duration_s must be a positive number of seconds, got {self.duration_s!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise WorkloadError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not (_is_int(self.token_low) and _is_int(self.token_high) and 0 <= self.token_low < self.token_high):
            raise WorkloadError(
                f"token range [{self.token_low}, {self.token_high}) is empty or negative; need 0 <= low < high"
            )

    @property
    def request_limit(self) -> int:
        """Most requests a generated workload has."""
        if self.num_requests is not None:
            return self.num_requests
        return self.max_requests if self.duration_s is not None else min(DEFAULT_NUM_REQUESTS, self.max_requests)


def poisson_workload(settings: WorkloadSettings, rate: float) -> Workload:
    """Open-loop Poisson arrivals at `rate` requests per second (first arrival one gap after 0)."""
    if not _is_number(rate) or rate <= 0:
        raise WorkloadError(f"rate must be a positive number of requests per second, got {rate!r}")
    rng = random.Random(settings.seed)
    prompt_len = settings.prompt_len.sampler()
    max_tokens = settings.max_tokens.sampler()
    limit = settings.request_limit
    requests: list[RequestSpec] = []
    t = 0.0
    while len(requests) < limit:
        # Same draws in the same order at every rate: unit gap, class, lengths, tokens.
        t += rng.expovariate(1.0) / rate
        if settings.duration_s is not None and t > settings.duration_s:
            break
        priority: Priority = "ls" if rng.random() < settings.ls_share else "be"
        n_prompt = prompt_len.sample(rng)
        n_out = max_tokens.sample(rng)
        ids = tuple(rng.randrange(settings.token_low, settings.token_high) for _ in range(n_prompt))
        requests.append(RequestSpec(len(requests), t, priority, n_out, prompt_token_ids=ids))
    if not requests:
        raise WorkloadError(
            f"no request arrived within duration_s={settings.duration_s} at rate {rate}; run longer or faster"
        )
    return Workload(tuple(requests), rate, "poisson")


def load_trace(path: Path | str, seed: int = 0, token_range: tuple[int, int] = (3, 500)) -> Workload:
    """Replay a JSONL trace exactly, in arrival order (a stable sort, so equal times keep file order).

    Each non-blank line is an object with `arrival_s` (seconds from the start, >= 0), `priority` ("ls" or
    "be"; "latency_sensitive"/"best_effort" also accepted), `max_tokens`, and either `prompt` (text, or a
    list of token ids) or `prompt_len` (that many token ids drawn uniformly from `token_range`, seeded).
    The workload's rate is the trace's own: requests / time of the last arrival.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror or exc}") from None
    rng = random.Random(seed)
    parsed = [_parse_line(path, n, line, rng, token_range) for n, line in enumerate(lines, 1) if line.strip()]
    if not parsed:
        raise TraceError(f"trace {path} has no requests")
    parsed.sort(key=lambda r: r.arrival_s)
    requests = tuple(dataclasses.replace(r, index=i) for i, r in enumerate(parsed))
    span = requests[-1].arrival_s
    if span <= 0:
        raise TraceError(f"trace {path}: every request arrives at 0 s, so it has no rate; spread the arrival_s values")
    return Workload(requests, len(requests) / span, f"trace:{path}")


def _parse_line(path: Path, lineno: int, line: str, rng: random.Random, token_range: tuple[int, int]) -> RequestSpec:
    where = f"{path}:{lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise TraceError(f"{where}: each line must be a JSON object")
    for key in ("arrival_s", "priority", "max_tokens"):
        if key not in row:
            raise TraceError(f"{where}: missing field {key!r}")
    priority = _PRIORITY_ALIASES.get(str(row["priority"]).lower()) if isinstance(row["priority"], str) else None
    if priority is None:
        raise TraceError(f"{where}: priority must be 'ls' or 'be', got {row['priority']!r}")
    has_prompt, has_len = "prompt" in row, "prompt_len" in row
    if has_prompt == has_len:
        raise TraceError(f"{where}: give exactly one of 'prompt' (text or token ids) or 'prompt_len'")
    ids: tuple[int, ...] | None = None
    text: str | None = None
    if has_len:
        n = row["prompt_len"]
        if not _is_int(n) or n < 1:
            raise TraceError(f"{where}: prompt_len must be an integer >= 1, got {n!r}")
        ids = tuple(rng.randrange(*token_range) for _ in range(n))
    elif isinstance(row["prompt"], str):
        text = row["prompt"]
    elif isinstance(row["prompt"], list):
        ids = tuple(row["prompt"])
    else:
        raise TraceError(f"{where}: prompt must be a string or a list of token ids")
    try:
        return RequestSpec(lineno, row["arrival_s"], priority, row["max_tokens"], ids, text)
    except WorkloadError as exc:
        raise TraceError(f"{where}: {str(exc).split(': ', 1)[-1]}") from None


def write_trace(requests: Iterable[RequestSpec], path: Path | str) -> None:
    """Write requests as a JSONL trace that `load_trace` replays exactly (token-id prompts kept as ids)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for r in requests:
            row: dict[str, Any] = {"arrival_s": r.arrival_s, "priority": r.priority, "max_tokens": r.max_tokens}
            row["prompt"] = r.prompt
            f.write(json.dumps(row) + "\n")
