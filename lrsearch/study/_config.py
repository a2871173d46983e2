"""``SearchConfig``: every option of a rank search in one validated, serializable dataclass."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lrsearch._checks import (
    OptionError,
    check_bool,
    check_choice,
    check_int,
    check_positive,
    check_unknown,
    is_real,
)
from lrsearch.core._decomposition import METHODS
from lrsearch.measure import REDUCTIONS, Budget, parse_budget
from lrsearch.study._objective import OBJECTIVES
from lrsearch.study._storage import sqlite_url

__all__ = ["DEFAULT_BUDGET", "DEFAULT_SEARCH_DIR", "SAMPLERS", "STUDY_FILE", "SearchConfig"]

SAMPLERS = ("tpe", "gp", "random", "nsga2")
DEFAULT_BUDGET = "0.5%"
DEFAULT_SEARCH_DIR = "lrsearch-run"
STUDY_FILE = "study.db"


@dataclass(frozen=True)
class SearchConfig:
    """Options of a rank search (lrsearch.search, and the search step of a run); each is checked by name.

    Inside a run (:func:`lrsearch.compress`, ``RankSearch``, ``lrsearch tune``) leave ``budget``
    and ``run_dir`` unset: the run sets them from its own ``search_budget`` and ``run_dir``.

    Attributes:
        budget: allowed drop of the metric before fine-tuning, "0.5%" or 0.005; unset: 0.5% (a
            run sets it from its search_budget).
        relative_budget: budgets are fractions of the baseline metric instead of absolute drops.
        objective: what the search minimizes: latency (a per-layer table measured on this
            device), macs or params.
        two_objectives: minimize cost and drop jointly and keep a Pareto front.
        n_trials: trials of the study in total, across resumes and workers.
        timeout: seconds this process searches at most; unset: no limit.
        sampler: Optuna sampler: tpe, gp (needs scipy), random or nsga2.
        seed: sampler seed; a worker uses seed + worker_index.
        worker_index: this worker's index among workers sharing one study, so their samplers differ.
        storage: Optuna storage URL (sqlite:///PATH, postgresql://..., journal:PATH); unset: a
            SQLite file study.db in run_dir.
        study_name: the same name on the same storage resumes the study.
        heartbeat_interval: seconds between a running trial's heartbeats on an RDB storage; a trial
            silent for twice this long (its worker was killed) is failed and retried once.
        run_dir: folder of the study, the latency table and search-result.json; unset:
            lrsearch-run (a run uses RUN_DIR/search).
        method: decomposition: whitened (activation-whitened SVD) or svd.
        multiple: candidate ranks are multiples of this (8 suits AVX2 and tensor cores).
        device: where latency is measured (cpu, cuda, ...).
        threads: CPU threads for latency measurement; unset: torch's current setting.
        batch_size: deployment batch size of the latency table, or several (e.g. [1, 256]), one
            table each; unset: the size of the first search batch.
        batch_weights: with several batch sizes, the weight of each in the objective; unset: equal.
        latency_reduce: with several batch sizes, the objective is the weighted mean of the
            relative latencies (compressed / dense at each size) or their worst case, max.
        warm_start: enqueue analytic allocations (greedy, energy, uniform) before sampling.
        early_abort: stop scoring a trial once it cannot meet the budget.
        higher_is_better: the metric improves upward, like accuracy; false for a loss.
        latency_min_run_time: seconds of timing per latency-table entry and repeat.
        latency_repeats: timing repeats per latency-table entry; the minimum counts.
    """

    budget: str | float | None = None
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
    run_dir: str | None = None
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
    constraint: Budget = field(init=False, repr=False, compare=False)
    """The parsed ``budget`` (parsed here once; everything below reads this)."""

    def __post_init__(self) -> None:
        if isinstance(self.run_dir, os.PathLike):
            object.__setattr__(self, "run_dir", os.fspath(self.run_dir))
        for name in ("relative_budget", "two_objectives", "warm_start", "early_abort", "higher_is_better"):
            check_bool(name, getattr(self, name))
        budget = DEFAULT_BUDGET if self.budget is None else self.budget
        object.__setattr__(self, "constraint", parse_budget(budget, relative=self.relative_budget))
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("method", self.method, METHODS)
        check_choice("latency_reduce", self.latency_reduce, REDUCTIONS)
        for name in ("n_trials", "multiple", "latency_repeats", "heartbeat_interval"):
            check_int(name, getattr(self, name), low=1)
        for name in ("seed", "worker_index"):
            check_int(name, getattr(self, name), low=0)
        check_int("threads", self.threads, low=1, optional=True)
        check_positive("timeout", self.timeout, optional=True)
        check_positive("latency_min_run_time", self.latency_min_run_time)
        if self.batch_size is not None:
            sizes = (self.batch_size,) if isinstance(self.batch_size, int) else tuple(self.batch_size)
            for size in sizes:
                check_int("batch_size", size, low=1)
            if not sizes or len(set(sizes)) != len(sizes):
                raise OptionError(f"batch_size must be one size or distinct sizes but got {self.batch_size!r}.")
            object.__setattr__(self, "batch_size", sizes[0] if len(sizes) == 1 else sizes)
        if self.batch_weights is not None:
            weights = tuple(self.batch_weights)
            if len(weights) != len(self.batch_sizes) or not all(is_real(w) and w > 0 for w in weights):
                raise OptionError(f"batch_weights must be one positive weight per batch size "
                                  f"{list(self.batch_sizes)} but got {self.batch_weights!r}.")
            object.__setattr__(self, "batch_weights", weights)
        if not self.study_name:
            raise OptionError("study_name must not be empty.")

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The deployment batch sizes, empty when the first batch's size is to be used."""
        if self.batch_size is None:
            return ()
        return (self.batch_size,) if isinstance(self.batch_size, int) else tuple(self.batch_size)

    @property
    def folder(self) -> Path:
        """Where the study file, the latency table and the search result go."""
        return Path(DEFAULT_SEARCH_DIR if self.run_dir is None else self.run_dir)

    @property
    def storage_url(self) -> str:
        """The study's storage: ``storage``, or the SQLite file in :attr:`folder` (the one place it is made)."""
        return self.storage or sqlite_url(self.folder / STUDY_FILE)

    def drop(self, baseline: float, value: float) -> float:
        """How much ``value`` is worse than ``baseline``: a positive drop loses, whichever way the metric runs."""
        return (baseline - value) if self.higher_is_better else (value - baseline)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        if self.budget is not None:  # as a percentage, so that from_dict reads it back without a warning
            data["budget"] = f"{self.constraint.drop * 100!r}%"
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchConfig:
        check_unknown("search", data, (f.name for f in fields(cls) if f.init))
        return cls(**data)
