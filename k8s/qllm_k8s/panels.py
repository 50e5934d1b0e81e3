"""Dashboard panels as typed descriptions (what a panel shows) and their Grafana form, made with Grafana's
own typed builders (grafana-foundation-sdk) rather than JSON written by hand."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, Self, TypeVar

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import gauge, prometheus, stat, timeseries
from grafana_foundation_sdk.cog import variants
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

from qllm_core.metrics import MetricSpec
from qllm_k8s.promql import Expr, num

# Every query goes to the Prometheus picked in the dashboard's `datasource` variable: the dashboard works
# with whatever data source name or uid a Grafana has, instead of one pinned uid.
DATASOURCE_VARIABLE = "datasource"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${" + DATASOURCE_VARIABLE + "}")
GRID_WIDTH = 24  # Grafana's dashboard grid
TIMESERIES_HEIGHT, STAT_HEIGHT, STAT_WIDTH = 8, 4, 4


@dataclass(frozen=True)
class Query:
    """One query of a panel and the legend of its series."""

    expr: Expr
    legend: str = ""


@dataclass(frozen=True)
class Step:
    """A threshold step: from `start` (None: minus infinity) up, values show in `color`."""

    color: str
    start: float | None = None


@dataclass(frozen=True)
class Line:
    """A dashed threshold line at a setting's value (an SLO, a limit): red above it, or below it."""

    setting: str
    value: float
    bad_below: bool = False

    def steps(self) -> tuple[Step, ...]:
        """The threshold steps that colour the area beyond the line red."""
        if self.bad_below:
            return (Step("red"), Step("green", self.value))
        return (Step("green"), Step("red", self.value))


@dataclass(frozen=True)
class RightAxis:
    """One series of a panel drawn on its own axis, on the right, in its own unit."""

    series: str
    unit: str


@dataclass(frozen=True)
class TimeSeries:
    """A time series panel."""

    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str
    width: int = 12
    line: Line | None = None
    minimum: float | None = 0
    maximum: float | None = None
    right_axis: RightAxis | None = None


@dataclass(frozen=True)
class Stat:
    """A one-number panel (the latest value) coloured by `steps`; a 0..1 dial with `dial`."""

    title: str
    description: str
    query: Query
    unit: str
    steps: tuple[Step, ...]
    dial: bool = False
    decimals: int | None = None
    width: int = STAT_WIDTH

    @property
    def queries(self) -> tuple[Query, ...]:
        """The panel's one query, as a tuple like a time series panel's."""
        return (self.query,)


Panel = TimeSeries | Stat


@dataclass(frozen=True)
class Section:
    """Panels under one row header, laid out left to right, wrapping at the grid's width."""

    title: str
    panels: tuple[Panel, ...]

    def specs(self) -> set[MetricSpec]:
        """The metrics this section's queries read."""
        return {spec for panel in self.panels for query in panel.queries for spec in query.expr.specs}


class _PanelBuilder(Protocol):
    """What the SDK's stat, gauge and time series builders share that `_common` sets."""

    def id(self, id_val: int) -> Self: ...
    def title(self, title: str) -> Self: ...
    def datasource(self, datasource: model.DataSourceRef) -> Self: ...
    def height(self, h: int) -> Self: ...
    def span(self, w: int) -> Self: ...
    def unit(self, unit: str) -> Self: ...
    def with_target(self, target: Builder[variants.Dataquery]) -> Self: ...


B = TypeVar("B", bound=_PanelBuilder)


def _thresholds(steps: Sequence[Step]) -> dashboard_builders.ThresholdsConfig:
    return (
        dashboard_builders.ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps([model.Threshold(value=step.start, color=step.color) for step in steps])
    )


def _color(mode: model.FieldColorModeId) -> dashboard_builders.FieldColor:
    return dashboard_builders.FieldColor().mode(mode)


def _common(builder: B, panel: Panel, panel_id: int, height: int) -> B:
    """The settings every panel shares: identity, size, unit, and its queries on the datasource variable."""
    builder = (
        builder.id(panel_id).title(panel.title).datasource(DATASOURCE).height(height).span(panel.width).unit(panel.unit)
    )
    for i, query in enumerate(panel.queries):
        target = (
            prometheus.Dataquery()
            .ref_id(chr(ord("A") + i))
            .expr(str(query.expr))
            .legend_format(query.legend)
            .datasource(DATASOURCE)
        )
        builder = builder.with_target(target)
    return builder


def _timeseries(panel: TimeSeries, panel_id: int) -> timeseries.Panel:
    line = panel.line
    description = panel.description
    if line is not None:
        description += f" Dashed line: {line.setting} = {num(line.value)}."
    builder = (
        _common(timeseries.Panel(), panel, panel_id, TIMESERIES_HEIGHT)
        .description(description)
        # Series in palette colours, not in their threshold's colour.
        .color_scheme(_color(model.FieldColorModeId.PALETTE_CLASSIC))
        .thresholds(_thresholds(line.steps() if line else (Step("green"),)))
        .thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(
                common.GraphThresholdsStyleMode.DASHED if line else common.GraphThresholdsStyleMode.OFF
            )
        )
        .draw_style(common.GraphDrawStyle.LINE)
        .line_width(1)
        .fill_opacity(10)
        .show_points(common.VisibilityMode.NEVER)
        .span_nulls(False)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(
            common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING)
        )
    )
    if panel.minimum is not None:
        builder = builder.min(panel.minimum)
    if panel.maximum is not None:
        builder = builder.max(panel.maximum)
    if panel.right_axis is not None:
        off = common.GraphThresholdsStyleConfig(mode=common.GraphThresholdsStyleMode.OFF)
        builder = builder.override_by_name(
            panel.right_axis.series,
            [
                model.DynamicConfigValue(id_val="unit", value=panel.right_axis.unit),
                model.DynamicConfigValue(id_val="custom.axisPlacement", value=common.AxisPlacement.RIGHT),
                model.DynamicConfigValue(id_val="custom.thresholdsStyle", value=off),
            ],
        )
    return builder


def _reduce_to_last() -> common_builders.ReduceDataOptions:
    return common_builders.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False)


def _stat(panel: Stat, panel_id: int) -> stat.Panel | gauge.Panel:
    if panel.dial:
        dial = (
            _common(gauge.Panel(), panel, panel_id, STAT_HEIGHT)
            .min(0)
            .max(1)
            .reduce_options(_reduce_to_last())
            .show_threshold_labels(False)
            .show_threshold_markers(True)
        )
        built: stat.Panel | gauge.Panel = dial
    else:
        built = (
            _common(stat.Panel(), panel, panel_id, STAT_HEIGHT)
            .reduce_options(_reduce_to_last())
            .color_mode(common.BigValueColorMode.BACKGROUND)
            .graph_mode(common.BigValueGraphMode.AREA)
            .justify_mode(common.BigValueJustifyMode.AUTO)
            .orientation(common.VizOrientation.AUTO)
            .text_mode(common.BigValueTextMode.VALUE)
        )
    built = (
        built.description(panel.description)
        .color_scheme(_color(model.FieldColorModeId.THRESHOLDS))
        .thresholds(_thresholds(panel.steps))
    )
    if panel.decimals is not None:
        built = built.decimals(panel.decimals)
    return built


def build_panel(panel: Panel, panel_id: int) -> Builder[model.Panel]:
    """The Grafana panel for `panel`, with id `panel_id`."""
    if isinstance(panel, TimeSeries):
        return _timeseries(panel, panel_id)
    return _stat(panel, panel_id)
