"""The descent from a fine-tuned winner: its moves, their order, the chain, and its trials in the study."""

from __future__ import annotations

import itertools
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
import torch
from torch import nn

from lrsearch.study import LayerSpace, SearchSpace, search
from lrsearch.study import _descent
from lrsearch.study._descent import DESCENT, allocation_of, descend, descent_chain, descent_moves, moves_by_value


def _layer(name: str, ranks: tuple[int, ...], scheme: str = "linear") -> LayerSpace:
    options = {rank: (scheme, rank) for rank in ranks}
    return LayerSpace(name, (*options, "dense"), options)


# Ladder rungs of step 8: 8, 16, 24, 32, 48, 64; 40 and 56 are choices but not rungs.
SPACE = SearchSpace(layers={"a": _layer("a", (8, 16, 24, 32)), "b": _layer("b", (8, 16, 24, 32, 40, 48, 56, 64)),
                            "c": _layer("c", (8, 16, 24, 32, 40, 48, 56, 64))})
ANCHOR = {"a": 32, "b": 64, "c": 64}


def test_moves_go_to_the_next_ladder_rungs_below_each_layer() -> None:
    moves = descent_moves(SPACE, ANCHOR)
    assert moves == [("a", 24), ("a", 16), ("a", 8), ("b", 48), ("b", 32), ("b", 24),
                     ("c", 48), ("c", 32), ("c", 24)]   # 40 and 56 are not rungs; three per layer
    assert descent_moves(SPACE, {"a": 8, "b": "dense", "c": 64})[:3] == [("b", 64), ("b", 48), ("b", 32)]


def test_large_models_get_fewer_moves_per_layer(monkeypatch) -> None:
    monkeypatch.setattr(_descent, "MOVE_EVALUATIONS", 6)
    assert [move for move in descent_moves(SPACE, ANCHOR)] == [("a", 24), ("a", 16), ("b", 48), ("b", 32),
                                                               ("c", 48), ("c", 32)]
    monkeypatch.setattr(_descent, "MOVE_EVALUATIONS", 1)
    assert len(descent_moves(SPACE, ANCHOR)) == 3          # at least one each


def test_moves_are_ordered_by_drop_added_per_cost_saved() -> None:
    scored = [(("a", 24), 90.0, 0.30),    # 0.20 per 10 saved: 0.02
              (("b", 48), 80.0, 0.20),    # 0.10 per 20: 0.005
              (("c", 48), 80.0, 0.15),    # 0.05 per 20: 0.0025
              (("c", 32), 60.0, 0.25),    # 0.15 per 40: 0.00375
              (("b", 32), 100.0, 0.05),   # saves nothing: left out
              (("a", 16), None, None)]    # infeasible: left out
    assert moves_by_value(100.0, 0.10, scored) == [("c", 48), ("c", 32), ("b", 48), ("a", 24)]


def test_each_chain_point_cuts_one_layer_further_than_the_last() -> None:
    chain = descent_chain(SPACE, ANCHOR, [("c", 48), ("c", 32), ("c", 48), ("b", 48), ("a", 24)])
    assert chain == [{"a": 32, "b": 64, "c": 48}, {"a": 32, "b": 64, "c": 32},     # ("c", 48) again: skipped
                     {"a": 32, "b": 48, "c": 32}, {"a": 24, "b": 48, "c": 32}]


def _additive_score(calls: list[str]):
    """A cost of the summed ranks; a drop growing with the square of each cut, a hundred times faster in ``a``."""
    def score(label: str, allocation) -> tuple[float, float] | None:
        calls.append(label)
        cuts = {name: (32 if name == "a" else 64) - rank for name, rank in allocation.items()}
        drop = 1e-3 * cuts["a"] ** 2 + 1e-5 * (cuts["b"] ** 2 + cuts["c"] ** 2)
        return None if drop > 0.1 else (float(sum(allocation.values())), drop)
    return score


def test_descend_keeps_the_cheap_cuts_first_and_stops_at_the_ceiling() -> None:
    calls: list[str] = []
    chain = descend(SPACE, ANCHOR, anchor_cost=160.0, anchor_drop=0.0, score=_additive_score(calls), label="d",
                    points=10, ceiling=0.05)
    assert [(point["b"], point["c"]) for point in chain] == [(48, 64), (48, 48), (32, 48), (32, 32), (24, 32),
                                                             (24, 24)]      # the cheap layers, a rung at a time
    assert all(point["a"] == 32 for point in chain)        # the cut in "a" that follows passes the ceiling
    assert len(calls) == 9 + len(chain) + 1                # the moves, the kept points, the one over the ceiling
    assert calls[:9] == [f"d:{name}={rank}" for name, rank in descent_moves(SPACE, ANCHOR)]


def test_descend_scores_no_more_points_than_asked() -> None:
    calls: list[str] = []
    chain = descend(SPACE, ANCHOR, anchor_cost=160.0, anchor_drop=0.0, score=_additive_score(calls), label="d",
                    points=2, ceiling=None)
    assert len(chain) == 2 and len(calls) == 9 + 2


def test_allocation_of_a_candidate() -> None:
    assert allocation_of(SPACE, {"a": 16, "c": 40}, {"a": "linear", "c": "linear"}) == {"a": 16, "b": "dense", "c": 40}
    assert allocation_of(SPACE, {"a": 12}, {"a": "linear"}) is None        # not a choice of the space


def _rank(space: SearchSpace, name: str, choice) -> float:
    decoded = space.layers[name].decode(choice)
    return float("inf") if decoded is None else decoded[1]


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    y = (x[:, :4] * torch.tensor([1.0, -2.0, 0.5, 1.5])).argmax(1)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, [(x[i:i + 128], y[i:i + 128]) for i in range(0, 512, 128)]


def test_a_descent_is_scored_as_trials_of_the_study_and_reused_on_resume(trained, tmp_path: Path) -> None:
    model, val = trained
    result = search(model, val, budget="30%", run_dir=str(tmp_path), n_trials=6, objective="macs", seed=0)
    anchor = max(result.pareto, key=lambda candidate: candidate.macs)
    allocation = allocation_of(result.space, anchor.ranks, anchor.schemes)
    chain = result.descend(anchor, points=3)
    assert 1 <= len(chain) <= 3
    assert all(candidate.macs < anchor.macs and candidate.drop <= result.allowed_drop for candidate in chain)
    assert [c.macs for c in chain] == sorted(c.macs for c in chain)          # the most cut first
    for candidate in chain:      # each point is the anchor cut further
        point = allocation_of(result.space, candidate.ranks, candidate.schemes)
        assert point != allocation and all(_rank(result.space, n, point[n]) <= _rank(result.space, n, allocation[n])
                                           for n in allocation)
    study = optuna.load_study(study_name=result.study_name, storage=result.storage)
    assert {c.trial for c in chain} <= {t.number for t in study.trials if t.state == TrialState.COMPLETE}
    assert all(t.state != TrialState.RUNNING for t in study.trials)
    before = len(study.trials)
    assert result.descend(anchor, points=3) == chain                         # the same points, not run again
    assert len(optuna.load_study(study_name=result.study_name, storage=result.storage).trials) == before


def test_the_scorer_runs_leftover_warm_starts_first_and_returns_its_own_point(trained, tmp_path: Path) -> None:
    model, val = trained
    result = search(model, val, budget="30%", run_dir=str(tmp_path), n_trials=3, objective="macs", seed=0)
    study = optuna.load_study(study_name=result.study_name, storage=result.storage)
    waiting = [t.number for t in study.trials if t.state == TrialState.WAITING]
    assert waiting, "three trials leave warm starts enqueued"
    taken = {SearchSpace.key(t.params or t.system_attrs["fixed_params"]) for t in study.trials}
    layers = result.space.layers
    fresh = next(dict(zip(layers, choices)) for choices in itertools.product(*(layer.choices for layer in layers.values()))
                 if SearchSpace.key(result.space.params(dict(zip(layers, choices)))) not in taken
                 and "dense" not in choices)
    candidate = result.scorer(f"{DESCENT}test", fresh)
    study = optuna.load_study(study_name=result.study_name, storage=result.storage)
    assert all(study.trials[n].state == TrialState.COMPLETE for n in waiting)   # the queue ran first
    assert candidate is not None and allocation_of(result.space, candidate.ranks, candidate.schemes) == fresh
    assert study.trials[candidate.trial].user_attrs["warm_start"] == f"{DESCENT}test"
