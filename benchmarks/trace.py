"""Trace replay: a JSONL file of requests replayed exactly (`load_trace`), and written back (`write_trace`)."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks.checks import positive
from benchmarks.workload import RequestSpec, Workload, WorkloadError, short_priority


class TraceError(WorkloadError):
    """A trace file cannot be replayed; the message names the file, the line and the field."""


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
    try:
        priority = short_priority(row["priority"])
    except WorkloadError:
        raise TraceError(f"{where}: priority must be 'ls' or 'be', got {row['priority']!r}") from None
    has_prompt, has_len = "prompt" in row, "prompt_len" in row
    if has_prompt == has_len:
        raise TraceError(f"{where}: give exactly one of 'prompt' (text or token ids) or 'prompt_len'")
    ids: tuple[int, ...] | None = None
    text: str | None = None
    if has_len:
        n = row["prompt_len"]
        positive(f"{where}: prompt_len", n, TraceError, integer=True)
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
