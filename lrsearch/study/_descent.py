"""Descent from a fine-tuned winner: a chain of ever cheaper allocations for the selection to bisect.

The uniform-rank ladder finds the narrowest rank that every layer can share, but layers differ
in what a cut costs them after fine-tuning. On the MNIST-1D MLP (rank 32 held, rank 24 did not;
``benchmarks/allocations.py``), the third 512x512 layer alone cut to 16 held (+0.07 points after
fine-tuning), the second alone cut to 24 did not (+0.85). The drop before fine-tuning is the
proxy that orders the cuts: from plain-SVD factors (what the fine-tunes start from) the two
cuts added 0.5 and 6.4 points, and the 40-input first layer cut to 24 (+0.31 after) added 11.5,
so the third layer goes first, as fine-tuning would have it. The search's whitened factors
would put the first layer first (0.9 points added), which is why the pipeline orders by the
starting factors' drop.

So from the winner each layer is scored alone one to three ladder rungs lower (evaluated on the
search split, not fine-tuned), the moves are sorted by drop added per cost saved, and applied
one after another: a chain from the winner down in which each point cuts one layer further than
the last. Every point is scored as a trial of the study, so the dashboard shows it and a resumed
run reuses it. Bisecting the chain with fine-tunes assumes what the ladder assumes: a point
further down is no likelier to hold than one above it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from lrsearch.core import DENSE
from lrsearch.study._space import Choice, LayerSpace, SearchSpace
from lrsearch.study._warmstart import uniform_ranks

__all__ = ["DESCENT", "Move", "allocation_of", "descend", "descent_chain", "descent_moves", "moves_by_value"]

DESCENT = "descent@"  # warm-start label prefix of the trials a descent scores
MOVES_PER_LAYER = 3
MOVE_EVALUATIONS = 48  # single-layer moves scored at most: fewer rungs per layer in large models

Move = tuple[str, Choice]
Allocation = dict[str, Choice]


def _rank(layer: LayerSpace, choice: Choice) -> float:
    decoded = layer.decode(choice)
    return math.inf if decoded is None else decoded[1]


def allocation_of(space: SearchSpace, ranks: Mapping[str, object], schemes: Mapping[str, str]) -> Allocation | None:
    """The ``{layer: choice}`` of a candidate's ranks, or None if one of them is not a choice of ``space``."""
    allocation: Allocation = {}
    for name, layer in space.layers.items():
        if name not in ranks:
            allocation[name] = DENSE
            continue
        choice = next((c for c, option in layer.options.items() if option == (schemes.get(name), ranks[name])), None)
        if choice is None:
            return None
        allocation[name] = choice
    return allocation


def descent_moves(space: SearchSpace, allocation: Mapping[str, Choice]) -> list[Move]:
    """Each layer's next few ladder rungs below its choice in ``allocation`` (same scheme), nearest first.

    ``MOVES_PER_LAYER`` rungs per layer, fewer where that would exceed ``MOVE_EVALUATIONS``
    in all, but at least one.
    """
    rungs = set(uniform_ranks(space))
    depth = max(1, min(MOVES_PER_LAYER, MOVE_EVALUATIONS // max(1, len(space.layers))))
    moves: list[Move] = []
    for name, layer in space.layers.items():
        current = allocation.get(name, DENSE)
        decoded = layer.decode(current)
        lower = [choice for choice, (scheme, rank) in layer.options.items()
                 if rank in rungs and rank < _rank(layer, current) and (decoded is None or scheme == decoded[0])]
        lower.sort(key=lambda choice: -_rank(layer, choice))
        moves += [(name, choice) for choice in lower[:depth]]
    return moves


def moves_by_value(anchor_cost: float, anchor_drop: float,
                   scored: Sequence[tuple[Move, float, float] | tuple[Move, None, None]]) -> list[Move]:
    """Moves ordered by drop added per cost saved; a move that saves nothing or was infeasible is dropped.

    ``scored`` holds ``(move, cost, drop)`` of the anchor with that one move applied (``None``
    figures: infeasible). Ties go to the larger saving.
    """
    valued = [(move, (drop - anchor_drop) / (anchor_cost - cost), anchor_cost - cost)
              for move, cost, drop in scored if cost is not None and drop is not None and cost < anchor_cost]
    valued.sort(key=lambda entry: (entry[1], -entry[2]))
    return [move for move, _, _ in valued]


def descent_chain(space: SearchSpace, allocation: Mapping[str, Choice], moves: Sequence[Move]) -> list[Allocation]:
    """Apply ``moves`` in order from ``allocation``: each point cuts one layer further than the last.

    A move that would not lower its layer below where an earlier move left it is skipped.
    """
    current = dict(allocation)
    chain: list[Allocation] = []
    for name, choice in moves:
        layer = space.layers[name]
        if _rank(layer, choice) < _rank(layer, current[name]):
            current[name] = choice
            chain.append(dict(current))
    return chain


def descend(space: SearchSpace, allocation: Mapping[str, Choice], *, anchor_cost: float, anchor_drop: float,
            score: Callable[[str, Mapping[str, Choice]], tuple[float, float] | None], label: str,
            points: int, ceiling: float | None) -> list[Allocation]:
    """Up to ``points`` feasible chain points below ``allocation``, in chain order (the least cut first).

    ``score(label, allocation)`` gives ``(cost, drop)`` of a feasible allocation, None otherwise.
    The chain stops at its first infeasible point, and at the first whose drop exceeds ``ceiling``
    (the drop, before fine-tuning, of a candidate that failed after it).
    """
    moves = descent_moves(space, allocation)
    scored = []
    for name, choice in moves:
        figures = score(f"{label}:{name}={choice}", {**allocation, name: choice})
        scored.append(((name, choice), *figures) if figures else ((name, choice), None, None))
    kept: list[Allocation] = []
    for index, point in enumerate(descent_chain(space, allocation, moves_by_value(anchor_cost, anchor_drop, scored))):
        if len(kept) >= points:
            break
        figures = score(f"{label}:{index + 1}", point)
        if figures is None or (ceiling is not None and figures[1] > ceiling):
            break
        kept.append(point)
    return kept
