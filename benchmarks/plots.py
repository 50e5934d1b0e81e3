"""PNG figures of a sweep, one line per target against the arrival rate.

Uses matplotlib's object API (`Figure` with the Agg canvas) rather than pyplot, so no global figure
state or GUI backend is involved.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

from benchmarks.metrics import RunMetrics
from benchmarks.sweep import RunResult, SweepResult

LS_TTFT_PNG = "ls_ttft.png"
THROUGHPUT_PNG = "throughput.png"
TURNAROUND_PNG = "turnaround.png"

_Metric = Callable[[RunMetrics], float | None]


def _series(result: SweepResult) -> dict[str, list[RunResult]]:
    by_label: dict[str, list[RunResult]] = {}
    for run in result.runs:
        by_label.setdefault(run.label, []).append(run)
    return {label: sorted(runs, key=lambda r: r.rate) for label, runs in by_label.items()}


def _plot(ax: Axes, result: SweepResult, metric: _Metric, ylabel: str, title: str, linestyle: str = "-") -> bool:
    """Draw one line per target; True when anything was drawn."""
    drawn = False
    for label, runs in _series(result).items():
        points = [(r.rate, y) for r in runs if (y := metric(r.metrics)) is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", linestyle=linestyle, label=label)
            drawn = True
    ax.set_xlabel("arrival rate (requests/s)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return drawn


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def ls_ttft_figure(result: SweepResult) -> Figure:
    """LS TTFT (mean and p99) against rate, with the SLO as a horizontal line."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    _plot(ax, result, lambda m: None if m.ls.ttft is None else m.ls.ttft.mean * 1000, "LS TTFT (ms)", "")
    ax.set_prop_cycle(None)  # p99 lines reuse each target's colour
    _plot(ax, result, lambda m: None if m.ls.ttft is None else m.ls.ttft.p99 * 1000, "LS TTFT (ms)", "", "--")
    ax.axhline(result.slo_s * 1000, color="red", linestyle=":", label=f"SLO {result.slo_s * 1000:.0f} ms")
    ax.set_title(f"LS time to first token (solid: mean, dashed: p99) - {result.model}")
    ax.set_yscale("log")  # policies can differ by orders of magnitude
    # Plain numbers at 1-2-5 steps read better than 6x10^1.
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    # Mean and p99 lines share a label; list each target once.
    handles, labels = ax.get_legend_handles_labels()
    unique: dict[str, Artist] = {}
    for handle, label in zip(handles, labels, strict=True):
        unique.setdefault(label, handle)
    ax.legend(list(unique.values()), list(unique.keys()), fontsize="small")
    return fig


def throughput_figure(result: SweepResult) -> Figure:
    """Completed requests/s and output tokens/s against rate."""
    fig = Figure(figsize=(11, 4.5))
    left, right = fig.subplots(1, 2)
    _plot(left, result, lambda m: m.requests_per_s, "completed requests/s", "Request throughput")
    _plot(right, result, lambda m: m.output_tokens_per_s, "output tokens/s", "Token throughput")
    left.legend(fontsize="small")
    return fig


def turnaround_figure(result: SweepResult) -> Figure:
    """Mean LS and BE turnaround (send to last token) against rate."""
    fig = Figure(figsize=(11, 4.5))
    left, right = fig.subplots(1, 2)
    _plot(left, result, lambda m: None if m.ls.turnaround is None else m.ls.turnaround.mean, "seconds", "LS turnaround")
    _plot(
        right, result, lambda m: None if m.be.turnaround is None else m.be.turnaround.mean, "seconds", "BE turnaround"
    )
    left.legend(fontsize="small")
    return fig


def write_plots(result: SweepResult, out_dir: Path) -> list[Path]:
    """Write the three figures as PNGs; returns their paths."""
    return [
        _save(ls_ttft_figure(result), out_dir / LS_TTFT_PNG),
        _save(throughput_figure(result), out_dir / THROUGHPUT_PNG),
        _save(turnaround_figure(result), out_dir / TURNAROUND_PNG),
    ]
