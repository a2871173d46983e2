"""The search's figures, in plotly, from plain numbers: one definition for the dashboard and report.html.

The dashboard gets them through ``optuna_dashboard.save_plotly_graph_object`` (see
:mod:`lrsearch.study._dashboard`), ``report.html`` embeds them (see
:mod:`lrsearch.pipeline._report`); both pass the same rows, so they cannot disagree.

- :func:`pareto_figure`: every finished trial's cost against its accuracy drop before fine-tuning.
  Trials within the search's constraint and over it have their own marker and colour (never a
  colour scale that fades to white); the line is the *feasible* front, exactly the trials of
  ``SearchResult.pareto``; the constraint and the final budget are lines, and the dense model's
  cost a reference. Latency is the latency table's prediction for
  trials and dense model alike, so the two are on one scale.
- :func:`ranks_figure`: each layer's chosen rank against its full rank.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import plotly.graph_objects as go

__all__ = ["RankRow", "TrialPoint", "cost_axis", "feasible_front", "pareto_figure", "rank_rows", "ranks_figure",
           "stopped_note"]

WITHIN, OVER, FRONT, FINAL, DENSE_GREY, FULL_GREY = "#1f77b4", "#d62728", "#2ca02c", "#ff9f1c", "#7f7f7f", "#e6e6e6"
BUDGET = "#9467bd"
_COST_AXES = {"latency": ("predicted latency (ms)", 1e3), "macs": ("MACs per sample", 1.0),
              "params": ("parameters", 1.0)}


def cost_axis(objective: str) -> tuple[str, float]:
    """The cost axis title with its unit, and the factor from the study's unit (latency: s -> ms)."""
    return _COST_AXES.get(objective, (objective, 1.0))


@dataclass(frozen=True)
class TrialPoint:
    """One finished trial: cost in the axis unit (ms for latency), drop as a fraction (0.005 = 0.5 points)."""

    number: int
    cost: float
    drop: float
    feasible: bool


@dataclass(frozen=True)
class RankRow:
    """One bar of the rank figure (a Tucker-2 layer has two: ``in`` and ``out``)."""

    label: str
    chosen: int | None
    full: int | None
    dense: bool


def _layout(figure: go.Figure, *, title: str, xaxis: str, yaxis: str, height: int,
            legend_below: bool = True) -> go.Figure:
    grid = {"showgrid": True, "gridcolor": "#e5e5e5", "zeroline": False, "automargin": True}
    # The title hangs from the top edge (two lines fit above the plot), left of the toolbar.
    figure.update_layout(template="none", height=height, margin={"l": 70, "r": 20, "t": 90, "b": 60},
                         title={"text": title, "x": 0.01, "xanchor": "left", "y": 1, "yref": "container",
                                "yanchor": "top", "pad": {"t": 12}},
                         legend={"orientation": "h", "y": -0.2, "x": 0} if legend_below else {"x": 1.02, "y": 1},
                         xaxis={"title": {"text": xaxis}, **grid}, yaxis={"title": {"text": yaxis}, **grid})
    return figure


def feasible_front(points: Sequence[TrialPoint]) -> list[int]:
    """Feasible trials no other feasible trial beats in both cost and drop, cheapest first.

    The definition of ``SearchResult.pareto``, for reports that did not record it; identical
    points (a duplicate configuration replays its twin) count once, as the earliest trial.
    """
    unique: dict[tuple[float, float], TrialPoint] = {}
    for point in sorted((p for p in points if p.feasible), key=lambda p: p.number):
        unique.setdefault((point.cost, point.drop), point)
    front = [p for p in unique.values() if not any(
        o.cost <= p.cost and o.drop <= p.drop and (o.cost < p.cost or o.drop < p.drop) for o in unique.values())]
    return [p.number for p in sorted(front, key=lambda p: (p.cost, p.drop))]


def stopped_note(stopped: int) -> str:
    """What the Pareto figure leaves out: trials stopped early have only a partial drop estimate."""
    if not stopped:
        return ""
    return f"Not drawn: {stopped} trial{'s' if stopped != 1 else ''} stopped early, certain to exceed the budget"


def pareto_figure(points: Sequence[TrialPoint], *, front: Collection[int], constraint: str,
                  constraint_drop: float, cost_title: str, metric: str, budget: str | None = None,
                  budget_drop: float | None = None, dense_cost: float | None = None,
                  final: int | None = None, note: str = "") -> go.Figure:
    """Cost vs drop before fine-tuning (in points) of ``points``; ``front`` names the feasible Pareto trials.

    Feasible means within the search's ``constraint`` (``constraint_drop``), which is drawn; the
    final ``budget`` (``budget_drop``, what holds after fine-tuning) is drawn too when it differs,
    so a trial 40 points down is never called "within budget" beside a 0.5-point budget line.
    ``dense_cost`` (same unit as the costs) draws the dense model as a vertical reference line;
    ``final`` marks the trial that was kept; ``note`` is a line under the title (what is not drawn).
    """
    import plotly.graph_objects as go

    figure = go.Figure()
    hover = "trial %{customdata}<br>%{x:.4g}<br>drop %{y:.2f} points<extra></extra>"

    def scatter(chosen: Sequence[TrialPoint], **style: Any) -> None:
        figure.add_trace(go.Scatter(x=[p.cost for p in chosen], y=[100 * p.drop for p in chosen],
                                    customdata=[p.number for p in chosen], hovertemplate=hover, **style))

    on_front = sorted((p for p in points if p.number in front and p.feasible), key=lambda p: (p.cost, p.drop))
    scatter([p for p in points if p.feasible and p.number not in front], mode="markers",
            name=f"within the search's constraint {constraint}",
            marker={"color": WITHIN, "symbol": "circle", "size": 8, "opacity": 0.75})
    scatter([p for p in points if not p.feasible], mode="markers", name=f"over the search's constraint {constraint}",
            marker={"color": OVER, "symbol": "x", "size": 8, "opacity": 0.75})
    scatter(on_front, mode="lines+markers", name="feasible front", line={"color": FRONT, "shape": "hv"},
            marker={"color": FRONT, "symbol": "diamond", "size": 10, "line": {"width": 1, "color": "black"}})
    scatter([p for p in points if p.number == final], mode="markers", name=f"kept (trial {final})",
            marker={"color": FINAL, "symbol": "star", "size": 18, "line": {"width": 1, "color": "black"}})
    costs = [p.cost for p in points] + ([dense_cost] if dense_cost is not None else [])
    lines = [(f"search constraint {constraint} ({100 * constraint_drop:.2f} points)", constraint_drop, "black")]
    if budget is not None and budget_drop is not None and budget_drop != constraint_drop:
        lines.append((f"budget {budget} after fine-tuning ({100 * budget_drop:.2f} points)", budget_drop, BUDGET))
    drops = [100 * p.drop for p in points] + [100 * drop for _, drop, _ in lines] + [0.0]
    if costs:
        for name, drop, color in lines:
            figure.add_trace(go.Scatter(x=[min(costs), max(costs)], y=[100 * drop] * 2, mode="lines", name=name,
                                        hoverinfo="skip", line={"color": color, "dash": "dash", "width": 1.5}))
    if dense_cost is not None:
        figure.add_trace(go.Scatter(x=[dense_cost] * 2, y=[min(drops), max(drops)], mode="lines",
                                    name="dense model", hoverinfo="skip",
                                    line={"color": DENSE_GREY, "dash": "dot", "width": 1.5}))
    title = "Cost against accuracy drop" + (f"<br><sup>{note}</sup>" if note else "")
    return _layout(figure, title=title, xaxis=cost_title, yaxis=f"{metric} drop before fine-tuning (points)",
                   height=480)


def rank_rows(ranks: Mapping[str, Any], full: Mapping[str, Any], names: Sequence[str]) -> Iterator[RankRow]:
    """One row per layer in ``names`` (two, ``in``/``out``, for a Tucker-2 pair); dense layers at full rank."""

    def as_int(value: object) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    for name in names:
        chosen, top = ranks.get(name, "dense"), full.get(name)
        dense = chosen == "dense"
        if isinstance(chosen, (list, tuple)) or isinstance(top, (list, tuple)):
            tops = list(top) if isinstance(top, (list, tuple)) else [top, top]
            picks = tops if dense else list(chosen) if isinstance(chosen, (list, tuple)) else [chosen, chosen]
            for side, pick, limit in zip(("in", "out"), picks, tops):
                pick, limit = as_int(pick), as_int(limit)
                pick = min(pick, limit) if pick is not None and limit is not None else pick
                yield RankRow(f"{name} ({side})", pick, limit, dense)
        else:
            limit = as_int(top)
            yield RankRow(name, limit if dense else as_int(chosen), limit, dense)


def ranks_figure(rows: Sequence[RankRow], *, title: str, subtitle: str = "") -> go.Figure:
    """Each row's chosen rank as a share of its full rank; the bars are labelled ``chosen / full``."""
    import plotly.graph_objects as go

    def bars(chosen: Sequence[RankRow], **style: Any) -> go.Bar:
        return go.Bar(y=[row.label for row in chosen], orientation="h", textposition="outside",
                      x=[100.0 * row.chosen / row.full if row.chosen is not None and row.full else 0.0 for row in chosen],
                      text=[f"dense ({row.full})" if row.dense else f"{_text(row.chosen)} / {_text(row.full)}"
                            for row in chosen], hovertemplate="%{y}: %{text}<extra></extra>", **style)

    figure = go.Figure([
        go.Bar(y=[row.label for row in rows], x=[100.0 if row.full else 0.0 for row in rows], orientation="h",
               name="full rank", marker={"color": FULL_GREY, "line": {"color": "#bbbbbb", "width": 1}},
               hoverinfo="skip"),
        bars([row for row in rows if not row.dense], name="chosen rank", marker={"color": WITHIN}),
        bars([row for row in rows if row.dense], name="kept dense", marker={"color": DENSE_GREY}),
    ])
    # Layer names such as "0" and "2" (an nn.Sequential) must stay names, not become a numeric axis.
    figure.update_layout(barmode="overlay", xaxis={"range": [0, 125]},
                         yaxis={"autorange": "reversed", "type": "category",
                                "categoryorder": "array", "categoryarray": [row.label for row in rows]})
    heading = title + (f"<br><sup>{subtitle}</sup>" if subtitle else "")
    # The legend sits right of the bars: below them, a short figure would put it over the axis title.
    return _layout(figure, title=heading, xaxis="chosen rank (% of the layer's full rank; labels: chosen / full)",
                   yaxis="layer", height=max(220, 28 * len(rows) + 150), legend_below=False)


def _text(value: int | None) -> str:
    return "—" if value is None else str(value)
