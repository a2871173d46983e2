"""Typed errors shared by every layer of lrsearch.

Each error also derives from the builtin a caller would expect (``ValueError`` or
``TypeError``), so ``except ValueError`` keeps working, while ``except LrSearchError``
catches everything lrsearch raises on purpose.
"""

from __future__ import annotations

__all__ = [
    "BudgetError",
    "CalibrationError",
    "Interrupted",
    "InvalidRankError",
    "LrSearchError",
    "NoMatchingModuleError",
    "RecipeError",
    "RunFolderInUseError",
    "StorageIOError",
    "UnknownLayerError",
    "UnsupportedLayerError",
    "format_problem",
]


class LrSearchError(Exception):
    """Base class of every error lrsearch raises for bad input."""


class NoMatchingModuleError(LrSearchError, ValueError):
    """No module of the model matched the requested target types and name patterns."""


class UnknownLayerError(LrSearchError, ValueError):
    """A rank map or recipe names a module that does not exist in the model."""


class UnsupportedLayerError(LrSearchError, TypeError):
    """A module was named explicitly but cannot be factorized correctly."""


class InvalidRankError(LrSearchError, ValueError):
    """A rank is below 1, above the layer's full rank, or of the wrong type."""


class CalibrationError(LrSearchError, ValueError):
    """Calibration data is missing, empty, or does not fit the model."""


class BudgetError(LrSearchError, ValueError):
    """An accuracy-drop budget is unparsable, negative, not finite or 100% and above."""


class RecipeError(LrSearchError, ValueError):
    """A saved model, recipe or checkpoint is corrupted, truncated or does not fit the model."""


class RunFolderInUseError(LrSearchError, RuntimeError):
    """Another live process is running in the same run folder; the message names its PID and host."""


class StorageIOError(LrSearchError, OSError):
    """Writing the study or an artifact failed (disk full, I/O error); nothing half-written is left.

    An ``OSError`` too, with the ``errno`` and ``filename`` of the failure, so ``except OSError``
    keeps working and a CLI can map it to its own exit status.
    """

    def __init__(self, message: str, *, errno: int | None = None, filename: str | None = None) -> None:
        super().__init__(message)
        self.errno, self.filename = errno, filename

    def __str__(self) -> str:
        return str(self.args[0])


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a search or a compression; the message says how to resume.

    A KeyboardInterrupt, not an LrSearchError, so that ``except Exception`` (Optuna's, Lightning's,
    a user's) never swallows it.
    """


def format_problem(problem: str, *, expected: str | None = None, given: str | None = None,
                   hint: str | None = None) -> str:
    """Build the one message shape every lrsearch error uses: problem, expected, given, hint."""
    parts = [problem.rstrip(".") + "."]
    if expected is not None:
        parts.append(f"Expected {expected}.")
    if given is not None:
        parts.append(f"Got {given}.")
    if hint is not None:
        parts.append(f"HINT: {hint}")
    return " ".join(parts)
