"""Sweep outputs: the JSON results file, a Markdown summary table and (via `plots`) the PNG figures."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.metrics import Distribution
from benchmarks.plots import write_plots
from benchmarks.sweep import SweepResult

JSON_NAME = "results.json"
MARKDOWN_NAME = "results.md"


def write_json(result: SweepResult, path: Path) -> Path:
    """Write `{"meta": ..., "records": [one per rate x target]}`; strict JSON (no NaN or Infinity)."""
    path.write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def _ms(d: Distribution | None, attr: str) -> str:
    return "-" if d is None else f"{getattr(d, attr) * 1000:.1f}"


def _s(d: Distribution | None) -> str:
    return "-" if d is None else f"{d.mean:.3f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.0f}%"


def markdown_report(result: SweepResult) -> str:
    """A short header (model, SLO, machine, workload) and one table row per rate x target."""
    m = result.machine
    if result.slo_source == "measured":
        slo = (
            f"{result.slo_s * 1000:.1f} ms (measured: {result.slo_s / result.decode_iteration_s:g} x one decode "
            f"iteration of {result.decode_iteration_s * 1000:.2f} ms)"
        )
    else:
        slo = (
            f"{result.slo_s * 1000:.1f} ms (given; one decode iteration took {result.decode_iteration_s * 1000:.2f} ms)"
        )
    wl = result.settings.get("workload", {})
    lines = [
        f"# qllm benchmark: model `{result.model}` on {result.target}",
        "",
        f"- Started {result.started_at}; wall time {result.wall_s:.1f} s",
        f"- LS TTFT SLO: {slo}",
        f"- Machine: {m.get('platform')}, {m.get('cpu_count')} CPUs ({m.get('cpus_usable')} usable), "
        f"torch {m.get('torch')}, GPU {m.get('cuda') or 'none'}",
        f"- Workload: {result.settings.get('trace') or 'Poisson arrivals'}, LS share {wl.get('ls_share')}, "
        f"seed {wl.get('seed')}",
        "",
        "| Policy | Rate (req/s) | Done | LS TTFT mean (ms) | LS TTFT p99 (ms) | LS SLO met | BE TTFT mean (ms) "
        "| LS turnaround (s) | BE turnaround (s) | Req/s | Output tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result.runs:
        mt = run.metrics
        lines.append(
            f"| {run.label} | {run.rate:g} | {mt.completed}/{mt.requests} | {_ms(mt.ls.ttft, 'mean')} "
            f"| {_ms(mt.ls.ttft, 'p99')} | {_pct(mt.ls.slo_attainment)} | {_ms(mt.be.ttft, 'mean')} "
            f"| {_s(mt.ls.turnaround)} | {_s(mt.be.turnaround)} | {mt.requests_per_s:.2f} "
            f"| {mt.output_tokens_per_s:.1f} |"
        )
    failed = [r for r in result.runs if r.metrics.failed]
    if failed:
        lines += ["", "Failed or unfinished requests:"]
        lines += [f"- {r.label} @ {r.rate:g} req/s: {r.metrics.failed} ({'; '.join(r.metrics.errors)})" for r in failed]
    lines += ["", "Turnaround columns are means; SLO met = share of LS requests with TTFT <= SLO (failures miss)."]
    return "\n".join(lines) + "\n"


def write_markdown(result: SweepResult, path: Path) -> Path:
    """Write `markdown_report` to a file."""
    path.write_text(markdown_report(result), encoding="utf-8")
    return path


def write_outputs(result: SweepResult, out_dir: Path) -> list[Path]:
    """Write results.json, results.md and the PNG plots into `out_dir` (created if needed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        write_json(result, out_dir / JSON_NAME),
        write_markdown(result, out_dir / MARKDOWN_NAME),
        *write_plots(result, out_dir),
    ]
