"""lrsearch's figures mean what they say: the feasible front, distinct over-budget markers, units."""

from __future__ import annotations

from typing import Any

from lrsearch.study._figures import RankRow, TrialPoint, pareto_figure, rank_rows, ranks_figure

POINTS = [TrialPoint(0, 1.0, 0.030, False), TrialPoint(1, 2.0, 0.004, True), TrialPoint(2, 3.0, 0.001, True),
          TrialPoint(3, 3.5, 0.004, True), TrialPoint(4, 1.5, 0.020, False)]


def traces(figure: Any) -> dict[str, Any]:
    return {trace.name: trace for trace in figure.data}


def by_prefix(named: dict[str, Any], prefix: str) -> Any:
    (match,) = [trace for name, trace in named.items() if name.startswith(prefix)]
    return match


def test_the_front_is_the_given_feasible_trials_and_over_budget_ones_stand_apart() -> None:
    figure = pareto_figure(POINTS, front={1, 2}, constraint="0.5%", constraint_drop=0.005,
                           cost_title="predicted latency (ms)", metric="accuracy", dense_cost=4.0, final=1)
    named = traces(figure)
    front = named["feasible front"]
    over, within = by_prefix(named, "over the search's constraint 0.5%"), by_prefix(named, "within the search's")
    assert list(front.customdata) == [1, 2] and list(front.x) == [2.0, 3.0]
    assert list(over.customdata) == [0, 4] and list(within.customdata) == [3]
    assert over.marker.symbol != within.marker.symbol and over.marker.color != within.marker.color
    assert within.marker.color != front.marker.color
    assert list(over.y) == [3.0, 2.0]  # drops in points
    constraint = by_prefix(named, "search constraint 0.5%")
    assert set(constraint.y) == {0.5} and "0.50 points" in constraint.name
    assert not [name for name in named if name.startswith("budget")]  # no budget given: one line
    assert set(named["dense model"].x) == {4.0}
    assert list(named["kept (trial 1)"].customdata) == [1]
    assert figure.layout.xaxis.title.text == "predicted latency (ms)"
    assert figure.layout.yaxis.title.text == "accuracy drop before fine-tuning (points)"


def test_a_wide_search_constraint_is_drawn_beside_the_budget_and_names_the_markers() -> None:
    """Trials 3 points down are within a 5 % search constraint, never "within budget" beside a 0.5 % budget."""
    figure = pareto_figure(POINTS, front={1, 2}, constraint="5%", constraint_drop=0.05, budget="0.5%",
                           budget_drop=0.005, cost_title="MACs per sample", metric="accuracy")
    named = traces(figure)
    assert not [name for name in named if "budget" in name and not name.startswith("budget 0.5% after")]
    assert set(by_prefix(named, "search constraint 5%").y) == {5.0}
    budget = by_prefix(named, "budget 0.5% after fine-tuning")
    assert set(budget.y) == {0.5} and "0.50 points" in budget.name
    assert budget.line.color != by_prefix(named, "search constraint").line.color
    assert list(by_prefix(named, "within the search's constraint 5%").customdata) == [3]


def test_an_infeasible_trial_never_joins_the_front() -> None:
    figure = pareto_figure(POINTS, front={0, 1}, constraint="0.5%", constraint_drop=0.005,
                           cost_title="MACs per sample", metric="val_acc")
    assert list(traces(figure)["feasible front"].customdata) == [1]
    assert "dense model" not in traces(figure)


def test_rank_rows_and_figure_show_chosen_against_full() -> None:
    rows = list(rank_rows({"a": 8, "conv": [4, 12], "c": "dense"}, {"a": 64, "conv": [16, 32], "c": 10, "d": 20},
                          ["a", "conv", "c", "d"]))
    assert rows == [RankRow("a", 8, 64, False), RankRow("conv (in)", 4, 16, False),
                    RankRow("conv (out)", 12, 32, False), RankRow("c", 10, 10, True), RankRow("d", 20, 20, True)]
    named = traces(ranks_figure(rows, title="t"))
    assert list(named["chosen rank"].x) == [12.5, 25.0, 37.5]
    assert list(named["chosen rank"].text) == ["8 / 64", "4 / 16", "12 / 32"]
    assert list(named["kept dense"].y) == ["c", "d"] and list(named["kept dense"].text) == ["dense (10)", "dense (20)"]
    assert named["kept dense"].marker.color != named["chosen rank"].marker.color
    assert list(named["full rank"].x) == [100.0] * 5
