"""What a forward pass costs, per model and device: the one home of that knowledge.

A pass is described by `PassFeatures` (its prompt tokens and rows, its decode rows, the context its decode
rows read, and the query-key pairs of its prompt rows' attention); its time is a linear function of them,
`CostFit`, fitted by non-negative weighted least squares from timed passes (a short calibration at start-up,
`qllm_core.calibration`, or a JSON file a benchmark wrote). `CostModel` is what the engine holds: it answers
what a plan will cost, takes the engine's own pass timings (`observe`) and keeps a running error against
them (`error`). Plain Python: policies use it on hand-built views, without torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qllm_core.errors import ConfigError

Row = tuple[int, int]
"""One request's part of a pass: (tokens already in its KV, new tokens it feeds)."""


@dataclass(frozen=True)
class PassFeatures:
    """What a pass's time depends on. A row feeding one token is a decode row (whatever its request's state)."""

    prompt_tokens: int = 0
    """New tokens fed by rows of more than one token."""
    prompt_rows: int = 0
    """Rows of more than one token: each pays per-row overheads (its own attention call, its KV writes)."""
    decode_rows: int = 0
    """Rows of one token."""
    context_tokens: int = 0
    """Tokens already cached that the decode rows attend to (a decode's KV read)."""
    attention_pairs: int = 0
    """Query-key pairs of the prompt rows' attention: a row of n tokens after s cached ones has n*s + n(n+1)/2."""

    @classmethod
    def of_rows(cls, rows: Iterable[Row]) -> PassFeatures:
        """The features of a pass over these (cached, new) rows."""
        total = cls()
        for start, tokens in rows:
            total = total + cls.of_row(start, tokens)
        return total

    @classmethod
    def of_row(cls, start: int, tokens: int) -> PassFeatures:
        """The features of one row: `tokens` new tokens after `start` cached ones."""
        if start < 0 or tokens < 1:
            raise ValueError(f"a row feeds at least one token after zero or more cached ones, got ({start}, {tokens})")
        if tokens == 1:
            return cls(decode_rows=1, context_tokens=start)
        return cls(prompt_tokens=tokens, prompt_rows=1, attention_pairs=tokens * start + tokens * (tokens + 1) // 2)

    def __add__(self, other: PassFeatures) -> PassFeatures:
        return PassFeatures(*(a + b for a, b in zip(self.values(), other.values(), strict=True)))

    def values(self) -> tuple[int, ...]:
        """The features in `FEATURES` order (spelled out: `dataclasses.astuple` deep-copies, and policies
        call this on every plan they weigh)."""
        return (self.prompt_tokens, self.prompt_rows, self.decode_rows, self.context_tokens, self.attention_pairs)


FEATURES = tuple(f.name for f in dataclasses.fields(PassFeatures))
"""Feature names, in the order of `PassFeatures.values` and of `CostFit.coefficients`."""


@dataclass(frozen=True)
class CostFit:
    """Seconds a pass takes on one model and device: `intercept_s` plus a cost per unit of each feature.

    Its JSON form (`to_json`, `save`) has exactly these fields, so a file and the code cannot drift apart.
    """

    model: str
    device: str
    intercept_s: float
    prompt_token_s: float
    prompt_row_s: float
    decode_row_s: float
    context_token_s: float
    attention_pair_s: float
    samples: int = 0
    """Timed passes it was fitted on (0: not fitted, e.g. the nominal model)."""
    fit_error: float = 0.0
    """Root mean square relative error on those passes."""

    def __post_init__(self) -> None:
        for name in ("intercept_s", *self._coefficient_names()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"CostFit.{name}={value!r} must be a finite number >= 0")

    @staticmethod
    def _coefficient_names() -> tuple[str, ...]:
        return ("prompt_token_s", "prompt_row_s", "decode_row_s", "context_token_s", "attention_pair_s")

    @property
    def coefficients(self) -> tuple[float, ...]:
        """Seconds per unit of each feature, in `FEATURES` order."""
        return tuple(getattr(self, n) for n in self._coefficient_names())

    def seconds(self, features: PassFeatures) -> float:
        """The predicted time of a pass with these features."""
        return self.intercept_s + sum(c * v for c, v in zip(self.coefficients, features.values(), strict=True))

    @classmethod
    def nominal(cls) -> CostFit:
        """A stand-in when no cost model is measured (`cost_model: off`): 50 ms a pass and 1 ms a token or decode
        row, the order of the CPU bench preset; it ranks plans as token counts do, its seconds are no measure."""
        return cls("any", "nominal", 0.05, 1e-3, 0.0, 1e-3, 0.0, 0.0)

    def to_json(self) -> str:
        """Its JSON form."""
        return json.dumps(dataclasses.asdict(self), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> CostFit:
        """Read its JSON form back; an unknown or missing field is a ValueError naming it."""
        row = json.loads(text)
        if not isinstance(row, Mapping):
            raise ValueError("a cost model file holds one JSON object")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(row) - set(names))
        if unknown:
            raise ValueError(f"unknown cost model field(s) {unknown}; known: {names}")
        try:
            return cls(**row)
        except TypeError as exc:
            raise ValueError(f"cost model file: {exc}") from None

    def save(self, path: str | Path) -> Path:
        """Write it to `path` (creating the directory); returns the path."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self.to_json(), encoding="utf-8")
        return target


def load_fit(path: str | Path, model: str, device: str) -> CostFit:
    """A cost model file, checked to be for this model and device; ConfigError says what to do otherwise."""
    try:
        fit = CostFit.from_json(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(
            f"cost_model_file={str(path)!r} cannot be read ({exc.strerror}); write it with "
            "`python -m qllm_core.calibration` or set cost_model: calibrate"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"cost_model_file={str(path)!r} is not a cost model file: {exc}") from None
    if (fit.model, fit.device) != (model, device):
        raise ConfigError(
            f"cost_model_file={str(path)!r} was fitted for model {fit.model!r} on {fit.device!r}, this engine runs "
            f"{model!r} on {device!r}: calibrate for it (cost_model: calibrate) or name a file fitted for it"
        )
    return fit


def fit(samples: Sequence[tuple[PassFeatures, float]], model: str, device: str) -> CostFit:
    """Fit a `CostFit` to timed passes: least squares on relative error (a 20 ms pass counts as much as a 2 s
    one), with every coefficient kept >= 0 (a feature the data cannot price gets 0, never a negative cost)."""
    if not samples:
        raise ValueError("fitting a cost model needs at least one timed pass")
    if any(not (math.isfinite(t) and t > 0) for _, t in samples):
        raise ValueError("every timed pass must take a positive, finite number of seconds")
    rows = [(1.0, *map(float, f.values())) for f, _ in samples]
    active = list(range(1 + len(FEATURES)))
    while True:
        beta = _weighted_least_squares(rows, [t for _, t in samples], active)
        negative = [j for j in active if beta[j] < 0]
        if not negative:
            break
        active.remove(min(negative, key=lambda j: beta[j]))  # the most negative leaves; refit the rest
    named = dict(zip(CostFit._coefficient_names(), beta[1:], strict=True))
    result = CostFit(model, device, intercept_s=beta[0], samples=len(samples), **named)
    errors = [(result.seconds(f) - t) / t for f, t in samples]
    return dataclasses.replace(result, fit_error=math.sqrt(sum(e * e for e in errors) / len(errors)))


def _weighted_least_squares(rows: list[tuple[float, ...]], times: list[float], active: list[int]) -> list[float]:
    """Minimise sum(((x.beta - t) / t)^2) over the `active` columns (the others are 0): normal equations on
    columns scaled to unit size, solved by Gaussian elimination, with a tiny ridge for columns the data
    cannot tell apart."""
    scaled = [[row[j] / t for j in active] for row, t in zip(rows, times, strict=True)]
    norms = [math.sqrt(sum(r[k] ** 2 for r in scaled)) or 1.0 for k in range(len(active))]
    scaled = [[v / n for v, n in zip(r, norms, strict=True)] for r in scaled]
    size = len(active)
    gram = [[sum(r[a] * r[b] for r in scaled) + (1e-10 if a == b else 0.0) for b in range(size)] for a in range(size)]
    rhs = [sum(r[a] for r in scaled) for a in range(size)]  # each target is t / t = 1
    solved = _solve(gram, rhs)
    beta = [0.0] * len(rows[0])
    for k, j in enumerate(active):
        beta[j] = solved[k] / norms[k]
    return beta


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """Solve a small dense system by Gaussian elimination with partial pivoting."""
    n = len(rhs)
    a = [[*row, b] for row, b in zip(matrix, rhs, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            factor = a[r][col] / a[col][col]
            for c in range(col, n + 1):
                a[r][c] -= factor * a[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (a[r][n] - sum(a[r][c] * x[c] for c in range(r + 1, n))) / a[r][r]
    return x


@dataclass(frozen=True)
class CostError:
    """How the predictions compare with the engine's own pass timings (relative to the time observed)."""

    observations: int
    """Timings observed in all."""
    window: int
    """The most recent ones the figures below cover."""
    bias: float
    """Mean of (predicted - observed) / observed: > 0 when the model overestimates."""
    mean_abs: float
    """Mean of |predicted - observed| / observed."""
    p90_abs: float
    """90th percentile of |predicted - observed| / observed."""

    def describe(self) -> str:
        """One line for logs and benchmark reports."""
        return (
            f"cost model error over the last {self.window} of {self.observations} passes: "
            f"mean |error| {self.mean_abs:.1%}, p90 {self.p90_abs:.1%}, bias {self.bias:+.1%}"
        )


class CostModel:
    """The engine's cost model: a `CostFit` to ask what a pass will cost, and its error on observed passes."""

    def __init__(self, fitted: CostFit, window: int = 512) -> None:
        """`window`: how many recent observations the running error covers."""
        self.fit = fitted
        self._errors: deque[float] = deque(maxlen=window)
        self._observations = 0

    @classmethod
    def nominal(cls) -> CostModel:
        """A model over `CostFit.nominal` (policies' stand-in when none is measured)."""
        return cls(CostFit.nominal())

    @property
    def measured(self) -> bool:
        """True when its fit came from timed passes (its seconds mean something)."""
        return self.fit.samples > 0

    def seconds(self, features: PassFeatures) -> float:
        """The predicted time of a pass with these features."""
        return self.fit.seconds(features)

    def rows_seconds(self, rows: Iterable[Row]) -> float:
        """The predicted time of a pass over these (cached, new) rows."""
        return self.fit.seconds(PassFeatures.of_rows(rows))

    def largest_chunk(self, base: PassFeatures, start: int, limit: int, budget_s: float) -> int:
        """The most new tokens (at most `limit`) a row after `start` cached tokens may add to a pass with `base`
        features while the pass stays within `budget_s`; 0 when not even one fits."""

        def fits(tokens: int) -> bool:
            return self.seconds(base + PassFeatures.of_row(start, tokens)) <= budget_s

        # One token is a decode-shaped row, priced apart (it may cost more than two prompt tokens); from two
        # tokens on the cost grows with the tokens.
        if limit < 2 or not fits(2):
            return 1 if limit >= 1 and fits(1) else 0
        low, high = 2, limit  # low always fits
        while low < high:
            mid = (low + high + 1) // 2
            if fits(mid):
                low = mid
            else:
                high = mid - 1
        return low

    def observe(self, features: PassFeatures, seconds: float) -> None:
        """Record a pass the engine ran and timed (its whole run time, suspensions left out)."""
        if not (math.isfinite(seconds) and seconds > 0):
            return  # a pass timed at 0 (a clock too coarse) says nothing about relative error
        self._observations += 1
        self._errors.append((self.seconds(features) - seconds) / seconds)

    def error(self) -> CostError | None:
        """The running error against observed passes; None before the first observation."""
        if not self._errors:
            return None
        errors = list(self._errors)
        magnitudes = sorted(abs(e) for e in errors)
        p90 = magnitudes[min(len(magnitudes) - 1, math.ceil(0.9 * len(magnitudes)) - 1)]
        return CostError(
            observations=self._observations,
            window=len(errors),
            bias=sum(errors) / len(errors),
            mean_abs=sum(magnitudes) / len(magnitudes),
            p90_abs=p90,
        )
