"""PNG figures of a sweep: one line per target against the arrival rate (the median over seeds, the lowest
and highest seed as a band), and the CDF of LS slowdowns, one curve per target in a panel per rate.

Uses matplotlib's object API (`Figure` with the Agg canvas) rather than pyplot, so no global figure
state or GUI backend is involved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

from benchmarks.aggregate import Point, Spread, points
from benchmarks.results import RunResult, SweepResult

LS_TTFT_PNG = "ls_ttft.png"
THROUGHPUT_PNG = "throughput.png"
TURNAROUND_PNG = "turnaround.png"
SLOWDOWN_CDF_PNG = "ls_slowdown_cdf.png"

_Metric = Callable[[Point], Spread | None]


def _series(all_points: Sequence[Point]) -> dict[str, list[Point]]:
    by_label: dict[str, list[Point]] = {}
    for p in all_points:
        by_label.setdefault(p.label, []).append(p)
    return by_label


def _plot(
    ax: Axes,
    all_points: Sequence[Point],
    metric: _Metric,
    ylabel: str,
    title: str,
    scale: float = 1.0,
    dashed: bool = False,
) -> None:
    """One line per target (medians over seeds) with a band from the lowest to the highest seed."""
    for label, mine in _series(all_points).items():
        rows = [(p.rate, s) for p in mine if (s := metric(p)) is not None]
        if not rows:
            continue
        xs = [x for x, _ in rows]
        (line,) = ax.plot(
            xs, [s.median * scale for _, s in rows], marker="o", linestyle="--" if dashed else "-", label=label
        )
        if any(s.seeds > 1 for _, s in rows):
            lows, highs = [s.low * scale for _, s in rows], [s.high * scale for _, s in rows]
            ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("arrival rate (requests/s)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _log_axis(ax: Axes, axis: str) -> None:
    target = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")  # policies can differ by orders of magnitude
    # Plain numbers at 1-2-5 steps read better than 6x10^1.
    target.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(FormatStrFormatter("%g"))
    target.set_minor_formatter(NullFormatter())


def ls_ttft_figure(result: SweepResult) -> Figure:
    """LS TTFT (p50 and p99) against rate, with the SLO as a horizontal line."""
    all_points = points(result.runs)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    _plot(ax, all_points, lambda p: p.ls_ttft_p50_s, "LS TTFT (ms)", "", 1000)
    ax.set_prop_cycle(None)  # p99 lines reuse each target's colour
    _plot(ax, all_points, lambda p: p.ls_ttft_p99_s, "LS TTFT (ms)", "", 1000, dashed=True)
    ax.axhline(result.slo_s * 1000, color="red", linestyle=":", label=f"SLO {result.slo_s * 1000:.0f} ms")
    ax.set_title(f"LS time to first token (solid: p50, dashed: p99) - {result.model}")
    _log_axis(ax, "y")
    # p50 and p99 lines share a label; list each target once.
    handles, labels = ax.get_legend_handles_labels()
    unique: dict[str, Artist] = {}
    for handle, label in zip(handles, labels, strict=True):
        unique.setdefault(label, handle)
    ax.legend(list(unique.values()), list(unique.keys()), fontsize="small")
    return fig


_Panel = tuple[_Metric, str, str]
"""One panel of a two-panel figure: the metric of a point, the y label, the title."""


def _pair_figure(result: SweepResult, left_panel: _Panel, right_panel: _Panel) -> Figure:
    all_points = points(result.runs)
    fig = Figure(figsize=(11, 4.5))
    left, right = fig.subplots(1, 2)
    _plot(left, all_points, *left_panel)
    _plot(right, all_points, *right_panel)
    left.legend(fontsize="small")
    return fig


def throughput_figure(result: SweepResult) -> Figure:
    """Completed requests/s and output tokens/s against rate."""
    return _pair_figure(
        result,
        (lambda p: p.requests_per_s, "completed requests/s", "Request throughput"),
        (lambda p: p.output_tokens_per_s, "output tokens/s", "Token throughput"),
    )


def turnaround_figure(result: SweepResult) -> Figure:
    """Mean LS and BE turnaround (send to last token) against rate."""
    return _pair_figure(
        result,
        (lambda p: p.ls_turnaround_mean_s, "seconds", "LS turnaround (mean)"),
        (lambda p: p.be_turnaround_mean_s, "seconds", "BE turnaround (mean)"),
    )


def _ls_slowdowns(runs: Sequence[RunResult]) -> list[float]:
    return sorted(s for run in runs for r in run.requests if r.priority == "ls" and (s := r.slowdown) is not None)


def slowdown_cdf_figure(result: SweepResult) -> Figure:
    """The CDF of LS slowdowns, every seed's pooled: a panel per rate, a curve per target."""
    rates = sorted({run.rate for run in result.runs})
    cols = min(3, len(rates))
    rows = math.ceil(len(rates) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    labels = list(dict.fromkeys(run.label for run in result.runs))
    for ax, rate in zip(axes, rates, strict=False):
        fraction = next((r.rate_of_capacity for r in result.runs if r.rate == rate), None)
        for label in labels:
            values = _ls_slowdowns([r for r in result.runs if r.rate == rate and r.label == label])
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, ys, where="post", label=f"{label} (n={len(values)})")
        ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
        _log_axis(ax, "x")
        ax.set_ylim(0, 1.0)
        ax.set_xlabel("LS slowdown (TTFT / isolated TTFT)")
        ax.set_ylabel("fraction of LS requests")
        where = f"{rate:.3g} req/s" + ("" if fraction is None else f" ({fraction:g}x capacity)")
        ax.set_title(where)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small", loc="lower right")
    for ax in axes[len(rates) :]:
        ax.set_visible(False)
    fig.suptitle(f"LS slowdown CDF - {result.model}")
    return fig


def write_plots(result: SweepResult, out_dir: Path) -> list[Path]:
    """Write the figures as PNGs (the slowdown CDF only when slowdowns were measured); returns their paths."""
    paths = [
        _save(ls_ttft_figure(result), out_dir / LS_TTFT_PNG),
        _save(throughput_figure(result), out_dir / THROUGHPUT_PNG),
        _save(turnaround_figure(result), out_dir / TURNAROUND_PNG),
    ]
    if _ls_slowdowns(result.runs):
        paths.append(_save(slowdown_cdf_figure(result), out_dir / SLOWDOWN_CDF_PNG))
    return paths
