"""The Optuna objective: one trial = build a candidate from cached factors, score it, evaluate it.

The accuracy drop is a hard constraint (``trial.set_constraint``), always recorded before any
early exit. optuna-dashboard 0.21 cannot read Optuna 5's named constraints, so the value is also
written where the dashboard reads it (the old list-valued trial system attr ``constraints``) and
as user attributes (``drop``, ``feasible``). Identical configurations reuse the first result
instead of being evaluated again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from lrsearch.core import Decomposition, dense_cost, factorized_cost
from lrsearch.measure import DeploymentLatency, Evaluation, Evaluator
from lrsearch.study._abort import drop_is_hopeless
from lrsearch.study._space import SearchSpace

__all__ = ["CONSTRAINT", "Objective", "PlanCosts"]

CONSTRAINT = "accuracy_drop_over_budget"
DASHBOARD_CONSTRAINTS = "constraints"  # the trial system attr optuna-dashboard 0.21 shows
OBJECTIVES = ("latency", "macs", "params")
_OWN_ATTRS = frozenset({"warm_start", "duplicate_of"})  # describe a trial, not its configuration


@dataclass(frozen=True)
class PlanCosts:
    """Whole-model parameters, MACs per sample and predicted latency for any plan."""

    decomposition: Decomposition
    dense_params: int
    dense_macs: int
    table: DeploymentLatency | None

    def __call__(self, plan: Mapping[str, tuple[str, Any]]) -> dict[str, float]:
        params, macs = self.dense_params, self.dense_macs
        for name, (scheme, rank) in plan.items():
            geometry = self.decomposition.geometry(name)
            dense, low = dense_cost(geometry), factorized_cost(geometry, rank, scheme)
            params += low.params - dense.params
            macs += (low.macs or 0) - (dense.macs or 0)
        figures: dict[str, float] = {"params": float(params), "macs": float(macs)}
        if self.table is not None:
            figures["latency"] = self.table.predict(plan)
        return figures

    def dense_layer(self, name: str, objective: str) -> float:
        """What the dense layer ``name`` alone costs per forward, in the objective's unit."""
        if objective == "latency":
            assert self.table is not None, "objective='latency' is checked to come with a table"
            return self.table.dense_layer(name)
        cost = dense_cost(self.decomposition.geometry(name))
        return float(cost.params if objective == "params" else (cost.macs or 0))


class Objective:
    """Callable for ``study.optimize``; returns the cost objective (and the drop, if two objectives)."""

    def __init__(self, *, decomposition: Decomposition, space: SearchSpace, evaluator: Evaluator,
                 baseline: Evaluation, allowed_drop: float, costs: PlanCosts, objective: str = "latency",
                 two_objectives: bool = False, higher_is_better: bool = True,
                 early_abort: bool = True, chunk_batches: int = 1) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)} but got {objective!r}.")
        if objective == "latency" and costs.table is None:
            raise ValueError("objective='latency' needs a latency table.")
        self.decomposition, self.space, self.evaluator = decomposition, space, evaluator
        self.baseline, self.allowed_drop, self.costs = baseline, allowed_drop, costs
        self.objective, self.two_objectives = objective, two_objectives
        self.higher_is_better, self.early_abort, self.chunk_batches = higher_is_better, early_abort, chunk_batches

    def _drop(self, value: float) -> float:
        return self.baseline.value - value if self.higher_is_better else value - self.baseline.value

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        params = {name: trial.suggest_categorical(name, distribution.choices)
                  for name, distribution in self.space.distributions().items()}
        twin = self._finished_twin(trial, params)
        if twin is not None:
            return self._replay(trial, twin)
        plan = self.space.plan(params)
        figures = self.costs(plan)
        trial.set_user_attr("ranks", {name: (rank if isinstance(rank, int) else list(rank))
                                      for name, (_, rank) in plan.items()})
        trial.set_user_attr("schemes", {name: scheme for name, (scheme, _) in plan.items()})
        for key, value in figures.items():
            trial.set_user_attr(key, value)
        model = self.decomposition.build({name: rank for name, (_, rank) in plan.items()},
                                         schemes={name: scheme for name, (scheme, _) in plan.items()})
        result: Evaluation | None = None
        for result in self.evaluator.iter_chunks(model, chunk_batches=self.chunk_batches):
            if (self.early_abort and result.correct is not None and self.baseline.correct is not None
                    and result.samples < self.baseline.samples
                    and drop_is_hopeless(self.baseline.correct, result.correct, self.allowed_drop)):
                drop = float(self.baseline.correct[:result.samples].double().mean()
                             - result.correct.double().mean())
                self._record(trial, value=float("nan"), drop=drop, samples=result.samples, aborted=True)
                raise optuna.TrialPruned(f"accuracy drop {drop:.4f} exceeds the budget "
                                         f"{self.allowed_drop:.4f} after {result.samples} samples")
        assert result is not None, "the evaluator yields at least one chunk"
        drop = self._drop(result.value)
        if not math.isfinite(drop):
            trial.set_user_attr("error", "the candidate's metric is not finite")
            return (float("nan"), float("nan")) if self.two_objectives else float("nan")
        self._record(trial, value=result.value, drop=drop, samples=result.samples, aborted=False)
        cost = figures[self.objective]
        return (cost, drop) if self.two_objectives else cost

    def _record(self, trial: optuna.Trial, *, value: float, drop: float, samples: int, aborted: bool) -> None:
        _constrain(trial, drop - self.allowed_drop)
        trial.set_user_attr("metric", value)
        trial.set_user_attr("drop", drop)
        trial.set_user_attr("feasible", drop <= self.allowed_drop)
        trial.set_user_attr("evaluated_samples", samples)
        trial.set_user_attr("aborted", aborted)

    @staticmethod
    def _finished_twin(trial: optuna.Trial, params: Mapping[str, Any]) -> FrozenTrial | None:
        key = SearchSpace.key(params)
        for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            if other.number != trial.number and SearchSpace.key(other.params) == key:
                return other
        return None

    def _replay(self, trial: optuna.Trial, twin: FrozenTrial) -> float | tuple[float, float]:
        if CONSTRAINT in twin.constraints:
            _constrain(trial, twin.constraints[CONSTRAINT])
        for key, value in twin.user_attrs.items():
            if key not in _OWN_ATTRS:
                trial.set_user_attr(key, value)
        trial.set_user_attr("duplicate_of", twin.number)
        if twin.state == TrialState.PRUNED:
            raise optuna.TrialPruned(f"same configuration as trial {twin.number}, which was pruned")
        values = twin.values
        return (values[0], values[1]) if self.two_objectives else values[0]


def _constrain(trial: optuna.Trial, value: float) -> None:
    """Set the drop constraint, and mirror it where optuna-dashboard 0.21 looks for constraints.

    Optuna reads the mirror too (as a second constraint ``"0"`` of the same value): feasibility
    is unchanged, and TPE and NSGA-II rank violations the same; GPSampler models it twice.
    """
    trial.set_constraint(CONSTRAINT, value)
    trial.storage.set_trial_system_attr(trial._trial_id, DASHBOARD_CONSTRAINTS, [value])
