"""Figures pushed into the study so optuna-dashboard shows what its own views get wrong.

optuna-dashboard 0.21 ignores Optuna 5 constraints, so its "best trials" may be infeasible.
The Pareto plot pushed here is drawn by ``optuna.visualization``, which greys infeasible
trials, with the budget as a line; a second chart shows the chosen rank of every layer.
"""

from __future__ import annotations

from collections.abc import Mapping

import optuna
from optuna.trial import FrozenTrial

__all__ = ["publish_plots"]

PARETO_ID = "lrsearch-pareto"
RANKS_ID = "lrsearch-ranks"


def publish_plots(study: optuna.Study, *, cost_key: str, cost_label: str, allowed_drop: float,
                  best: FrozenTrial | None, full_ranks: Mapping[str, int]) -> list[str]:
    """Save the Pareto and per-layer rank figures into the study; returns the ids saved.

    Returns an empty list when plotly or optuna-dashboard is not installed (the
    ``dashboard`` extra): the search itself does not need them.
    """
    try:
        import plotly.graph_objects as go
        from optuna_dashboard import save_plotly_graph_object
    except ImportError:
        return []
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not any(cost_key in t.user_attrs and "drop" in t.user_attrs for t in complete):
        return []
    pareto = optuna.visualization.plot_pareto_front(
        study, targets=lambda t: (t.user_attrs.get(cost_key, float("nan")), t.user_attrs.get("drop", float("nan"))),
        target_names=[cost_label, "accuracy drop"])
    pareto.add_hline(y=allowed_drop, line_dash="dash", annotation_text="budget")
    pareto.update_layout(title="Cost vs accuracy drop (infeasible trials greyed)")
    saved = [save_plotly_graph_object(study, pareto, graph_object_id=PARETO_ID)]
    if best is not None:
        ranks = best.user_attrs.get("ranks", {})
        names = list(full_ranks)
        chosen = [ranks.get(name, full_ranks[name]) for name in names]
        chosen = [max(r) if isinstance(r, list) else r for r in chosen]
        figure = go.Figure([go.Bar(name="full rank", x=names, y=[full_ranks[n] for n in names]),
                            go.Bar(name=f"chosen (trial {best.number})", x=names, y=chosen)])
        figure.update_layout(barmode="overlay", title="Rank per layer of the best feasible trial",
                             yaxis_title="rank")
        saved.append(save_plotly_graph_object(study, figure, graph_object_id=RANKS_ID))
    return saved
