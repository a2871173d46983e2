"""Accuracy-drop budgets: how much top-1 accuracy (or metric) the compressed model may lose.

Users write budgets as ``"0.5%"`` (accuracy points) or ``0.005`` (a fraction); both mean the
same thing. Everything else that could be read two ways (``0.5``: half a point or fifty?) is
either rejected or warned about here, once, so the search never runs on a misread budget.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from dataclasses import dataclass

from lrsearch._errors import BudgetError, format_problem

__all__ = ["Budget", "parse_budget"]

_EXAMPLE = 'budget="0.5%" (lose at most 0.5 accuracy points) or budget=0.005'
# Fractions above this are legal but far more often a percentage written without "%".
_SUSPICIOUS_FRACTION = 0.1
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:inf|infinity|nan)",
                     re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """An allowed accuracy drop, as a fraction (``0.005`` is half an accuracy point).

    With ``relative=True`` the drop is a fraction of the baseline instead: 0.5% of a 0.9
    baseline allows 0.0045. Construct it through :func:`parse_budget`, which validates it.
    """

    drop: float
    relative: bool = False

    def allowed_drop(self, baseline: float) -> float:
        """The largest metric drop allowed below ``baseline``."""
        return self.drop * baseline if self.relative else self.drop

    def __str__(self) -> str:
        text = f"{self.drop * 100:g}%"
        return f"{text} of baseline" if self.relative else text

    def to_dict(self) -> dict[str, float | bool]:
        """Plain types only, so it fits JSON, Optuna user attributes and ``weights_only`` checkpoints."""
        return {"drop": self.drop, "relative": self.relative}


def parse_budget(spec: str | float | int | Budget, *, relative: bool = False) -> Budget:
    """Read ``"0.5%"``, ``"0.5 %"``, ``0.005`` or ``"0.005"`` as a drop of 0.005.

    ``relative=True`` makes the drop a fraction of the baseline. A :class:`Budget` passes
    through, but only if its own ``relative`` agrees, so the flag never flips silently.
    Raises :class:`~lrsearch._errors.BudgetError` for anything that is not a drop in [0, 1).
    """
    if isinstance(spec, Budget):
        if spec.relative != relative:
            raise BudgetError(format_problem(
                "The budget and the relative flag disagree",
                expected=f"a Budget with relative={relative}, or the same flag on both",
                given=f"Budget({spec.drop!r}, relative={spec.relative}) with relative={relative}",
                hint=f"pass relative={spec.relative}, or give the budget as a string like \"0.5%\""))
        return Budget(_checked(spec.drop, given=repr(spec), plain_number=False), relative)
    if isinstance(spec, str):
        text = spec.strip()
        percent = text.endswith("%")
        number = text[:-1].strip() if percent else text
        if not text or not _NUMBER.fullmatch(number):
            problem = "The budget is empty" if not text else "The budget is not a number"
            raise BudgetError(format_problem(problem, expected=_EXAMPLE, given=repr(spec),
                                             hint="write a number, optionally followed by one %"))
        value = float(number) / 100 if percent else float(number)
        return Budget(_checked(value, given=repr(spec), plain_number=not percent), relative)
    if isinstance(spec, numbers.Real) and not isinstance(spec, bool):
        return Budget(_checked(float(spec), given=repr(spec), plain_number=True), relative)
    raise BudgetError(format_problem(
        "The budget has the wrong type", expected=f"a string or a number: {_EXAMPLE}",
        given=f"{spec!r} of type {type(spec).__name__}",
        hint="a bool or None is not a budget; use 0 to allow no drop at all"))


def _checked(value: float, *, given: str, plain_number: bool) -> float:
    """``value`` if it is a finite drop in [0, 1).

    ``plain_number`` says the user wrote a bare number, which may be a percentage missing its
    "%": then a large value gets a warning (or a hint, when it is rejected).
    """
    if not math.isfinite(value):
        raise BudgetError(format_problem("The budget is not finite", expected=_EXAMPLE, given=given))
    if value < 0:
        raise BudgetError(format_problem(
            "The budget is negative", expected=f"a drop of 0 or more: {_EXAMPLE}", given=given,
            hint="the budget is how much accuracy may be lost, so write it without a minus sign"))
    if value >= 1:
        hint = (f'did you mean budget="{value:g}%"? A plain number is a fraction, so {value:g} is '
                f"{value * 100:g} accuracy points" if plain_number else "a drop of 100% or more allows anything")
        raise BudgetError(format_problem("The budget is 100% or more", expected=_EXAMPLE,
                                         given=given, hint=hint))
    if plain_number and value > _SUSPICIOUS_FRACTION:
        warnings.warn(f"budget {given} is a fraction, i.e. {value * 100:g} accuracy points; "
                      f'if you meant {value:g} points, write budget="{value:g}%"', UserWarning,
                      stacklevel=3)
    return value
