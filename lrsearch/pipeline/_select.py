"""Fine-tuning-aware selection: bisect with fine-tunes a uniform-rank ladder, a descent from its winner, the front.

The search scores candidates *before* fine-tuning, and fine-tuning recovers much of a large
drop, so the drop a candidate shows in the search says little about whether it will hold
after fine-tuning. Worse, it ranks them differently: the search's front favours allocations
that cut some layers very low, which approximate the original well but leave a narrow
bottleneck that fine-tuning cannot widen, while one rank for every layer recovers best for
its cost (measured on the MNIST-1D MLP, see benchmarks/README.md).

So :class:`Selection` walks one-dimensional families, each ordered most aggressive first, by
:class:`Bisection`: fine-tune the middle candidate, judge it on the selection split, then move
cheaper after a success and dearer after a failure, about log2(size) fine-tunes each.

1. The uniform-rank ladder the search scored (the hand method, bisected instead of stepped).
2. A descent from the ladder's winner (``descend``, :mod:`lrsearch.study._descent`): the layers
   that lose least before fine-tuning are cut further, one after another. Layers differ in what
   a cut costs them after fine-tuning, and the ladder gives them all the same rank.
3. The search's front (feasible, non-dominated in cost and drop), only its candidates cheaper
   than the winner so far, with the fine-tunes left.

``max_finetunes`` bounds them together. The bisection assumes a dearer candidate of a family
is at least as likely to hold; where that is false it may miss a cheaper model, never accept
one that failed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Optional, TypeVar

__all__ = ["Bisection", "Selection", "Verdict"]

CandidateT = TypeVar("CandidateT")


def _check_limit(max_finetunes: object) -> None:
    if isinstance(max_finetunes, bool) or not isinstance(max_finetunes, int) or max_finetunes < 1:
        raise ValueError(f"max_finetunes must be an integer of at least 1 but got {max_finetunes!r}.")


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
        _check_limit(self.max_finetunes)

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


Descend = Callable[[CandidateT, Optional[CandidateT], int], Sequence[CandidateT]]


@dataclass
class Selection(Generic[CandidateT]):
    """The cheapest candidate that holds: the ``uniform`` ladder, a descent from its winner, then ``front``.

    ``uniform`` is narrowest rank first, ``front`` cheapest first. The ladder gets the fine-tunes a
    full bisection of it needs, but leaves at least two of ``max_finetunes`` (when there are that
    many) for what follows. ``descend(winner, failed, points)`` gives up to ``points`` cheaper
    variants of the ladder's winner, most cut first; ``failed`` is the next narrower rung if it
    was fine-tuned and failed (its drop before fine-tuning bounds the descent), else None. A
    candidate already judged is never fine-tuned again.
    """

    uniform: Sequence[CandidateT]
    front: Sequence[CandidateT]
    cost: Callable[[CandidateT], float]
    max_finetunes: int
    descend: Descend[CandidateT] | None = None

    def __post_init__(self) -> None:
        _check_limit(self.max_finetunes)

    def run(self, judge: Callable[[CandidateT], bool]) -> tuple[Verdict[CandidateT] | None,
                                                                 list[Verdict[CandidateT]]]:
        """The cheapest candidate that held (None if none did) and every verdict, in order."""
        verdicts: list[Verdict[CandidateT]] = []
        winner: Verdict[CandidateT] | None = None
        if self.uniform:
            needed = math.ceil(math.log2(len(self.uniform) + 1))
            share = min(needed, max(1, self.max_finetunes - 2))
            winner, verdicts = Bisection(self.uniform, share).run(judge)
        judged = [verdict.candidate for verdict in verdicts]
        left = self.max_finetunes - len(verdicts)
        if winner is not None and self.descend is not None and left > 0:
            failed = next((v.candidate for v in verdicts if v.index == winner.index - 1 and not v.holds), None)
            chain = [c for c in self.descend(winner.candidate, failed, 2 ** left - 1) if c not in judged]
            if chain:
                improved, more = Bisection(chain, left).run(judge)
                verdicts += more
                judged += [verdict.candidate for verdict in more]
                winner = improved or winner
        left = self.max_finetunes - len(verdicts)
        bound = self.cost(winner.candidate) if winner is not None else math.inf
        # The ladder's own rungs are settled by its bisection: those below its winner failed or
        # lie below one that failed.
        cheaper = [candidate for candidate in self.front
                   if self.cost(candidate) < bound and candidate not in self.uniform and candidate not in judged]
        if left > 0 and cheaper:
            improved, more = Bisection(cheaper, left).run(judge)
            verdicts += more
            winner = improved or winner
        return winner, verdicts
