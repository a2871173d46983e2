"""``SearchConfig``: every option of a rank search in one validated, serializable dataclass."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from lrsearch.core._decomposition import METHODS
from lrsearch.measure import REDUCTIONS, Budget, parse_budget
from lrsearch.study._objective import OBJECTIVES

__all__ = ["SAMPLERS", "SearchConfig"]

SAMPLERS = ("tpe", "gp", "random", "nsga2")


@dataclass(frozen=True)
class SearchConfig:
    """Options of :func:`lrsearch.search`; unknown names are rejected, values checked by name.

    Attributes:
        budget: allowed accuracy drop, ``"0.5%"`` or ``0.005`` (see :func:`parse_budget`).
        relative_budget: the budget is a fraction of the baseline instead of absolute.
        objective: ``"latency"`` (measured per-layer table), ``"macs"`` or ``"params"``.
        two_objectives: minimize (objective, drop) jointly and keep a Pareto front.
        n_trials: total trials of the study, across resumes and workers.
        timeout: seconds this process searches at most.
        sampler: ``"tpe"`` (default), ``"gp"`` (needs scipy), ``"random"`` or ``"nsga2"``.
        seed: base sampler seed; a worker uses ``seed + worker_index``.
        storage: Optuna storage URL; default a SQLite file in ``run_dir``.
        study_name: resuming uses the same name.
        heartbeat_interval: seconds between a running trial's heartbeats on an RDB storage; a
            trial silent for twice this long (its worker was killed) is failed and retried once
            by the next worker. Journal files have no heartbeats (see ``fail_stale_trials``).
        run_dir: folder for the study database, the latency table and results.
        method: ``"whitened"`` or ``"svd"`` decomposition.
        multiple: candidate ranks are multiples of this (8 suits AVX2 and tensor cores).
        device: where latency is measured (``"cpu"``, ``"cuda"``, ...).
        threads: CPU threads for latency measurement; default torch's current setting.
        batch_size: deployment batch size for latency, or several (e.g. ``[1, 256]``): each gets
            its own latency table; default the first batch's size.
        batch_weights: with several batch sizes, the weight of each in the objective (default equal).
        latency_reduce: with several batch sizes, the objective is the weighted ``"mean"`` of the
            relative latencies (compressed / dense at each size) or their worst case, ``"max"``.
        warm_start: enqueue analytic allocations before sampling.
        early_abort: stop evaluating a trial once it cannot meet the budget.
        higher_is_better: the metric improves upward (accuracy); False for a loss.
        latency_min_run_time, latency_repeats: measurement effort per table entry.
    """

    budget: str | float | Budget = "0.5%"
    relative_budget: bool = False
    objective: str = "latency"
    two_objectives: bool = False
    n_trials: int = 100
    timeout: float | None = None
    sampler: str = "tpe"
    seed: int = 0
    worker_index: int = 0
    storage: str | None = None
    study_name: str = "lrsearch"
    heartbeat_interval: int = 60
    run_dir: str = "lrsearch-run"
    method: str = "whitened"
    multiple: int = 8
    device: str = "cpu"
    threads: int | None = None
    batch_size: int | tuple[int, ...] | None = None
    batch_weights: tuple[float, ...] | None = None
    latency_reduce: str = "mean"
    warm_start: bool = True
    early_abort: bool = True
    higher_is_better: bool = True
    latency_min_run_time: float = 0.05
    latency_repeats: int = 5

    def __post_init__(self) -> None:
        parse_budget(self.budget, relative=self.relative_budget)
        _choice("objective", self.objective, OBJECTIVES)
        _choice("sampler", self.sampler, SAMPLERS)
        _choice("method", self.method, METHODS)
        for name in ("n_trials", "multiple", "latency_repeats", "heartbeat_interval"):
            _at_least(name, getattr(self, name), 1)
        for name in ("seed", "worker_index"):
            _at_least(name, getattr(self, name), 0)
        if self.threads is not None:
            _at_least("threads", self.threads, 1)
        if self.batch_size is not None:
            sizes = (self.batch_size,) if isinstance(self.batch_size, int) else tuple(self.batch_size)
            for size in sizes:
                _at_least("batch_size", size, 1)
            if not sizes or len(set(sizes)) != len(sizes):
                raise ValueError(f"batch_size must be one size or distinct sizes but got {self.batch_size!r}.")
            object.__setattr__(self, "batch_size", sizes[0] if len(sizes) == 1 else sizes)
        if self.batch_weights is not None:
            weights = tuple(self.batch_weights)
            if len(weights) != len(self.batch_sizes) or not all(
                    isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0
                    for w in weights):
                raise ValueError(f"batch_weights must be one positive weight per batch size {list(self.batch_sizes)} "
                                 f"but got {self.batch_weights!r}.")
            object.__setattr__(self, "batch_weights", weights)
        _choice("latency_reduce", self.latency_reduce, REDUCTIONS)
        if self.timeout is not None and not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds or None but got {self.timeout!r}.")
        if not (isinstance(self.latency_min_run_time, (int, float)) and math.isfinite(self.latency_min_run_time)
                and self.latency_min_run_time > 0):
            raise ValueError(f"latency_min_run_time must be positive but got {self.latency_min_run_time!r}.")
        if not self.study_name:
            raise ValueError("study_name must not be empty.")

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The deployment batch sizes, empty when the first batch's size is to be used."""
        if self.batch_size is None:
            return ()
        return (self.batch_size,) if isinstance(self.batch_size, int) else tuple(self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["budget"] = str(self.budget) if isinstance(self.budget, Budget) else self.budget
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TypeError(f"unknown search option(s) {unknown}; known options are {sorted(known)}.")
        return cls(**data)


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)} but got {value!r}.")


def _at_least(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer of at least {low} but got {value!r}.")
