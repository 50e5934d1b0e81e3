"""The Azure LLM inference trace 2023 replayed as workloads: `qllm-bench --dataset azure-conv|azure-code|azure-mix`.

The data (`../shared/data/azure-llm-2023/`, or --dataset-path): two CSV files, `TIMESTAMP,ContextTokens,
GeneratedTokens`, one hour of requests to a production conversation service and to a coding service.
Licence CC-BY 4.0; attribution (`ATTRIBUTION`): Patel et al., "Splitwise: Efficient generative LLM
inference using phase splitting", ISCA 2024, data from Azure/AzurePublicDataset.

- `azure-conv`, `azure-code`: one service's requests; each is LS with probability `ls_share` (seeded).
- `azure-mix`: both services on one clock; conversation requests are LS, the bursty coding requests (long
  prompts, short replies) BE.

A workload is a window of consecutive requests (where it starts is drawn from the seed; how many follows
the workload settings, as `poisson_workload` counts them), arrival times relative to the window's first
request and kept in their real proportions; `Workload.scaled_to` then offers it at a target rate. Lengths
are capped to the model: a reply to `max_tokens_cap` and to the context less one prompt token, the prompt
to the context less its reply. No prompt text is published: prompts are random token ids of the length.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.sharegpt import DatasetError
from benchmarks.workload import Priority, RequestSpec, Workload, WorkloadSettings

AZURE_DATASETS = ("azure-conv", "azure-code", "azure-mix")
FILES = {"conv": "AzureLLMInferenceTrace_conv.csv", "code": "AzureLLMInferenceTrace_code.csv"}
COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "azure-llm-2023"
"""The project's copy, beside the checkout (`../shared/data/azure-llm-2023/`)."""
DEFAULT_CONTEXT = 4096
"""The context lengths are capped to when the model's own is unknown (an HTTP endpoint's model name)."""
ATTRIBUTION = (
    "Azure LLM inference trace 2023 (Azure/AzurePublicDataset, CC-BY 4.0), from Patel et al., "
    '"Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024'
)


@dataclass(frozen=True)
class AzureRow:
    """One request of the trace."""

    at: datetime.datetime
    context_tokens: int
    generated_tokens: int
    service: str
    """"conv" or "code"."""


def read_csv(path: Path, service: str) -> tuple[AzureRow, ...]:
    """Every row of one service's CSV, in file order; DatasetError naming the line of a malformed row."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or tuple(h.strip() for h in header) != COLUMNS:
                raise DatasetError(f"{path}: the header must be {','.join(COLUMNS)}, got {header}")
            return tuple(_row(path, n, fields, service) for n, fields in enumerate(reader, 2) if fields)
    except OSError as exc:
        raise DatasetError(f"cannot read the Azure trace {path}: {exc.strerror or exc}") from None


def _row(path: Path, lineno: int, fields: list[str], service: str) -> AzureRow:
    if len(fields) != len(COLUMNS):
        raise DatasetError(f"{path}:{lineno}: expected {len(COLUMNS)} fields, got {len(fields)}")
    try:
        at = datetime.datetime.fromisoformat(fields[0].strip())
        context, generated = int(fields[1]), int(fields[2])
    except ValueError as exc:
        raise DatasetError(f"{path}:{lineno}: {exc}") from None
    if context < 1 or generated < 1:
        raise DatasetError(f"{path}:{lineno}: token counts must be >= 1, got {context} and {generated}")
    return AzureRow(at, context, generated, service)


def load_rows(name: str, directory: Path | None = None) -> tuple[AzureRow, ...]:
    """The rows of `name` (one of `AZURE_DATASETS`), both services merged by time for the mix."""
    if name not in AZURE_DATASETS:
        raise DatasetError(f"unknown Azure dataset {name!r}; use one of {', '.join(AZURE_DATASETS)}")
    base = DEFAULT_DIR if directory is None else directory
    if not base.is_dir():
        raise DatasetError(f"{base} is no directory; give --dataset-path, the folder holding {FILES['conv']}")
    services = ("conv", "code") if name == "azure-mix" else (name.removeprefix("azure-"),)
    rows = [row for s in services for row in read_csv(base / FILES[s], s)]
    if len(rows) < 2:
        raise DatasetError(f"{name} in {base} has fewer than two requests: no arrival rate to scale")
    return tuple(sorted(rows, key=lambda r: r.at))  # stable: equal times keep file order


def capped_lengths(row: AzureRow, context_limit: int, max_tokens_cap: int | None) -> tuple[int, int]:
    """(prompt, reply) of a row within the model's context and the reply cap (see the module docstring)."""
    reply = min(row.generated_tokens, context_limit - 1)
    if max_tokens_cap is not None:
        reply = min(reply, max_tokens_cap)
    return max(1, min(row.context_tokens, context_limit - reply)), reply


def _priority(row: AzureRow, mix: bool, ls_share: float, rng: random.Random) -> Priority:
    if mix:
        return "ls" if row.service == "conv" else "be"
    return "ls" if rng.random() < ls_share else "be"


def _until_ls(priorities: Sequence[Priority], ls_requests: int | None) -> int:
    """How many of `priorities` a workload keeps: all, or up to the one that makes `ls_requests` LS."""
    if ls_requests is not None:
        ls = 0
        for n, priority in enumerate(priorities, 1):
            ls += priority == "ls"
            if ls >= ls_requests:
                return n
    return len(priorities)


def azure_workload(
    name: str,
    settings: WorkloadSettings,
    context_limit: int = DEFAULT_CONTEXT,
    max_tokens_cap: int | None = None,
    directory: Path | None = None,
) -> Workload:
    """A window of the trace as a workload at its own rate (see the module docstring)."""
    if context_limit < 2:
        raise DatasetError(f"context_limit must be at least 2 tokens, got {context_limit}")
    rows = load_rows(name, directory)
    rng = random.Random(settings.seed)
    mix = name == "azure-mix"
    # A window of the requested size at a seeded start; seed 0 and the rest alike.
    start = rng.randrange(max(1, len(rows) - settings.request_limit + 1))
    window = rows[start : start + settings.request_limit]
    priorities = [_priority(row, mix, settings.ls_share, rng) for row in window]
    window = window[: _until_ls(priorities, settings.ls_requests)]
    t0 = window[0].at
    requests: list[RequestSpec] = []
    for i, (row, priority) in enumerate(zip(window, priorities, strict=False)):
        prompt_len, reply = capped_lengths(row, context_limit, max_tokens_cap)
        ids = tuple(rng.randrange(settings.token_low, settings.token_high) for _ in range(prompt_len))
        requests.append(RequestSpec(i, (row.at - t0).total_seconds(), priority, reply, prompt_token_ids=ids))
    span = requests[-1].arrival_s
    if span <= 0:
        raise DatasetError(f"{name}: the {len(requests)} requests of the window all arrive at once; take more")
    source = f"{name} ({ATTRIBUTION}), requests {start}-{start + len(requests) - 1}"
    return Workload(tuple(requests), len(requests) / span, source)


def within(workload: Workload, duration_s: float | None) -> Workload:
    """The requests that arrive by `duration_s` (all of them for None)."""
    if duration_s is None:
        return workload
    kept = tuple(r for r in workload.requests if r.arrival_s <= duration_s)
    if not kept:
        raise DatasetError(f"no request of {workload.source} arrives within {duration_s} s; run longer or faster")
    return dataclasses.replace(workload, requests=kept)


def model_context(model: str) -> int:
    """The context length of a built-in preset or a checkpoint directory; `DEFAULT_CONTEXT` otherwise."""
    import json

    from qllm_core.models.builtin import PRESETS

    if model in PRESETS:
        return int(PRESETS[model].max_position_embeddings)
    config = Path(model).expanduser() / "config.json"
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError):
        return DEFAULT_CONTEXT
    return int(value) if isinstance(value, int) and value > 1 else DEFAULT_CONTEXT


def azure_workloads(
    name: str,
    directory: Path | None,
    model: str,
    max_tokens_cap: int | None,
    settings: WorkloadSettings,
    rates: Sequence[float] | None,
) -> list[Workload]:
    """One window of the trace offered at each rate (at its own rate for None), lengths capped to `model`'s
    context, arrivals after the settings' `duration_s` left out: what `qllm-bench --dataset azure-*` runs."""
    base = azure_workload(name, settings, model_context(model), max_tokens_cap, directory)
    scaled = [base] if rates is None else [base.scaled_to(rate) for rate in rates]
    return [within(w, settings.duration_s) for w in scaled]
