"""Fine-tuning-aware selection: bisect the search's cost-vs-drop front with real fine-tunes.

The search scores candidates *before* fine-tuning, and fine-tuning recovers much of a large
drop, so the drop a candidate shows in the search says little about whether it will hold
after fine-tuning. The search therefore runs under a wide constraint and keeps its front
(feasible, non-dominated in cost and drop, cheapest first); this module finds how far along
that front fine-tuning still carries: fine-tune the middle candidate, judge it on the
selection split, then move cheaper after a success and dearer after a failure. That takes
about log2(front size) fine-tunes, and ``max_finetunes`` bounds them.

It assumes that a dearer candidate of the front (a smaller drop before fine-tuning) is at
least as likely to hold after fine-tuning; where that is false the bisection may miss a
cheaper model, never accept one that failed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Bisection", "Verdict"]

CandidateT = TypeVar("CandidateT")


@dataclass(frozen=True)
class Verdict(Generic[CandidateT]):
    """What fine-tuning one candidate gave on the selection split."""

    candidate: CandidateT
    index: int
    holds: bool


@dataclass
class Bisection(Generic[CandidateT]):
    """Find the cheapest candidate of ``front`` (cheapest first) that holds after fine-tuning.

    ``judge(candidate)`` fine-tunes a candidate and says whether it holds on the selection
    split; it is called at most ``max_finetunes`` times, never twice for one candidate.
    """

    front: Sequence[CandidateT]
    max_finetunes: int

    def __post_init__(self) -> None:
        if isinstance(self.max_finetunes, bool) or not isinstance(self.max_finetunes, int) \
                or self.max_finetunes < 1:
            raise ValueError(f"max_finetunes must be an integer of at least 1 but got {self.max_finetunes!r}.")

    def run(self, judge: Callable[[CandidateT], bool]) -> tuple[Verdict[CandidateT] | None,
                                                                 list[Verdict[CandidateT]]]:
        """The cheapest candidate that held (None if none did) and every verdict, in order."""
        low, high = 0, len(self.front) - 1  # the answer, if any, lies in [low, high]
        best: Verdict[CandidateT] | None = None
        verdicts: list[Verdict[CandidateT]] = []
        while low <= high and len(verdicts) < self.max_finetunes:
            # The last fine-tune, with nothing held yet, goes to the dearest candidate left, which is
            # the likeliest to hold: a model within the budget beats a narrower bracket.
            last = len(verdicts) == self.max_finetunes - 1
            middle = high if best is None and last else (low + high) // 2
            verdict = Verdict(self.front[middle], middle, judge(self.front[middle]))
            verdicts.append(verdict)
            if verdict.holds:
                best = verdict
                high = middle - 1
            else:
                low = middle + 1
        return best, verdicts
