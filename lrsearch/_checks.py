"""Checks of option values, shared by every config dataclass and entry point.

One function per kind of value, each raising :class:`OptionError` with the option's name first
(``"n_trials must be an integer of at least 1 but got 0."``), so a caller that knows where the
option came from can prefix it (``search.n_trials``, ``--search.n_trials``). Torch-free, so the
command line can use it before anything heavy is imported.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from typing import Any

from lrsearch._errors import LrSearchError, format_problem

__all__ = [
    "ConflictError",
    "OptionError",
    "UnknownOptionError",
    "check_bool",
    "check_choice",
    "check_int",
    "check_positive",
    "check_unit_interval",
    "check_unknown",
    "did_you_mean",
    "is_int",
    "is_real",
]


class OptionError(LrSearchError, ValueError):
    """An option has a value outside what it accepts."""


class ConflictError(OptionError):
    """Two options say the same thing differently (two budgets, two run folders)."""


class UnknownOptionError(LrSearchError, TypeError):
    """An option name that the config does not have (often a typo)."""


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value: object, *, low: int, optional: bool = False) -> None:
    """``value`` is an integer of at least ``low`` (or None when ``optional``)."""
    if optional and value is None:
        return
    if not (is_int(value) and value >= low):  # type: ignore[operator]
        nothing = " or None" if optional else ""
        raise OptionError(f"{name} must be an integer of at least {low}{nothing} but got {value!r}.")


def check_positive(name: str, value: object, *, optional: bool = False, zero: bool = False) -> None:
    """``value`` is a positive (or, with ``zero``, non-negative) finite number, or None when ``optional``."""
    if optional and value is None:
        return
    if not (is_real(value) and (value >= 0 if zero else value > 0)):  # type: ignore[operator]
        kind = "a finite number of at least 0" if zero else "a positive finite number"
        raise OptionError(f"{name} must be {kind} but got {value!r}.")


def check_unit_interval(name: str, value: object, *, open_low: bool = False, open_high: bool = False) -> None:
    """``value`` lies in [0, 1], with either end open on request."""
    low_ok = is_real(value) and (value > 0 if open_low else value >= 0)  # type: ignore[operator]
    high_ok = is_real(value) and (value < 1 if open_high else value <= 1)  # type: ignore[operator]
    if not (low_ok and high_ok):
        interval = f"{'(' if open_low else '['}0, 1{')' if open_high else ']'}"
        raise OptionError(f"{name} must lie in {interval} but got {value!r}.")


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise OptionError(f"{name} must be True or False but got {value!r}.")


def check_choice(name: str, value: object, allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise OptionError(f"{name} must be one of {allowed} but got {value!r}{did_you_mean(value, allowed)}.")


def did_you_mean(word: object, known: Iterable[str]) -> str:
    """``"; did you mean 'n_trials'?"`` for a near miss, else nothing."""
    close = difflib.get_close_matches(str(word), list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_unknown(what: str, given: Mapping[str, Any] | Iterable[str], known: Iterable[str]) -> None:
    """Refuse names of ``given`` that are not in ``known``, suggesting the nearest one."""
    known = sorted(known)
    unknown = sorted(set(given) - set(known))
    if unknown:
        hints = "".join(did_you_mean(name, known) for name in unknown[:1])
        raise UnknownOptionError(format_problem(
            f"Unknown {what} option{'s' if len(unknown) > 1 else ''} {unknown}{hints}",
            expected=f"one of {known}"))
