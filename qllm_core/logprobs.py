"""`TokenLogprob`: one position's token and its log-probability, with the most likely alternatives."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLogprob:
    """One position's token, its log-probability under the model (before temperature and penalties), and
    the most likely alternatives there, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token id, log-probability) pairs; as many as the request asked for."""
