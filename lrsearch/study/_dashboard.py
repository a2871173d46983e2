"""What optuna-dashboard shows of a study: the best *feasible* trial as best, and lrsearch's figures.

optuna-dashboard 0.21 asks the storage for the best trial (single objective) or computes the
Pareto front itself (several objectives), and both ignore Optuna 5 constraints: an over-budget
trial could be its "Best Trial". :func:`dashboard_app` serves the same dashboard with the best
trials of its study answer replaced by Optuna's own constrained ones (``Study.best_trials``).
The trials' views, history and plots show feasibility from the ``constraints`` system attr that
the objective mirrors (see :mod:`lrsearch.study._objective`), with or without this wrapper.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from lrsearch.study._figures import TrialPoint, cost_axis, pareto_figure, rank_rows, ranks_figure, stopped_note

__all__ = ["dashboard_app", "dashboard_server", "feasible_best_trials", "publish_plots", "serve_dashboard",
           "trial_points"]

PARETO_ID = "lrsearch-pareto"
RANKS_ID = "lrsearch-ranks"
STUDY_DETAIL = "/api/studies/<study_id:int>"  # the route whose answer holds "best_trials"

_logger = logging.getLogger("lrsearch")


def feasible_best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The trials the dashboard should call best: the best feasible one, or the feasible Pareto front.

    ``Study.best_trials`` already keeps only feasible complete trials once any trial has a
    constraint. With one objective, ties (a duplicate configuration replays its twin's value)
    resolve to the earliest trial, the one that was evaluated.
    """
    best = sorted(study.best_trials, key=lambda trial: trial.number)
    return best[:1] if len(study.directions) == 1 else best


def dashboard_app(storage: BaseStorage) -> Callable[..., Any]:
    """optuna-dashboard's WSGI app over ``storage``, whose study answer names feasible best trials only."""
    from optuna_dashboard import wsgi
    from optuna_dashboard._serializer import serialize_frozen_trial

    app: Any = wsgi(storage)
    routes = [r for r in app.routes if r.method == "GET" and r.rule == STUDY_DETAIL]
    if not routes:  # a newer optuna-dashboard moved it: serve it unchanged rather than not at all
        _logger.warning("optuna-dashboard has no %s route; its 'Best Trial' may be over the budget", STUDY_DETAIL)
        return app
    view = routes[0].callback

    def study_detail(study_id: int) -> Any:
        answer = view(study_id=study_id)
        if isinstance(answer, dict) and "best_trials" in answer and not answer.get("is_preferential"):
            study = optuna.load_study(study_name=storage.get_study_name_from_id(study_id), storage=storage)
            system_attrs = storage.get_study_system_attrs(study_id)
            answer["best_trials"] = [serialize_frozen_trial(study_id, trial, system_attrs)
                                     for trial in feasible_best_trials(study)]
        return answer

    routes[0].callback = study_detail
    routes[0].reset()
    return app


class _ThreadedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # the page fetches several API answers at once


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """No line per request: the dashboard polls every few seconds."""


def dashboard_server(storage: BaseStorage, *, host: str = "127.0.0.1", port: int = 8080) -> WSGIServer:
    """A threaded HTTP server of :func:`dashboard_app`, bound but not serving yet.

    Raises ``OSError`` when ``host:port`` cannot be bound.
    """
    return make_server(host, port, dashboard_app(storage), server_class=_ThreadedServer,
                       handler_class=_QuietHandler)


def serve_dashboard(storage: BaseStorage, *, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve the dashboard on ``host:port`` until interrupted (blocks; Ctrl-C raises KeyboardInterrupt)."""
    with dashboard_server(storage, host=host, port=port) as server:
        server.serve_forever()


def publish_plots(study: optuna.Study, *, objective: str, metric: str, constraint: str, constraint_drop: float,
                  front: Sequence[int], dense_cost: float | None, full_ranks: Mapping[str, Any],
                  budget: str | None = None, budget_drop: float | None = None, final: int | None = None,
                  final_note: str = "") -> list[str]:
    """Save the Pareto and per-layer rank figures (:mod:`lrsearch.study._figures`) into the study.

    ``front`` is the feasible Pareto set by trial number, cheapest first (``SearchResult.pareto``).
    The ranks charted are those of ``final`` (the trial the pipeline kept, described by
    ``final_note``) or else of the front's first trial, which is only the search's cheapest within
    its ``constraint``, before fine-tuning. ``budget`` and ``budget_drop``: the drop allowed after
    fine-tuning, drawn beside the constraint. ``dense_cost`` is the dense model's cost in the
    study's unit (for latency, the table's prediction). Returns the ids saved: none when plotly or
    optuna-dashboard is not installed (the ``dashboard`` extra), which the search does not need.
    """
    try:
        from optuna_dashboard import save_plotly_graph_object
    except ImportError:
        return []
    points = trial_points(study, objective)
    if not points:
        return []
    title, scale = cost_axis(objective)
    stopped = len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
    pareto = pareto_figure(points, front=set(front), constraint=constraint, constraint_drop=constraint_drop,
                           budget=budget, budget_drop=budget_drop, cost_title=title, metric=metric,
                           dense_cost=None if dense_cost is None else dense_cost * scale, final=final,
                           note=stopped_note(stopped))
    saved = [save_plotly_graph_object(study, pareto, graph_object_id=PARETO_ID)]
    charted, subtitle = ((final, final_note) if final is not None else
                         (front[0] if front else None,
                          f"the search's cheapest trial within its constraint {constraint}, before fine-tuning"))
    if charted is not None:
        trial = study.get_trials(deepcopy=False)[charted]
        rows = list(rank_rows(trial.user_attrs.get("ranks", {}), full_ranks, list(full_ranks)))
        figure = ranks_figure(rows, title=f"Ranks of trial {trial.number}", subtitle=subtitle)
        saved.append(save_plotly_graph_object(study, figure, graph_object_id=RANKS_ID))
    return saved


def trial_points(study: optuna.Study, objective: str) -> list[TrialPoint]:
    """The complete trials with a cost and a drop, cost in the figures' unit (latency in ms)."""
    _, scale = cost_axis(objective)
    return [TrialPoint(t.number, t.user_attrs[objective] * scale, t.user_attrs["drop"],
                       bool(t.user_attrs.get("feasible")))
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if objective in t.user_attrs and "drop" in t.user_attrs]
