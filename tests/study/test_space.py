"""The rank parameters: ordered as ranks wherever the dashboard sorts them, same configurations as before."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution

import torch

from lrsearch.core import Decomposition
from lrsearch.study import LayerSpace, SearchSpace, param_name
from lrsearch.study._space import ladder_ranks

RANKS = (8, 16, 24, 40, 96, 104, 120, 248)  # gaps, as the measured-faster filter leaves them


def layer(name: str, ranks: tuple[int, ...] = RANKS, *, scheme: str = "linear", tagged: bool = False) -> LayerSpace:
    options = {(f"{scheme}:{r}" if tagged else r): (scheme, r) for r in ranks}
    return LayerSpace(name, (*options, "dense"), options)


SPACE = SearchSpace(layers={"fc1": layer("fc1"), "fc2": layer("fc2", (8, 16, 32))})


def test_values_sort_as_text_in_rank_order_with_dense_last() -> None:
    values = SPACE.layers["fc1"].values
    assert values == ("008", "016", "024", "040", "096", "104", "120", "248", "dense")
    assert sorted(values, key=str.lower) == list(values)  # how optuna-dashboard orders a categorical axis
    assert sorted(map(str, SPACE.layers["fc1"].choices), key=str.lower) != list(map(str, RANKS)) + ["dense"]
    assert SPACE.layers["fc2"].values == ("08", "16", "32", "dense")


def test_multi_scheme_choices_are_padded_within_their_scheme() -> None:
    tagged = layer("conv", (8, 16, 120), scheme="channel", tagged=True)
    assert tagged.values == ("channel:008", "channel:016", "channel:120", "dense")
    assert tagged.decode(tagged.choice_of("channel:016")) == ("channel", 16)


def test_params_allocation_and_plan_cover_exactly_the_same_configurations() -> None:
    for choice in SPACE.layers["fc1"].choices:
        allocation = {"fc1": choice, "fc2": 16}
        params = SPACE.params(allocation)
        assert SPACE.allocation(params) == allocation
        expected = {"fc2": ("linear", 16)} | ({} if choice == "dense" else {"fc1": ("linear", choice)})
        assert SPACE.plan(params) == expected
    assert SPACE.params({}) == {param_name("fc1"): "dense", param_name("fc2"): "dense"}
    distributions = SPACE.distributions()
    assert [len(d.choices) for d in distributions.values()] == [len(RANKS) + 1, 4]


def _sampled(space: SearchSpace, *, seed: int) -> list[dict[str, object]]:
    """Allocations a seeded TPE study proposes over ``space`` for a cost that only depends on the ranks."""
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=4))
    allocations = []

    def objective(trial: optuna.Trial) -> float:
        params = {name: trial.suggest_categorical(name, d.choices) for name, d in space.distributions().items()}
        allocations.append(space.allocation(params))
        return sum(rank for _, rank in space.plan(params).values()) + 300.0 * (len(space.plan(params)) < 2)

    study.optimize(objective, n_trials=12)
    return allocations


def test_the_sampler_proposes_the_same_allocations_as_with_plain_integers() -> None:
    plain = SearchSpace(layers={name: LayerSpace(lay.name, lay.choices, lay.options, plain=True)
                                for name, lay in SPACE.layers.items()})
    assert plain.layers["fc1"].values == (*RANKS, "dense")
    assert _sampled(SPACE, seed=1) == _sampled(plain, seed=1)


def _finished(study: optuna.Study, value: object) -> None:
    distribution = CategoricalDistribution([*RANKS, "dense"] if isinstance(value, int) else SPACE.layers["fc1"].values)
    study.add_trial(optuna.trial.create_trial(params={param_name("fc1"): value},
                                              distributions={param_name("fc1"): distribution}, value=1.0))


@pytest.mark.parametrize(("stored", "plain"), [(16, True), ("016", False)])
def test_a_resumed_study_keeps_the_encoding_it_began_with(stored: object, plain: bool) -> None:
    study = optuna.create_study()
    _finished(study, stored)
    matched = SPACE.matching(study.get_trials(deepcopy=False))
    assert matched.layers["fc1"].plain is plain
    assert matched.layers["fc2"].plain is False  # no trial says how fc2 is stored: the current encoding
    trial = study.ask()  # the next trial's parameter is accepted by Optuna (same categorical as stored)
    value = trial.suggest_categorical(param_name("fc1"), matched.distributions()[param_name("fc1")].choices)
    assert matched.layers["fc1"].choice_of(value) in RANKS + ("dense",)


def test_an_enqueued_plain_choice_keeps_the_study_plain() -> None:
    study = optuna.create_study()
    study.enqueue_trial({param_name("fc1"): "dense", param_name("fc2"): "dense"})
    study.enqueue_trial({param_name("fc1"): 24})
    matched = SPACE.matching(study.get_trials(deepcopy=False))
    assert matched.layers["fc1"].plain is True and matched.layers["fc2"].plain is False
    assert matched.params({"fc1": 24}) == {param_name("fc1"): 24, param_name("fc2"): "dense"}


def test_a_layer_keeps_the_ladders_ranks_the_latency_table_found_no_faster() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 512), torch.nn.ReLU(), torch.nn.Linear(512, 64))
    decomposition = Decomposition(model, method="svd")
    faster = {"0": {8, 16}, "2": set()}  # layer 2: nothing is faster, so it is not searched at all
    space = SearchSpace.build(decomposition, multiple=8, is_faster=lambda name, _scheme, rank: rank in faster[name])
    ranks = sorted(rank for _, rank in space.layers["0"].options.values())
    # 40 -> 512 breaks even at rank 37: the faster 8 and 16, and the rungs 24 and 32 measured no faster.
    assert ranks == [8, 16, 24, 32]
    assert "2" not in space.layers and "faster" in space.fixed_dense["2"]


def test_ladder_ranks_step_up_by_about_1_4x() -> None:
    assert ladder_ranks(8, 200) == [8, 16, 24, 32, 48, 64, 96, 128, 192]
    assert ladder_ranks(16, 100) == [16, 32, 48, 64, 96]
    assert ladder_ranks(8, 7) == []
