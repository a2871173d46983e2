"""Analytic rank allocations that cost no evaluation, enqueued before the sampler takes over.

With whitened factors, ``σ_i²/Σσ²`` is component i's exact share of a layer's output energy,
so spending a cost budget on the components with the most energy per unit of cost is a strong
zero-evaluation allocation (algorithms.md §4). Energy thresholds and a ladder of uniform ranks
add the allocations a user would try by hand. Once those are scored, :class:`GreedyBisection`
narrows the greedy family down to its cheapest allocation within the budget: the fixed
fractions sample the cost axis too coarsely for a tight budget, and on a model with dozens of
layers the sampler alone rarely finds that point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from lrsearch.core import DENSE, Decomposition
from lrsearch.study._space import Choice, SearchSpace, ladder_ranks

__all__ = ["GreedyBisection", "UNIFORM", "energy_allocation", "greedy_allocation", "kept_energy",
           "uniform_allocation", "uniform_ranks", "warm_starts"]

GREEDY = "greedy@"
UNIFORM = "uniform@"

CostFn = Callable[[str, Choice], float]
KeptEnergy = Mapping[str, Mapping[Choice, float]]


def kept_energy(decomposition: Decomposition, space: SearchSpace) -> KeptEnergy:
    """For every layer and choice, the share of the layer's output energy the choice keeps."""
    kept: dict[str, dict[Choice, float]] = {}
    for name, layer in space.layers.items():
        kept[name] = {DENSE: 1.0}
        for choice, (scheme, rank) in layer.options.items():
            energy = decomposition.singular_values(name, scheme).double().square()
            cumulative = energy.cumsum(0) / energy.sum().clamp_min(torch.finfo(torch.float64).tiny)
            kept[name][choice] = float(cumulative[min(rank, cumulative.numel()) - 1])
    return kept


def greedy_allocation(space: SearchSpace, kept: KeptEnergy, cost: CostFn, *,
                      fraction: float) -> dict[str, Choice]:
    """Spend ``fraction`` of the searchable layers' dense cost on the steps with most energy per cost."""
    state = {name: 0 for name in space.layers}
    choices = {name: layer.choices for name, layer in space.layers.items()}
    target = fraction * sum(cost(name, DENSE) for name in choices)
    total = sum(cost(name, choices[name][0]) for name in choices)
    while True:
        best: tuple[float, str, float] | None = None
        for name, index in state.items():
            if index + 1 >= len(choices[name]):
                continue
            here, there = choices[name][index], choices[name][index + 1]
            extra = cost(name, there) - cost(name, here)
            if total + extra > target:
                continue
            gain = kept[name][there] - kept[name][here]
            ratio = float("inf") if extra <= 0 else gain / extra
            if best is None or ratio > best[0]:
                best = (ratio, name, extra)
        if best is None:
            break
        _, name, extra = best
        state[name] += 1
        total += extra
    return {name: choices[name][index] for name, index in state.items()}


def energy_allocation(space: SearchSpace, kept: KeptEnergy, *, threshold: float) -> dict[str, Choice]:
    """Each layer's smallest choice that keeps ``threshold`` of its output energy."""
    allocation: dict[str, Choice] = {}
    for name, layer in space.layers.items():
        allocation[name] = next((choice for choice in layer.choices
                                 if kept[name][choice] >= threshold), DENSE)
    return allocation


def uniform_ranks(space: SearchSpace) -> list[int]:
    """The uniform ladder of ``space`` (:func:`ladder_ranks` on its grid), up to the largest rank any layer can take."""
    ranks = sorted({rank for layer in space.layers.values() for _, rank in layer.options.values()})
    return ladder_ranks(math.gcd(*ranks), ranks[-1]) if ranks else []


def uniform_allocation(space: SearchSpace, *, rank: int) -> dict[str, Choice]:
    """Every layer at rank ``rank`` or the next choice above it; dense where no choice reaches it.

    Rounding up keeps every layer's bottleneck at least ``rank`` wide: after fine-tuning, the
    narrowest layer bounds what a factorized network can recover.
    """
    return {name: layer.nearest(rank) for name, layer in space.layers.items()}


def warm_starts(decomposition: Decomposition, space: SearchSpace, cost: CostFn, *,
                greedy_fractions: Sequence[float] = (0.2, 0.35, 0.5, 0.7),
                energy_thresholds: Sequence[float] = (0.95, 0.99, 0.995, 0.999)) -> list[tuple[str, dict[str, Choice]]]:
    """Labelled allocations, cheapest-first within each family, without duplicates.

    The uniform family is the whole ladder of :func:`uniform_ranks`, labelled ``uniform@RANK``:
    the selection after the search fine-tunes along it (``SearchResult.uniform``).
    """
    kept = kept_energy(decomposition, space)
    candidates = [(f"{GREEDY}{f:g}", greedy_allocation(space, kept, cost, fraction=f))
                  for f in greedy_fractions]
    candidates += [(f"energy@{t:g}", energy_allocation(space, kept, threshold=t))
                   for t in energy_thresholds]
    candidates += [(f"{UNIFORM}{rank}", uniform_allocation(space, rank=rank)) for rank in uniform_ranks(space)]
    seen: set[tuple[tuple[str, str], ...]] = set()
    unique: list[tuple[str, dict[str, Choice]]] = []
    for label, allocation in candidates:
        key = SearchSpace.key(allocation)
        if key not in seen:
            seen.add(key)
            unique.append((label, allocation))
    return unique


class GreedyBisection:
    """The smallest greedy cost fraction whose allocation meets the budget, found by bisection.

    ``observe`` every scored greedy allocation (fixed warm starts and probes alike, also those a
    resumed study already holds); ``probe`` then names the next fraction to score, or ``None``
    once the bracket is narrower than ``resolution`` or its midpoint gives an allocation
    already scored. Fraction 1 (everything dense) is taken to be feasible and 0 infeasible.
    """

    def __init__(self, space: SearchSpace, kept: KeptEnergy, cost: CostFn, *, resolution: float = 1 / 64) -> None:
        self.space, self.kept, self.cost, self.resolution = space, kept, cost, resolution
        self.low, self.high = 0.0, 1.0
        self.scored: set[tuple[tuple[str, str], ...]] = set()

    def observe(self, fraction: float, allocation: Mapping[str, Choice], feasible: bool) -> None:
        self.scored.add(SearchSpace.key(allocation))
        if feasible:
            self.high = min(self.high, fraction)
        else:
            self.low = max(self.low, fraction)

    def probe(self) -> tuple[float, dict[str, Choice]] | None:
        if self.high - self.low < self.resolution:  # also when the observations cross
            return None
        fraction = (self.low + self.high) / 2
        allocation = greedy_allocation(self.space, self.kept, self.cost, fraction=fraction)
        if SearchSpace.key(allocation) in self.scored:
            return None
        return fraction, allocation
