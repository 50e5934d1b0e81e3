"""Sweep outputs: the JSON results file, a Markdown report and (via `plots`) the PNG figures.

results.json holds `{"meta": ..., "summary": {"points": [...], "goodput": [...]}, "records": [...]}`:

- `meta`: model, target, SLO, machine, settings, `capacity` (the saturation rate and how it was found, or
  null), `dataset` (what was read from the dataset file and kept, or null).
- `summary.points`: one per (target, rate) over the seeds (`benchmarks.aggregate.Point`: each metric's
  median, low, high and missing seeds; the LS breakdown pooled); `summary.goodput`: each target's LS goodput.
- `records`: one per (target, rate, seed): `metrics` (per class: TTFT, slowdown, TPOT and turnaround
  distributions, SLO attainment, and `breakdown`, the distributions of the engine's timeline parts), the
  `calibration` (isolated TTFT by prompt length before and after, and the drift), and `requests`, one per
  request with its `ttft_s`, `isolated_ttft_s`, `slowdown`, `client_lag_s` and engine `timeline`.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import json_form
from benchmarks.aggregate import Point, Spread, goodputs, points
from benchmarks.azure import ATTRIBUTION as AZURE_ATTRIBUTION
from benchmarks.json_form import jsonable
from benchmarks.metrics import Distribution, min_samples
from benchmarks.plots import write_plots
from benchmarks.results import SweepResult
from benchmarks.sweep_settings import EngineHost

JSON_NAME = "results.json"
MARKDOWN_NAME = "results.md"


def write_json(result: SweepResult, path: Path) -> Path:
    """Write results.json (see the module docstring); strict JSON (no NaN or Infinity)."""
    all_points = points(result.runs)
    data = {
        "meta": result.meta(),
        "summary": {
            "points": jsonable(all_points),
            "goodput": jsonable(goodputs(all_points)),
        },
        "records": [r.to_dict() for r in result.runs],
    }
    return json_form.write_json(path, data)


def spread_cell(
    s: Spread | None, scale: float = 1.0, digits: int = 2, samples: int | None = None, unit: str = ""
) -> str:
    """The median over seeds with the lowest and highest seed, "1.2 (1.1..1.4)", or the median alone for one
    seed; "-" when missing, with the fewest samples of a seed when too few samples were the reason."""
    if s is None:
        return "-" if samples is None else f"- (n={samples})"

    def num(x: float) -> str:
        return f"{x * scale:.{digits}f}{unit}"

    text = num(s.median) + (f" ({num(s.low)}..{num(s.high)})" if s.seeds > 1 else "")
    if s.missing:
        text += f" [{s.missing} seed(s) missing]"
    return text


def _pct(s: Spread | None) -> str:
    return spread_cell(s, 100.0, 0, unit="%")


def _rate(p: Point) -> str:
    return f"{p.rate:.3g}" if p.rate_of_capacity is None else f"{p.rate:.3g} ({p.rate_of_capacity:g}x)"


def _few(p: Point, q: float) -> int | None:
    """The fewest LS samples of a seed, when that is why a percentile q is missing."""
    fewest = int(p.ls_ttft_samples.low)
    return fewest if fewest < min_samples(q) else None


def _mean_p90(d: Distribution, scale: float, digits: int) -> str:
    p90 = "-" if d.p90 is None else f"{d.p90 * scale:.{digits}f}"
    return f"{d.mean * scale:.{digits}f} / {p90}"


def _lengths_lines(result: SweepResult) -> list[str]:
    """Where the requests' lengths came from."""
    s = result.settings
    w = s.workload
    if result.dataset is not None:
        d = result.dataset
        cut = "the file ends in the middle of the next record" if d.truncated else "the whole file"
        cap = s.dataset.max_tokens_cap if s.dataset is not None else None
        return [
            f"- Lengths: ShareGPT `{d.path}`: {d.records_read} whole records read ({cut}); "
            f"{d.without_pair} without a human turn answered by gpt, {d.too_short} under 4 tokens, "
            f"{d.prompt_too_long} prompts over 1024, {d.total_too_long} over 2048 with the reply (vLLM's filters); "
            f"{d.pairs_kept} pairs kept, mean prompt {d.mean_prompt_len:.1f} and reply {d.mean_reply_len:.1f} tokens, "
            f"counted with {d.token_counting}",
            "- Replies: each request asks for its pair's reply length (EOS ignored)"
            + ("" if cap is None else f", capped at {cap} tokens"),
        ]
    if s.trace is not None:
        return [f"- Lengths: trace `{s.trace}`"]
    if s.dataset is not None and s.dataset.replayed:
        replies = "" if s.dataset.max_tokens_cap is None else f", replies at {s.dataset.max_tokens_cap} tokens"
        return [f"- Lengths: {s.dataset.name}, {AZURE_ATTRIBUTION}; capped to the model's context{replies}"]
    return [
        f"- Lengths: lognormal prompts (mean {w.prompt_len.mean:g}, cap {w.prompt_len.cap}) and replies "
        f"(mean {w.max_tokens.mean:g}, cap {w.max_tokens.cap}) tokens"
    ]


def _header(result: SweepResult) -> list[str]:
    s, m = result.settings, result.machine
    decode_ms = result.decode_iteration_s * 1000
    if result.slo_source == "measured":
        slo = f"{result.slo_s * 1000:.1f} ms (measured: {s.slo_factor:g} x one decode iteration of {decode_ms:.2f} ms)"
    else:
        slo = f"{result.slo_s * 1000:.1f} ms (given; one decode iteration took {decode_ms:.2f} ms)"
    if s.endpoint is not None:
        host = f"HTTP endpoint {result.target}"
    elif s.engine_host is EngineHost.CHILD:
        host = "in-process engines, each in a child process (outputs over a pipe)"
    else:
        host = "in-process engines, each on a thread in the client's process (one interpreter, one GIL)"
    w = s.workload
    lines = [
        f"# qllm benchmark: model `{result.model}` on {result.target}",
        "",
        f"- Started {result.started_at}; wall time {result.wall_s:.1f} s",
        f"- LS TTFT SLO: {slo}",
        f"- Goodput SLO: TTFT as above and TPOT <= {result.tpot_slo_s * 1000:.1f} ms "
        f"({'given' if s.tpot_slo_s is not None else f'{s.tpot_slo_factor:g} x one decode iteration'})",
        f"- Machine: {m.platform}, {m.cpu_count} CPUs ({m.cpus_usable} usable), torch {m.torch}, "
        f"GPU {m.cuda or 'none'}",
        f"- Targets: {host}",
    ]
    lines += _lengths_lines(result)
    seeds = ",".join(str(x) for x in s.seeds)
    replayed = s.trace is not None or (s.dataset is not None and s.dataset.replayed)
    lines.append(
        f"- Arrivals: {'the trace' if replayed else 'Poisson'}, LS share {w.ls_share:g}, seeds {seeds}; {_size(result)}"
    )
    if result.capacity is not None:
        c = result.capacity
        how = (
            "given"
            if c.window_s is None
            else f"probed on {c.target}: {c.method}; {c.requests} requests, {c.completed_in_window} completions "
            f"in {c.window_s:.1f} s"
        )
        lines.append(f"- Capacity: {c.rate_rps:.3f} req/s ({how}); rates are fractions of it (0.3x, ...)")
    first = next((r.calibration for r in result.runs if r.calibration is not None), None)
    if first is not None:
        grid = ", ".join(str(n) for n in first.before.prompt_lens)
        lines.append(
            "- Isolated TTFT: on the idle target right before and right after every run, at "
            f"{len(first.before.prompt_lens)} prompt lengths ({grid} tokens), each probed alone "
            f"{first.before.trials} times, the minimum kept; "
            "piecewise-linear interpolation between them. Slowdown = TTFT / isolated TTFT at the request's prompt "
            "length (the calibration before the run); drift = after / before."
        )
    else:
        lines.append("- Isolated TTFT: not measured (no prompt lengths known); no slowdowns")
    lines.append(
        "- Percentiles: p99 only from at least 100 samples, p90 from 10, else `-` with the fewest samples of a seed; "
        "cells are the median over seeds (lowest..highest seed)"
    )
    return lines


def _size(result: SweepResult) -> str:
    w = result.settings.workload
    if result.settings.trace is not None:
        return "the trace's requests"
    if w.ls_requests is not None:
        return f"each run until {w.ls_requests} LS requests arrived"
    if w.duration_s is not None:
        return f"each run {w.duration_s:g} s of arrivals"
    return f"{w.request_limit} requests a run"


def _main_table(all_points: tuple[Point, ...]) -> list[str]:
    lines = [
        "| Policy | Rate (req/s) | LS n | LS slowdown p50 | LS slowdown p99 | LS TTFT p99 (ms) | LS SLO met "
        "| LS TPOT p99 (ms) | Output tok/s | BE done | Unfinished |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in all_points:
        lines.append(
            f"| {p.label} | {_rate(p)} | {spread_cell(p.ls_requests, digits=0)} "
            f"| {spread_cell(p.ls_slowdown_p50)} | {spread_cell(p.ls_slowdown_p99, samples=_few(p, 99))} "
            f"| {spread_cell(p.ls_ttft_p99_s, 1000, 0, _few(p, 99))} | {_pct(p.ls_slo_attainment)} "
            f"| {spread_cell(p.ls_tpot_p99_s, 1000, 1, _few(p, 99))} | {spread_cell(p.output_tokens_per_s, digits=1)} "
            f"| {spread_cell(p.be_completed, digits=0)} | {spread_cell(p.unfinished, digits=0)} |"
        )
    return lines


def _p50_p99(d: Distribution | None, scale: float, digits: int) -> str:
    """A pooled distribution's "p50 / p99"; "-" when missing, the count when too few samples for the p99."""
    if d is None:
        return "- / -"
    p99 = f"- (n={d.count})" if d.p99 is None else f"{d.p99 * scale:.{digits}f}"
    return f"{d.p50 * scale:.{digits}f} / {p99}"


def _answer_table(all_points: tuple[Point, ...]) -> list[str]:
    lines = [
        "| Policy | Rate | LS slowdown p50 / p99 | LS TPOT p50 / p99 (ms) | LS inter-token p50 / p99 (ms) "
        "| LS turnaround p50 / p99 (s) | BE turnaround p50 / p99 (s) | Output tok/s | LS goodput (req/s) "
        "| Goodput (req/s) | Passes | Preemptions | Merges |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in all_points:
        d = p.pooled
        lines.append(
            f"| {p.label} | {_rate(p)} | {_p50_p99(d.ls_slowdown, 1, 2)} | {_p50_p99(d.ls_tpot, 1000, 0)} "
            f"| {_p50_p99(d.ls_inter_token, 1000, 0)} | {_p50_p99(d.ls_turnaround, 1, 2)} "
            f"| {_p50_p99(d.be_turnaround, 1, 2)} "
            f"| {spread_cell(p.output_tokens_per_s, digits=1)} | {spread_cell(p.ls_goodput_rps)} "
            f"| {spread_cell(p.goodput_rps)} | {spread_cell(p.passes, digits=0)} "
            f"| {spread_cell(p.preemptions, digits=0)} | {spread_cell(p.merges, digits=0)} |"
        )
    return lines


def _goodput_table(all_points: tuple[Point, ...]) -> list[str]:
    lines = ["| Policy | LS goodput (req/s) | highest rate tried |", "|---|---:|---:|"]
    for g in goodputs(all_points):
        if g.rate is None:
            cell = "none (the lowest rate misses)"
        else:
            cell = f"{g.rate:.3g}" + ("" if g.rate_of_capacity is None else f" ({g.rate_of_capacity:g}x)")
        lines.append(f"| {g.label} | {cell} | {g.highest_rate_tried:.3g} |")
    return lines


def _breakdown_table(all_points: tuple[Point, ...]) -> list[str]:
    lines = [
        "| Policy | Rate | LS n | TTFT (ms) | queued (ms) | own passes (ms) | foreign passes (ms) | other (ms) "
        "| prefill passes | shared tokens | shared requests |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in all_points:
        b = p.ls_breakdown
        if b is None:
            continue
        lines.append(
            f"| {p.label} | {_rate(p)} | {b.ttft_s.count} | {_mean_p90(b.ttft_s, 1000, 1)} "
            f"| {_mean_p90(b.queued_s, 1000, 1)} | {_mean_p90(b.own_pass_s, 1000, 1)} "
            f"| {_mean_p90(b.foreign_pass_s, 1000, 1)} | {_mean_p90(b.other_s, 1000, 1)} "
            f"| {_mean_p90(b.prefill_passes, 1, 2)} | {_mean_p90(b.shared_tokens, 1, 0)} "
            f"| {_mean_p90(b.shared_requests, 1, 1)} |"
        )
    return lines if len(lines) > 2 else []


def _measurement_table(all_points: tuple[Point, ...]) -> list[str]:
    lines = [
        "| Policy | Rate | isolated TTFT after / before | client lag p99 (ms) | send lag p99 (ms) "
        "| BE slowdown p50 | BE slowdown p99 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in all_points:
        lines.append(
            f"| {p.label} | {_rate(p)} | {spread_cell(p.drift_median, digits=3)} "
            f"| {spread_cell(p.client_lag_p99_s, 1000, 1)} | {spread_cell(p.send_lag_p99_s, 1000, 1)} "
            f"| {spread_cell(p.be_slowdown_p50)} | {spread_cell(p.be_slowdown_p99)} |"
        )
    return lines


def _ms(d: Distribution | None, q: str) -> str:
    """A distribution's "mean" or "p99" in ms, "-" when missing."""
    value = None if d is None else d.mean if q == "mean" else d.p99
    return "-" if value is None else f"{value * 1000:.1f}"


def _runs_table(result: SweepResult) -> list[str]:
    lines = [
        "| Policy | Rate (req/s) | Seed | Done | LS TTFT mean (ms) | LS TTFT p99 (ms) | LS SLO met | LS slowdown p50 "
        "| BE TTFT mean (ms) | LS turnaround (s) | BE turnaround (s) | Req/s | Output tok/s "
        "| Passes / preemptions / resumes / merges |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result.runs:
        mt = run.metrics
        ls, be = mt.ls, mt.be
        met = "-" if ls.slo_attainment is None else f"{ls.slo_attainment * 100:.0f}%"
        slow = "-" if ls.slowdown is None else f"{ls.slowdown.p50:.2f}"
        ls_turn = "-" if ls.turnaround is None else f"{ls.turnaround.mean:.3f}"
        be_turn = "-" if be.turnaround is None else f"{be.turnaround.mean:.3f}"
        e = mt.engine
        counts = "-" if e is None else f"{e.passes} / {e.preemptions} / {e.resumes} / {e.merges}"
        lines.append(
            f"| {run.label} | {run.rate:.3g} | {run.seed} | {mt.completed}/{mt.requests} "
            f"| {_ms(ls.ttft, 'mean')} | {_ms(ls.ttft, 'p99')} | {met} | {slow} "
            f"| {_ms(be.ttft, 'mean')} | {ls_turn} | {be_turn} | {mt.requests_per_s:.2f} "
            f"| {mt.output_tokens_per_s:.1f} | {counts} |"
        )
    return lines


_MAIN_NOTE = (
    "LS n = LS requests a run; SLO met = share of LS requests with TTFT <= SLO (failures miss); "
    "TPOT = time per output token after the first; Unfinished = failed or not done within the drain timeout."
)
_ANSWER_NOTE = (
    "Percentiles over the seeds' requests pooled (p99 from 100 samples or more); inter-token = every gap between "
    "two tokens of a completed request; goodput = requests a second with TTFT and TPOT both within the SLOs "
    "(median over seeds); passes, preemptions and merges: the engine's own counts over the run (median over "
    "seeds; `-` for an HTTP endpoint)."
)
_BREAKDOWN_NOTE = (
    "queued = arrival to the start of its first pass; own = passes carrying it; foreign = passes without "
    "it, between its arrival and its first token; other = the rest (planning, sampling, outputs, idle); "
    "shared = other requests' new tokens and requests in the passes carrying its prompt."
)
_CHECKS_NOTE = (
    "after / before = median over the grid of the isolated TTFT after the run over before it; client lag = "
    "TTFT the client saw minus TTFT the engine recorded (the cost of sharing a process with the client); "
    "send lag = actual minus scheduled send."
)


def _section(title: str, table: list[str], note: str | None = None) -> list[str]:
    """A titled table and its note; nothing for an empty table."""
    if not table:
        return []
    return ["", f"## {title}", "", *table, *(["", note] if note else [])]


def markdown_report(result: SweepResult) -> str:
    """The header (model, SLO, machine, workload, capacity, calibration), then the tables: per policy and
    rate over seeds, LS goodput, where LS TTFT went, measurement checks, and one row per run."""
    all_points = points(result.runs)
    lines = _header(result)
    lines += _section("LS latency and throughput per policy and rate", _main_table(all_points), _MAIN_NOTE)
    lines += _section("The whole answer (every seed's requests pooled)", _answer_table(all_points), _ANSWER_NOTE)
    lines += _section(
        "LS goodput (LS SLO met >= 99% in every seed, at that rate and below)", _goodput_table(all_points)
    )
    lines += _section(
        "Where LS time to first token went (the engine's timeline; mean / p90 over every seed's LS requests)",
        _breakdown_table(all_points),
        _BREAKDOWN_NOTE,
    )
    lines += _section("Measurement checks", _measurement_table(all_points), _CHECKS_NOTE)
    lines += _section("Runs", _runs_table(result))
    failed = [r for r in result.runs if r.metrics.failed]
    if failed:
        lines += ["", "Failed or unfinished requests:"]
        lines += [
            f"- {r.label} @ {r.rate:.3g} req/s, seed {r.seed}: {r.metrics.failed} ({'; '.join(r.metrics.errors)})"
            for r in failed
        ]
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
