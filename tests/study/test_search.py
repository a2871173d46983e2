"""The rank search end to end on a tiny trained MLP, with deterministic MAC objectives."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from torch import nn

import lrsearch
from lrsearch.measure import LatencyTable, LayerLatency
from lrsearch.study import CONSTRAINT, SearchConfig, SearchSpace, search
from lrsearch.study import _study as study_module
from lrsearch.study._space import param_name
from lrsearch.study._stored_table import stored_latency_table
from lrsearch.study._warmstart import uniform_allocation, uniform_ranks, warm_starts

FAST = {"n_trials": 8, "objective": "macs", "seed": 3}


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 16, generator=generator)
    y = (x[:, :4] * torch.tensor([1.0, -2.0, 0.5, 1.5])).argmax(1)
    return x, y


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    x, y = _data()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    val = [(x[i:i + 128], y[i:i + 128]) for i in range(0, 512, 128)]
    return model, val


def _study(result: lrsearch.SearchResult) -> optuna.Study:
    return optuna.load_study(study_name=result.study_name, storage=result.storage)


def test_best_is_feasible_and_model_untouched(trained, tmp_path: Path) -> None:
    model, val = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = search(model, val, budget="1%", run_dir=str(tmp_path), **FAST)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(isinstance(m, (nn.Linear, nn.ReLU, nn.Sequential)) for m in model.modules())
    assert result.feasible and result.best is not None
    assert result.best.drop <= result.allowed_drop
    assert result.best.macs < result.dense["macs"]
    built = lrsearch.Decomposition(model, calibration=val).build(result.best.ranks)
    correct = sum(int((built(x).argmax(1) == y).sum()) for x, y in val)
    assert correct / 512 == pytest.approx(result.best.metric)
    saved = json.loads((tmp_path / "search-result.json").read_text())
    assert saved["best"]["trial"] == result.best.trial


def test_infeasible_trial_is_never_best_even_when_cheapest(trained, tmp_path: Path) -> None:
    model, val = trained
    result = search(model, val, budget=0.0, run_dir=str(tmp_path), **FAST)
    study = _study(result)
    infeasible = [t for t in study.trials if t.constraints.get(CONSTRAINT, 0) > 0]
    assert infeasible, "budget 0 must make some trial infeasible"
    for candidate in result.pareto:
        assert candidate.drop <= 0.0
    if result.best is not None:
        assert result.best.trial not in {t.number for t in infeasible}


def test_pareto_excludes_cheapest_infeasible_trial(tmp_path: Path) -> None:
    """Checked on hand-made trials so the outcome does not depend on the sampler."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db", study_name="s")
    distributions = {"rank:a": optuna.distributions.CategoricalDistribution([8, 16, "dense"])}
    for number, (rank, macs, drop) in enumerate([(8, 10.0, 0.05), (16, 20.0, 0.001), ("dense", 30.0, 0.0)]):
        study.add_trial(optuna.trial.create_trial(
            params={"rank:a": rank}, distributions=distributions, value=macs,
            constraints={CONSTRAINT: drop - 0.005},
            user_attrs={"ranks": {} if rank == "dense" else {"a": rank}, "schemes": {}, "metric": 1 - drop,
                        "drop": drop, "params": macs, "macs": macs, "feasible": drop <= 0.005}))
    front = study_module._feasible_pareto(study_module._feasible_candidates(study), "macs")
    assert [c.trial for c in front] == [1, 2]  # trial 0 is cheapest but over budget
    assert study.best_trial.number == 1


def test_warm_starts_run_first_and_cost_no_extra_evaluation(trained, tmp_path: Path) -> None:
    model, val = trained
    result = search(model, val, budget="1%", run_dir=str(tmp_path), **{**FAST, "n_trials": 12})
    trials = _study(result).trials
    labelled = [t for t in trials if "warm_start" in t.user_attrs]
    assert labelled and [t.number for t in labelled] == list(range(len(labelled)))
    decomposition = lrsearch.Decomposition(model, calibration=val)
    space = SearchSpace.build(decomposition)
    expected = [space.params(allocation) for _, allocation in warm_starts(
        decomposition, space, lambda name, choice: 0.0 if choice == "dense" else float(
            space.layers[name].decode(choice)[1]))]
    assert all(t.params in expected for t in labelled)
    assert any(label.startswith("greedy") for label in (t.user_attrs["warm_start"] for t in labelled))


def test_uniform_ladder_is_the_hand_methods_and_rounds_up(trained) -> None:
    model, val = trained
    space = SearchSpace.build(lrsearch.Decomposition(model, calibration=val))
    ladder = uniform_ranks(space)
    top = max(rank for layer in space.layers.values() for _, rank in layer.options.values())
    assert ladder == [r for r in (8, 16, 24, 32, 48, 64, 96, 128) if r <= top]
    for rank in ladder:
        for name, choice in uniform_allocation(space, rank=rank).items():
            options = space.layers[name].options
            if choice == "dense":  # no choice of this layer is that wide: it stays dense
                assert all(r < rank for _, r in options.values())
            else:  # the narrowest choice at least that wide: the bottleneck never shrinks below the rung
                assert options[choice][1] >= rank
                assert not any(rank <= r < options[choice][1] for _, r in options.values())


def test_search_result_holds_the_feasible_uniform_rungs_narrowest_first(trained, tmp_path: Path) -> None:
    model, val = trained
    result = search(model, val, budget="30%", run_dir=str(tmp_path), **{**FAST, "n_trials": 20})
    space = result.space
    rungs = [SearchSpace.key(space.params(uniform_allocation(space, rank=rank))) for rank in uniform_ranks(space)]
    trials = _study(result).trials
    feasible = {SearchSpace.key(t.params) for t in trials
                if t.state == TrialState.COMPLETE and t.user_attrs.get("feasible")}
    expected = list(dict.fromkeys(key for key in rungs if key in feasible))  # ladder order, each once
    assert len(expected) >= 2, "a 30 % constraint must leave several rungs feasible"
    key_of = {t.number: SearchSpace.key(t.params) for t in trials}
    assert [key_of[c.trial] for c in result.uniform] == expected
    assert all(c.drop <= result.allowed_drop for c in result.uniform)


def test_resume_keeps_finished_trials(trained, tmp_path: Path) -> None:
    model, val = trained
    first = search(model, val, budget="1%", run_dir=str(tmp_path), **{**FAST, "n_trials": 5})
    finished = {t.number: (t.params, t.datetime_complete) for t in _study(first).trials if t.state.is_finished()}
    assert len(finished) == 5
    second = search(model, val, budget="1%", run_dir=str(tmp_path), **{**FAST, "n_trials": 9})
    trials = [t for t in _study(second).trials if t.state.is_finished()]
    assert len(trials) == 9
    assert {t.number: (t.params, t.datetime_complete) for t in trials if t.number in finished} == finished


def test_resume_refuses_other_data(trained, tmp_path: Path) -> None:
    model, val = trained
    search(model, val, budget="1%", run_dir=str(tmp_path), **{**FAST, "n_trials": 2})
    with pytest.raises(lrsearch.LrSearchError, match="baseline"):
        other = [(x, (y + 1) % 4) for x, y in val]
        search(model, other, budget="1%", run_dir=str(tmp_path), **{**FAST, "n_trials": 3})


def test_identical_configuration_is_not_evaluated_twice(trained, tmp_path: Path, monkeypatch) -> None:
    model, val = trained
    calls = []
    original = lrsearch.measure.Evaluator.iter_chunks

    def counting(self, candidate, **kwargs):
        if candidate is not model:  # the baseline pass is not a trial
            calls.append(1)
        return original(self, candidate, **kwargs)

    storage = f"sqlite:///{tmp_path}/dupe.db"
    study = optuna.create_study(storage=storage, study_name="dupe")
    params = {param_name("0"): 8, param_name("2"): 16, param_name("4"): "dense"}
    study.enqueue_trial(params)
    study.enqueue_trial(params)
    monkeypatch.setattr(lrsearch.measure.Evaluator, "iter_chunks", counting)
    search(model, val, budget="1%", storage=storage, study_name="dupe", run_dir=str(tmp_path),
           warm_start=False, **{**FAST, "n_trials": 2})
    trials = optuna.load_study(study_name="dupe", storage=storage).trials
    assert len(calls) == 1
    assert trials[1].user_attrs["duplicate_of"] == 0
    assert trials[1].values == trials[0].values
    assert trials[1].constraints == trials[0].constraints


def test_hopeless_trial_is_aborted_with_constraint_recorded(trained, tmp_path: Path) -> None:
    model, val = trained
    storage = f"sqlite:///{tmp_path}/abort.db"
    study = optuna.create_study(storage=storage, study_name="abort")
    study.enqueue_trial({param_name("0"): 8, param_name("2"): 8, param_name("4"): "dense"})
    search(model, val, budget=0.0, storage=storage, study_name="abort", run_dir=str(tmp_path),
           warm_start=False, **{**FAST, "n_trials": 1})
    trial = optuna.load_study(study_name="abort", storage=storage).trials[0]
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["aborted"] is True
    assert trial.user_attrs["evaluated_samples"] < 512
    assert trial.constraints[CONSTRAINT] > 0


def test_dashboard_data_is_in_the_storage(trained, tmp_path: Path) -> None:
    model, val = trained
    result = search(model, val, budget="1%", run_dir=str(tmp_path), **FAST)
    study = _study(result)
    attrs = study.user_attrs
    for key in ("baseline", "budget", "allowed_drop", "metric", "objective", "dense", "config"):
        assert "lrsearch:" + key in attrs
    assert attrs["lrsearch:budget"] == "1%"
    assert study.metric_names == ["macs"]
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    for key in ("ranks", "params", "macs", "metric", "drop", "feasible"):
        assert all(key in t.user_attrs for t in done), key
    system = study._storage.get_study_system_attrs(study._study_id)
    plots = [key for key in system if key.startswith("dashboard:plot_data:")]
    assert any("pareto" in key for key in plots) and any("ranks" in key for key in plots)


def test_sequential_runs_are_reproducible(trained, tmp_path: Path) -> None:
    model, val = trained
    runs = []
    for index in range(2):
        result = search(model, val, budget="1%", run_dir=str(tmp_path / str(index)), **FAST)
        runs.append([t.params for t in _study(result).trials])
    assert runs[0] == runs[1]


def test_two_objectives_give_a_pareto_front(trained, tmp_path: Path) -> None:
    model, val = trained
    result = search(model, val, budget="2%", run_dir=str(tmp_path), two_objectives=True, **FAST)
    assert _study(result).metric_names == ["macs", "accuracy_drop"]
    costs = [c.macs for c in result.pareto]
    drops = [c.drop for c in result.pareto]
    assert costs == sorted(costs) and drops == sorted(drops, reverse=True)
    assert all(d <= result.allowed_drop for d in drops)


def _table(model: nn.Module, *, slow_layer: str) -> LatencyTable:
    layers = {}
    for name, module in model.named_children():
        if not isinstance(module, nn.Linear):
            continue
        ranks = lrsearch.candidate_ranks(lrsearch.core._cost.geometry_of(module))
        factor = 2.0 if name == slow_layer else 0.1
        layers[name] = LayerLatency(dense=1e-3, factorized={"linear": {r: factor * 1e-3 * r / 8 for r in ranks}},
                                    geometry=lrsearch.core._cost.geometry_of(module).to_dict())
    return LatencyTable(device="cpu", threads=1, batch_size=128, torch_version=torch.__version__,
                        dense_model=5e-3, layers=layers)


def test_latency_table_built_once_and_slow_layer_stays_dense(trained, tmp_path: Path, monkeypatch) -> None:
    model, val = trained
    builds = []

    def fake_build(decomposition, *args, **kwargs):
        builds.append(1)
        return _table(model, slow_layer="2")

    monkeypatch.setattr(study_module, "build_latency_table", fake_build)
    options = {**FAST, "objective": "latency", "n_trials": 4}
    first = search(model, val, budget="1%", run_dir=str(tmp_path), **options)
    assert "2" in first.space.fixed_dense and "2" not in first.space.layers
    assert all("2" not in c.ranks for c in first.pareto)
    search(model, val, budget="1%", run_dir=str(tmp_path), **{**options, "n_trials": 6})
    assert builds == [1]
    stored = stored_latency_table(_study(first))
    assert stored.primary.layers.keys() == first.latency_table.primary.layers.keys()
    assert (tmp_path / "latency-table.json").is_file()
    best = first.best
    assert best is not None and best.latency == pytest.approx(first.latency_table.predict(
        {name: (best.schemes[name], rank) for name, rank in best.ranks.items()}))


def test_a_table_another_worker_stored_meanwhile_wins(trained, tmp_path: Path, monkeypatch) -> None:
    """Workers that measure at once must end with one table, or Optuna refuses their rank choices."""
    model, val = trained
    theirs = _table(model, slow_layer="0")

    def build_while_another_worker_stores(decomposition, *args, **kwargs):
        study = optuna.load_study(study_name="lrsearch", storage=f"sqlite:///{tmp_path / 'study.db'}")
        study.set_user_attr("lrsearch:latency_table", theirs.to_dict())
        return _table(model, slow_layer="2")

    monkeypatch.setattr(study_module, "build_latency_table", build_while_another_worker_stores)
    result = search(model, val, budget="1%", run_dir=str(tmp_path), **{**FAST, "objective": "latency", "n_trials": 3})
    assert result.latency_table.primary.to_dict() == theirs.to_dict()
    assert "0" in result.space.fixed_dense and "2" in result.space.layers
    assert stored_latency_table(_study(result)).primary.to_dict() == theirs.to_dict()


def test_unknown_option_is_a_clear_type_error(trained, tmp_path: Path) -> None:
    model, val = trained
    with pytest.raises(TypeError, match="SearchConfig"):
        search(model, val, budget="1%", run_dir=str(tmp_path), n_trails=3)
    with pytest.raises(ValueError, match="n_trials"):
        SearchConfig(n_trials=0)
    with pytest.raises(lrsearch.BudgetError):
        search(model, val, budget="abc", run_dir=str(tmp_path))


WORKER = textwrap.dedent("""
    import sys, torch
    from torch import nn
    import lrsearch
    torch.manual_seed(0)
    state, storage, index = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    model.load_state_dict(torch.load(state, weights_only=True))
    data = torch.load(state + ".data", weights_only=True)
    lrsearch.search(model, [tuple(b) for b in data], budget="1%", objective="macs", n_trials=14,
                    storage=storage, study_name="shared", run_dir=sys.argv[4], worker_index=index)
""")


def test_two_workers_share_a_journal_file(trained, tmp_path: Path) -> None:
    model, val = trained
    state = tmp_path / "model.pt"
    torch.save(model.state_dict(), state)
    torch.save([list(b) for b in val], str(state) + ".data")
    storage = f"journal:{tmp_path / 'study.log'}"
    search(model, val, budget="1%", storage=storage, study_name="shared", run_dir=str(tmp_path),
           objective="macs", n_trials=1)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    workers = [subprocess.Popen([sys.executable, str(script), str(state), storage, str(i), str(tmp_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in (1, 2)]
    for worker in workers:
        output, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0, output.decode()[-2000:]
    study = optuna.load_study(study_name="shared", storage=lrsearch.study.open_storage(storage))
    trials = study.trials
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert 14 <= len(trials) <= 14 + 2
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)


def test_a_study_with_enough_trials_runs_no_more(trained, tmp_path: Path) -> None:
    model, val = trained
    search(model, val, budget="1%", run_dir=str(tmp_path), **{**FAST, "n_trials": 4})
    again = search(model, val, budget="1%", run_dir=str(tmp_path), **{**FAST, "n_trials": 4})
    assert len([t for t in _study(again).trials if t.state.is_finished()]) == 4


def _greedy_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if str(t.user_attrs.get("warm_start", "")).startswith("greedy@")]


def test_greedy_warm_starts_spend_their_fraction_of_the_cost(trained, tmp_path: Path) -> None:
    """Each fraction buys a different allocation, dearer as the fraction grows (not all the cheapest)."""
    model, val = trained
    result = search(model, val, budget="1%", run_dir=str(tmp_path), warm_start=True, **{**FAST, "n_trials": 12})
    fixed = {float(t.user_attrs["warm_start"].removeprefix("greedy@")): t
             for t in _greedy_trials(_study(result)) if t.number < 10}
    assert len(fixed) >= 3, "the fixed fractions must not collapse into one allocation"
    macs = [fixed[f].user_attrs["macs"] for f in sorted(fixed)]
    assert macs == sorted(macs) and len(set(macs)) == len(macs)
    geometries = {name: result.decomposition.geometry(name) for name in result.space.layers}
    searchable_dense = sum(lrsearch.dense_cost(g).macs for g in geometries.values())
    cheapest = sum(lrsearch.factorized_cost(g, result.space.layers[n].choices[0]).macs for n, g in geometries.items())
    for fraction, trial in fixed.items():  # within its fraction, unless even the cheapest allocation is not
        spent = trial.user_attrs["macs"] - (result.dense["macs"] - searchable_dense)
        assert spent <= max(fraction * searchable_dense, cheapest) + 1e-6


FIXED_GREEDY = {f"greedy@{fraction:g}" for fraction in (0.2, 0.35, 0.5, 0.7)}


def test_bisection_finds_the_cheapest_feasible_greedy_allocation(trained, tmp_path: Path) -> None:
    model, val = trained
    # Ranks in steps of 2 give the greedy family points between the fixed fractions to find.
    result = search(model, val, budget="1%", run_dir=str(tmp_path), multiple=2, **{**FAST, "n_trials": 30})
    study = _study(result)
    greedy = _greedy_trials(study)
    probes = [t for t in greedy if t.user_attrs["warm_start"] not in FIXED_GREEDY]
    assert probes, "the bisection must probe between the fixed fractions"
    # Probes run right after the fixed warm starts, before the sampler's own trials.
    labelled = [t.number for t in study.trials if "warm_start" in t.user_attrs]
    assert labelled == list(range(len(labelled))) and probes[0].number > max(
        t.number for t in study.trials if t.user_attrs.get("warm_start") in FIXED_GREEDY)
    fraction = {t.number: float(t.user_attrs["warm_start"].removeprefix("greedy@")) for t in greedy}
    feasible = [fraction[t.number] for t in greedy if t.user_attrs.get("feasible")]
    infeasible = [fraction[t.number] for t in greedy if not t.user_attrs.get("feasible")]
    assert feasible and infeasible and max(infeasible) < min(feasible)  # bracketed the boundary
    fixed_best = min(t.user_attrs["macs"] for t in greedy
                     if t.user_attrs["warm_start"] in FIXED_GREEDY and t.user_attrs.get("feasible"))
    found = min(t.user_attrs["macs"] for t in probes if t.user_attrs.get("feasible"))
    assert found < fixed_best  # cheaper than any fixed fraction that met the budget
    assert result.best is not None and result.best.macs <= found
    assert len(study.trials) == 30


def test_a_resumed_study_reuses_its_probes_and_other_workers_do_not_probe(trained, tmp_path: Path) -> None:
    model, val = trained
    first = search(model, val, budget="1%", run_dir=str(tmp_path), multiple=2, **{**FAST, "n_trials": 30})
    labels = [t.user_attrs["warm_start"] for t in _greedy_trials(_study(first))]
    assert set(labels) - FIXED_GREEDY
    second = search(model, val, budget="1%", run_dir=str(tmp_path), multiple=2, **{**FAST, "n_trials": 34})
    assert [t.user_attrs["warm_start"] for t in _greedy_trials(_study(second))] == labels
    other = search(model, val, budget="1%", run_dir=str(tmp_path / "w1"), worker_index=1, multiple=2,
                   **{**FAST, "n_trials": 20})
    assert {t.user_attrs["warm_start"] for t in _greedy_trials(_study(other))} <= FIXED_GREEDY


def test_several_deployment_batch_sizes_get_one_table_each(trained, tmp_path: Path, monkeypatch) -> None:
    """batch_size=(1, 128): a table per size, and the objective is their weighted relative latency."""
    model, val = trained
    sizes: list[int] = []

    def fake_build(decomposition, *args, batch_size, **kwargs):
        sizes.append(batch_size)
        table = _table(model, slow_layer="2" if batch_size == 1 else "none")
        return LatencyTable(**{**table.__dict__, "batch_size": batch_size})

    monkeypatch.setattr(study_module, "build_latency_table", fake_build)
    result = search(model, val, budget="1%", run_dir=str(tmp_path),
                    **{**FAST, "objective": "latency", "n_trials": 4, "batch_size": [1, 128],
                       "batch_weights": [1.0, 3.0]})
    assert sizes == [1, 128]
    deployment = result.latency_table
    assert deployment.batch_sizes == (1, 128) and deployment.weights == (1.0, 3.0)
    best = result.best
    plan = {name: (best.schemes[name], rank) for name, rank in best.ranks.items()}
    each = deployment.predict_each(plan)
    expected = (0.25 * each[1] / deployment.tables[0].dense_model
                + 0.75 * each[128] / deployment.tables[1].dense_model) * deployment.dense_model
    assert best.latency == pytest.approx(expected)
    # A rebuild with the same sizes reuses both tables from the run folder.
    search(model, val, budget="1%", run_dir=str(tmp_path / "again"), **{**FAST, "objective": "latency",
                                                                          "n_trials": 2, "batch_size": [1, 128]})
    assert sizes == [1, 128, 1, 128]  # another run folder: measured again
