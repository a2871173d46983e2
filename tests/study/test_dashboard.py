"""The dashboard, read through its own JSON API: feasibility is visible and "best" is feasible.

The answers come from optuna-dashboard's real WSGI app (``optuna_dashboard.wsgi`` and
lrsearch's wrapper of it), called in-process; one test goes over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from typing import Any
from wsgiref.util import setup_testing_defaults

import optuna
import optuna_dashboard
import pytest
import torch
from optuna.storages import BaseStorage
from torch import nn

from lrsearch.study import CONSTRAINT, SearchResult, search
from lrsearch.study._dashboard import PARETO_ID, RANKS_ID, dashboard_app, dashboard_server
from lrsearch.study._objective import _constrain


def call(app: Any, path: str) -> dict[str, Any]:
    """GET ``path`` from a WSGI app; the decoded JSON answer (status 200 asserted)."""
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = path
    status: list[str] = []
    body = b"".join(app(environ, lambda line, headers, exc_info=None: status.append(line)))
    assert status == ["200 OK"], (status, body[:300])
    return json.loads(body)


def study_answer(app: Any, storage: optuna.storages.BaseStorage, name: str) -> dict[str, Any]:
    study_id = storage.get_study_id_from_name(name)
    return call(app, f"/api/studies/{study_id}")


def numbers(trials: list[dict[str, Any]]) -> list[int]:
    return sorted(trial["number"] for trial in trials)


def hand_made(storage: optuna.storages.BaseStorage, rows: list[tuple[float | tuple[float, float], float]],
              *, directions: int = 1) -> optuna.Study:
    """Trials with the given values and constraint values, recorded the way the objective records them."""
    study = optuna.create_study(storage=storage, study_name="s", directions=["minimize"] * directions)
    for value, constraint in rows:
        trial = study.ask()
        _constrain(trial, constraint)
        study.tell(trial, value)
    return study


def test_plain_dashboard_calls_an_infeasible_trial_best_and_lrsearch_does_not() -> None:
    storage = optuna.storages.InMemoryStorage()
    hand_made(storage, [(1.0, 0.01), (2.0, -0.002), (3.0, -0.004)])  # trial 0: cheapest, over budget
    plain = study_answer(optuna_dashboard.wsgi(storage), storage, "s")
    assert numbers(plain["best_trials"]) == [0]  # the defect this module works around
    ours = study_answer(dashboard_app(storage), storage, "s")
    assert numbers(ours["best_trials"]) == [1]
    assert [t["constraints"] for t in ours["trials"]] == [[0.01], [-0.002], [-0.004]]
    assert ours["trials"] == plain["trials"]  # only the best trials differ


def test_no_feasible_trial_means_no_best_trial() -> None:
    storage = optuna.storages.InMemoryStorage()
    hand_made(storage, [(1.0, 0.01), (2.0, 0.02)])
    answer = study_answer(dashboard_app(storage), storage, "s")
    assert answer["best_trials"] == [] and len(answer["trials"]) == 2


def test_two_objectives_best_trials_are_the_feasible_front() -> None:
    storage = optuna.storages.InMemoryStorage()
    # (cost, drop): trial 0 is cheapest but over budget, trial 3 is dominated by trial 1.
    hand_made(storage, [((1.0, 0.02), 0.01), ((2.0, 0.004), -0.001), ((3.0, 0.0), -0.005), ((2.5, 0.004), -0.001)],
              directions=2)
    assert numbers(study_answer(optuna_dashboard.wsgi(storage), storage, "s")["best_trials"]) == [0, 1, 2]
    assert numbers(study_answer(dashboard_app(storage), storage, "s")["best_trials"]) == [1, 2]


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[SearchResult, BaseStorage, dict[str, Any]]:
    """A small search whose budget some trials break, and the dashboard's answer about its study."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(512, 16)
    y = model(x).argmax(1)  # the model is right on every sample: any change costs accuracy
    data = [(x[i:i + 128], y[i:i + 128]) for i in range(0, 512, 128)]
    # No early abort: over-budget trials complete, so the Pareto figure has some to draw.
    result = search(model, data, budget="0.5%", run_dir=str(tmp_path_factory.mktemp("search")), objective="macs",
                    n_trials=8, seed=0, early_abort=False)
    storage = optuna.storages.RDBStorage(result.storage)
    return result, storage, study_answer(dashboard_app(storage), storage, result.study_name)


def test_a_search_shows_its_constraints_and_a_feasible_best(searched) -> None:
    result, storage, answer = searched
    study = optuna.load_study(study_name=result.study_name, storage=storage)
    finished = [t for t in study.trials if CONSTRAINT in t.constraints]
    assert {t.constraints[CONSTRAINT] > 0 for t in finished} == {True, False}  # over and within the budget
    shown = {t["number"]: t["constraints"] for t in answer["trials"]}
    for trial in finished:
        assert shown[trial.number] == [trial.constraints[CONSTRAINT]]
    assert result.best is not None
    assert numbers(answer["best_trials"]) == [result.best.trial]
    assert all(c <= 0 for c in answer["best_trials"][0]["constraints"])


def test_the_dashboard_shows_the_search_front_with_units(searched) -> None:
    result, storage, answer = searched
    figures = {item["id"]: json.loads(item["graph_object"]) for item in answer["plotly_graph_objects"]}
    assert set(figures) == {PARETO_ID, RANKS_ID}
    pareto = {trace["name"]: trace for trace in figures[PARETO_ID]["data"]}
    assert pareto["feasible front"]["customdata"] == [c.trial for c in result.pareto]
    feasible = {t.number for t in optuna.load_study(study_name=result.study_name, storage=storage).trials
                if t.user_attrs.get("feasible")}
    assert set(pareto["feasible front"]["customdata"]) <= feasible
    over = pareto["over the search's constraint 0.5%"]["customdata"]
    assert over and set(over).isdisjoint(feasible)
    assert pareto["dense model"]["x"][0] == result.dense["macs"]
    layout = figures[PARETO_ID]["layout"]
    assert layout["xaxis"]["title"]["text"] == "MACs per sample"
    assert layout["yaxis"]["title"]["text"] == "accuracy drop before fine-tuning (points)"
    ranks = {trace["name"]: trace for trace in figures[RANKS_ID]["data"]}
    assert ranks["full rank"]["y"] == list(result.space.layers)


def test_served_over_http_on_localhost() -> None:
    storage = optuna.storages.InMemoryStorage()
    hand_made(storage, [(1.0, 0.01), (2.0, -0.002)])
    with dashboard_server(storage, host="127.0.0.1", port=0) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            port = server.server_address[1]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/0", timeout=30) as response:
                answer = json.loads(response.read())
        finally:
            server.shutdown()
            thread.join(timeout=10)
    assert numbers(answer["best_trials"]) == [1]


def test_a_taken_port_raises_before_serving() -> None:
    storage = optuna.storages.InMemoryStorage()
    with dashboard_server(storage, host="127.0.0.1", port=0) as first:
        with pytest.raises(OSError):
            dashboard_server(storage, host="127.0.0.1", port=first.server_address[1])
