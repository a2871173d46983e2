"""The five methods compared. Each proposes candidates that meet the search budget on the search split.

Every method gets the same search split, the same search budget and the same calibration data,
and returns its feasible configurations cheapest first (a "ladder"); the protocol
(``_protocol.py``) then fine-tunes them in order and keeps the first that holds. Rules shared by
all baselines, so that they are sensible rather than strawmen:

* a layer whose rank would not cut its MACs (rank >= break-even) stays dense;
* ranks are multiples of the task's ``multiple`` (8; 16 for MiniLM) like lrsearch's, since
  misaligned ranks run slower (algorithms notes, section 6); ranks below ``multiple`` are
  kept as they are for layers that are that small.

Methods:

1. ``uniform-svd``: one rank ``r`` for every layer (clipped to the layer's full rank), plain
   truncated SVD; the smallest feasible ``r`` (a multiple of ``multiple``) found by bisection,
   and the next ranks up, form the ladder.
2. ``uniform-whitened``: the same with whitened (data-aware) SVD.
3. ``energy``: every layer keeps the smallest rank holding a share ``e`` of its whitened output
   energy; one global ``e`` bisected (14 steps) to the smallest feasible value.
4. ``aimet-greedy``: AIMET's greedy sensitivity + bisection on whitened factors: a table of
   the metric with one layer at a time compressed to MAC ratios 1/N ... (N-1)/N, then a
   bisection over a shared score threshold, each layer taking its most aggressive ratio whose
   score is at least the threshold (dense if none).
5. ``lrsearch``: :func:`lrsearch.search` (latency objective measured on this machine, warm
   starts, TPE); its feasible Pareto set, cheapest predicted latency first.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState
from torch import nn

import lrsearch
from lrsearch.core import break_even_rank, dense_cost, factorized_cost
from lrsearch.measure import Evaluator, parse_budget
from lrsearch.study import SearchConfig

from benchmarks._tasks import Task

__all__ = ["METHODS", "Candidate", "Proposal", "propose"]

METHODS = ("uniform-svd", "uniform-whitened", "energy", "aimet-greedy", "lrsearch")
LABELS = {"uniform-svd": "uniform rank, plain SVD", "uniform-whitened": "uniform rank, whitened SVD",
          "energy": "energy threshold (whitened)", "aimet-greedy": "AIMET-style greedy (whitened)",
          "lrsearch": "lrsearch"}


@dataclass
class Candidate:
    """One feasible configuration: how to build it and what it scored on the search split."""

    label: str
    ranks: dict[str, Any]
    search_drop: float
    build: Callable[[], nn.Module]


@dataclass
class Proposal:
    """A method's ladder of candidates with the cost of finding it."""

    method: str
    candidates: list[Candidate]
    evaluations: int
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


class _Scorer:
    """Counts evaluations on the search split and returns drops against the dense model."""

    def __init__(self, task: Task, search_budget: str) -> None:
        self.evaluator = Evaluator(task.search, metric=task.metric, batch_fn=task.batch_fn)
        self.baseline = self.evaluator.evaluate(task.model).value
        self.allowed = parse_budget(search_budget).allowed_drop(self.baseline)
        self.evaluations = 0
        self.charged = 0.0  # seconds of a shared decomposition this method is charged for
        self._cache: dict[tuple[Any, ...], float] = {}

    def drop(self, decomposition: lrsearch.Decomposition, ranks: Mapping[str, Any]) -> float:
        key = (id(decomposition), tuple(sorted(ranks.items())))
        if key not in self._cache:
            self.evaluations += 1
            model = decomposition.build(dict(ranks)) if ranks else decomposition.model
            self._cache[key] = self.baseline - self.evaluator.evaluate(model).value
        return self._cache[key]


_DECOMPOSITIONS: dict[tuple[int, str], tuple[lrsearch.Decomposition, float]] = {}


def _decomposition(task: Task, scorer: _Scorer, method: str) -> lrsearch.Decomposition:
    """The task's decomposition with every layer factorized, built once per task and method.

    The baselines that use the same one share it, but each is charged the full build time
    (calibration and every layer's SVD) in its search seconds, as if it had built its own.
    """
    key = (id(task.model), method)
    if key not in _DECOMPOSITIONS:
        if any(other[0] != key[0] for other in _DECOMPOSITIONS):
            _DECOMPOSITIONS.clear()  # a new task: free the previous one's factors
        started = time.perf_counter()
        decomposition = lrsearch.Decomposition(task.model, method=method,  # type: ignore[arg-type]
                                               calibration=task.calibration, forward=task.forward)
        for name in decomposition.targets:
            decomposition.singular_values(name)
        _DECOMPOSITIONS[key] = (decomposition, time.perf_counter() - started)
        return decomposition
    decomposition, seconds = _DECOMPOSITIONS[key]
    scorer.charged += seconds
    return decomposition


def _top(decomposition: lrsearch.Decomposition, name: str) -> int:
    rank = decomposition.full_rank(name)
    return max(rank) if isinstance(rank, tuple) else int(rank)


def _align(rank: int, multiple: int, *, up: bool) -> int:
    if rank < multiple:
        return max(1, rank)
    return (math.ceil(rank / multiple) if up else rank // multiple) * multiple


def _keep(decomposition: lrsearch.Decomposition, ranks: Mapping[str, int]) -> dict[str, int]:
    """Drop layers whose rank does not cut MACs (they stay dense)."""
    return {name: rank for name, rank in ranks.items()
            if rank <= break_even_rank(decomposition.geometry(name), decomposition.scheme(name))}


def _candidate(label: str, decomposition: lrsearch.Decomposition, ranks: dict[str, int], drop: float) -> Candidate:
    return Candidate(label=label, ranks=dict(ranks), search_drop=drop,
                     build=lambda: decomposition.build(dict(ranks)) if ranks else _copy(decomposition.model))


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


# ------------------------------------------------------------------------------------ uniform
def _uniform(task: Task, scorer: _Scorer, method: str, ladder: int) -> tuple[list[Candidate], dict[str, Any]]:
    """Bisect the smallest feasible uniform rank (drop assumed monotone in r), then step up from it."""
    decomposition = _decomposition(task, scorer, method)
    top = max(_top(decomposition, name) for name in decomposition.targets)
    grid = list(range(task.multiple, top + task.multiple, task.multiple))

    def ranks_at(r: int) -> dict[str, int]:
        return _keep(decomposition, {name: min(r, _top(decomposition, name)) for name in decomposition.targets})

    low, high = -1, len(grid) - 1  # grid[high] is feasible once checked; the largest r may be all dense
    if scorer.drop(decomposition, ranks_at(grid[high])) > scorer.allowed:
        return [], {"smallest_feasible_rank": None}
    while high - low > 1:
        middle = (low + high) // 2
        if scorer.drop(decomposition, ranks_at(grid[middle])) <= scorer.allowed:
            high = middle
        else:
            low = middle
    found: list[Candidate] = []
    for r in grid[high:]:
        ranks = ranks_at(r)
        if found and ranks == found[-1].ranks:
            continue
        drop = scorer.drop(decomposition, ranks)
        if drop <= scorer.allowed:
            found.append(_candidate(f"r={r}", decomposition, ranks, drop))
        if len(found) >= ladder or not ranks:
            break
    return found, {"smallest_feasible_rank": grid[high]}


# ------------------------------------------------------------------------------------- energy
def _energy_ranks(decomposition: lrsearch.Decomposition, energy: float, multiple: int) -> dict[str, int]:
    ranks = {}
    for name in decomposition.targets:
        values = decomposition.singular_values(name).double().square()
        cumulative = (values.cumsum(0) / values.sum()).tolist()
        k = next((i + 1 for i, share in enumerate(cumulative) if share >= energy - 1e-12), len(cumulative))
        ranks[name] = min(_align(k, multiple, up=True), _top(decomposition, name))
    return _keep(decomposition, ranks)


def _energy(task: Task, scorer: _Scorer, ladder: int, steps: int = 14) -> tuple[list[Candidate], dict[str, Any]]:
    decomposition = _decomposition(task, scorer, "whitened")
    low, high = 0.0, 1.0  # high is feasible (all dense)
    feasible: dict[tuple[tuple[str, int], ...], tuple[float, float, dict[str, int]]] = {}
    for _ in range(steps):
        middle = (low + high) / 2
        ranks = _energy_ranks(decomposition, middle, task.multiple)
        drop = scorer.drop(decomposition, ranks)
        if drop <= scorer.allowed:
            high = middle
            feasible.setdefault(tuple(sorted(ranks.items())), (middle, drop, ranks))
        else:
            low = middle
    if not feasible:
        feasible[()] = (1.0, 0.0, {})
    ordered = sorted(feasible.values(), key=lambda item: _macs(decomposition, item[2]))
    return ([_candidate(f"e={e:.4f}", decomposition, ranks, drop) for e, drop, ranks in ordered[:ladder]],
            {"threshold": ordered[0][0]})


def _macs(decomposition: lrsearch.Decomposition, ranks: Mapping[str, int]) -> float:
    total = 0.0
    for name in decomposition.targets:
        geometry = decomposition.geometry(name)
        cost = factorized_cost(geometry, ranks[name], decomposition.scheme(name)) if name in ranks \
            else dense_cost(geometry)
        total += cost.macs or cost.params
    return total


# -------------------------------------------------------------------------------------- AIMET
def _rank_for_ratio(decomposition: lrsearch.Decomposition, name: str, ratio: float, multiple: int) -> int | None:
    """The largest aligned rank whose MACs are at most ``ratio`` times the dense layer's."""
    geometry, scheme = decomposition.geometry(name), decomposition.scheme(name)
    dense = dense_cost(geometry)
    budget = ratio * (dense.macs or dense.params)
    best = None
    for rank in range(1, break_even_rank(geometry, scheme) + 1):
        cost = factorized_cost(geometry, rank, scheme)
        if (cost.macs or cost.params) <= budget:
            best = rank
    if best is None:
        return None
    aligned = _align(best, multiple, up=False)
    return aligned if aligned >= 1 else None


def _aimet(task: Task, scorer: _Scorer, ladder: int) -> tuple[list[Candidate], dict[str, Any]]:
    decomposition = _decomposition(task, scorer, "whitened")
    n = task.ratios
    ratios = [i / n for i in range(1, n)]
    table: dict[str, dict[float, tuple[int, float]]] = {}
    for name in decomposition.targets:
        table[name] = {}
        for ratio in ratios:
            rank = _rank_for_ratio(decomposition, name, ratio, task.multiple)
            if rank is None or any(r == rank for r, _ in table[name].values()):
                continue
            table[name][ratio] = (rank, scorer.baseline - scorer.drop(decomposition, {name: rank}))
    scores = sorted({score for entries in table.values() for _, score in entries.values()})

    def allocation(threshold: float) -> dict[str, int]:
        ranks = {}
        for name, entries in table.items():
            fitting = [(ratio, rank) for ratio, (rank, score) in entries.items() if score >= threshold]
            if fitting:
                ranks[name] = min(fitting)[1]
        return ranks

    # Bisection over the sorted scores: index len(scores) means "above every score" (all dense).
    low, high = -1, len(scores)
    feasible: dict[tuple[tuple[str, int], ...], tuple[float, float, dict[str, int]]] = {}
    while high - low > 1:
        middle = (low + high) // 2
        ranks = allocation(scores[middle])
        drop = scorer.drop(decomposition, ranks)
        if drop <= scorer.allowed:
            high = middle
            feasible.setdefault(tuple(sorted(ranks.items())), (scores[middle], drop, ranks))
        else:
            low = middle
    if not feasible:
        feasible[()] = (math.inf, 0.0, {})
    ordered = sorted(feasible.values(), key=lambda item: _macs(decomposition, item[2]))
    return ([_candidate(f"t={t:.4f}", decomposition, ranks, drop) for t, drop, ranks in ordered[:ladder]],
            {"ratios": ratios, "table_entries": sum(len(v) for v in table.values())})


# ----------------------------------------------------------------------------------- lrsearch
def _lrsearch(task: Task, scorer: _Scorer, search_budget: str, ladder: int, threads: int,
              min_run_time: float) -> tuple[list[Candidate], int, dict[str, Any]]:
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        config = SearchConfig(budget=search_budget, n_trials=task.trials, threads=threads,
                              batch_size=task.large_batch, seed=0, multiple=task.multiple, run_dir=run_dir,
                              latency_repeats=task.table_repeats, latency_min_run_time=min_run_time)
        result = lrsearch.search(task.model, task.search, config, calibration=task.calibration,
                                 metric=task.metric, metric_name=task.metric_name, batch_fn=task.batch_fn,
                                 forward=task.forward)
        seconds = time.perf_counter() - started
        study = optuna.load_study(study_name=result.study_name, storage=result.storage)
        trials = study.get_trials(deepcopy=False)
    evaluated = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                 and "duplicate_of" not in t.user_attrs]
    first_start = min((t.datetime_start for t in trials if t.datetime_start), default=None)
    last_end = max((t.datetime_complete for t in trials if t.datetime_complete), default=None)
    trial_seconds = (last_end - first_start).total_seconds() if first_start and last_end else 0.0
    candidates = [Candidate(label=f"trial {c.trial}", ranks=dict(c.ranks), search_drop=c.drop,
                            build=(lambda c=c: result.build(c))) for c in result.pareto[:ladder]]
    details = {"trials": len(trials), "aborted": sum(1 for t in evaluated if t.user_attrs.get("aborted")),
               "duplicates": len(trials) - len(evaluated), "trial_seconds": round(trial_seconds, 1),
               "profiling_seconds": round(seconds - trial_seconds, 1),
               "predicted_speedup": (result.latency_table.dense_model / result.pareto[0].latency
                                     if result.pareto and result.latency_table and result.pareto[0].latency else None),
               "skipped_layers": result.decomposition.skipped,
               "searched_layers": len(result.space.layers), "fixed_dense": result.space.fixed_dense}
    if not candidates:
        candidates = [Candidate(label="dense (nothing feasible)", ranks={}, search_drop=0.0,
                                build=lambda: _copy(task.model))]
    return candidates, len(evaluated), details


def propose(task: Task, method: str, *, search_budget: str, ladder: int, threads: int,
            min_run_time: float) -> Proposal:
    """Run one method on ``task`` and return its ladder (never empty: dense when nothing is feasible)."""
    started = time.perf_counter()
    scorer = _Scorer(task, search_budget)
    if method == "lrsearch":
        candidates, evaluations, details = _lrsearch(task, scorer, search_budget, ladder, threads, min_run_time)
    else:
        if method == "uniform-svd":
            candidates, details = _uniform(task, scorer, "svd", ladder)
        elif method == "uniform-whitened":
            candidates, details = _uniform(task, scorer, "whitened", ladder)
        elif method == "energy":
            candidates, details = _energy(task, scorer, ladder)
        elif method == "aimet-greedy":
            candidates, details = _aimet(task, scorer, ladder)
        else:
            raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
        evaluations = scorer.evaluations
        if not candidates:
            candidates = [Candidate(label="dense (nothing feasible)", ranks={}, search_drop=0.0,
                                    build=lambda: _copy(task.model))]
    seconds = time.perf_counter() - started
    seconds += scorer.charged  # a shared decomposition built (and timed) by an earlier method
    return Proposal(method=method, candidates=candidates, evaluations=evaluations, seconds=seconds,
                    details={**details, "search_baseline": scorer.baseline, "search_allowed_drop": scorer.allowed})
