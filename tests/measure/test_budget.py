"""Budget parsing: every accepted spelling, every rejected one, relative mode and the 0.5 warning."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest

from lrsearch._errors import BudgetError, LrSearchError
from lrsearch.measure._budget import Budget, parse_budget

GOOD = [
    ("0.5%", 0.005),
    ("0.5 %", 0.005),
    ("  1%  ", 0.01),
    (".5%", 0.005),
    ("0%", 0.0),
    ("99.9%", 0.999),
    ("0.005", 0.005),
    ("1e-3", 0.001),
    (0.005, 0.005),
    (0, 0.0),
    (0.1, 0.1),
    (np.float32(0.01), 0.01),
]

BAD = [
    (-0.01, "negative"),
    ("-0.5%", "negative"),
    (math.nan, "not finite"),
    ("nan", "not finite"),
    (math.inf, "not finite"),
    (-math.inf, "not finite"),
    ("inf%", "not finite"),
    ("100%", "100% or more"),
    ("250%", "100% or more"),
    (1.0, "100% or more"),
    (1, "100% or more"),
    ("1", "100% or more"),
    ("", "empty"),
    ("   ", "empty"),
    ("abc", "not a number"),
    ("5%%", "not a number"),
    ("1e", "not a number"),
    ("%", "not a number"),
    ("0.5%x", "not a number"),
    ("1_0%", "not a number"),
    (True, "wrong type"),
    (False, "wrong type"),
    (None, "wrong type"),
    ([0.5], "wrong type"),
    (b"0.5%", "wrong type"),
]


@pytest.mark.parametrize(("spec", "drop"), GOOD, ids=[repr(spec) for spec, _ in GOOD])
def test_good_budgets_parse_to_a_fraction(spec: object, drop: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        budget = parse_budget(spec)  # type: ignore[arg-type]
    assert budget.drop == pytest.approx(drop) and isinstance(budget.drop, float)
    assert budget.relative is False


@pytest.mark.parametrize(("spec", "problem"), BAD, ids=[repr(spec) for spec, _ in BAD])
def test_bad_budgets_raise_a_typed_error_with_an_example(spec: object, problem: str) -> None:
    with pytest.raises(BudgetError, match=problem) as caught:
        parse_budget(spec)  # type: ignore[arg-type]
    message = str(caught.value)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, LrSearchError)
    assert repr(spec) in message
    assert 'budget="0.5%"' in message or "HINT" in message


@pytest.mark.parametrize("spec", [5, "5", 1.0], ids=repr)
def test_a_plain_number_of_one_or_more_suggests_the_percentage(spec: object) -> None:
    with pytest.raises(BudgetError, match=r'did you mean budget="\d+%"'):
        parse_budget(spec)  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", [0.5, "0.5", 0.11], ids=repr)
def test_a_large_fraction_is_accepted_with_a_warning(spec: object) -> None:
    with pytest.warns(UserWarning, match=r'budget="0\.\d+%"'):
        budget = parse_budget(spec)  # type: ignore[arg-type]
    assert budget.drop == float(spec)  # type: ignore[arg-type]


def test_a_large_percentage_is_explicit_and_not_warned_about() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_budget("50%").drop == 0.5
        assert parse_budget(Budget(0.5)).drop == 0.5


def test_absolute_budget_ignores_the_baseline() -> None:
    budget = parse_budget("0.5%")
    assert budget.allowed_drop(0.9) == budget.allowed_drop(0.3) == 0.005
    assert str(budget) == "0.5%"
    assert budget.to_dict() == {"drop": 0.005, "relative": False}


def test_relative_budget_is_a_fraction_of_the_baseline() -> None:
    budget = parse_budget("0.5%", relative=True)
    assert budget.allowed_drop(0.9) == pytest.approx(0.0045)
    assert str(budget) == "0.5% of baseline"
    assert budget.to_dict() == {"drop": 0.005, "relative": True}


def test_zero_budget_tolerates_no_drop() -> None:
    assert parse_budget(0).allowed_drop(0.9) == 0.0
    assert parse_budget("0%", relative=True).allowed_drop(0.9) == 0.0


def test_a_budget_passes_through_when_the_flag_agrees() -> None:
    assert parse_budget(Budget(0.01)) == Budget(0.01)
    assert parse_budget(Budget(0.01, relative=True), relative=True) == Budget(0.01, relative=True)


@pytest.mark.parametrize("given_relative", [True, False])
def test_a_budget_with_the_other_flag_is_rejected(given_relative: bool) -> None:
    with pytest.raises(BudgetError, match="disagree") as caught:
        parse_budget(Budget(0.01, relative=given_relative), relative=not given_relative)
    assert "HINT" in str(caught.value)


def test_a_hand_built_budget_is_still_validated() -> None:
    with pytest.raises(BudgetError, match="negative"):
        parse_budget(Budget(-0.01))


def test_budget_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        parse_budget("1%").drop = 0.5  # type: ignore[misc]
