"""The report of a compression as one typed object: what the CLI summary and report.html both show.

:func:`build_report` scores the chosen candidate on the test split (the only time anything looks
at it), measures the original and the compressed model side by side and returns a
:class:`Report`; its :meth:`Report.to_dict` is the schema of ``report.json`` (see
:mod:`lrsearch.pipeline._report`), which every renderer reads.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from optuna import load_study
from optuna.trial import TrialState
from torch import nn

from lrsearch._version import __version__
from lrsearch.core import count_params, macs_per_sample
from lrsearch.core._runtime import ForwardFn, batch_size_of
from lrsearch.measure import (
    DeploymentLatency,
    Evaluation,
    Evaluator,
    LatencyComparison,
    compare_latency,
    paired_drop,
    paired_drop_interval,
    resize_batch,
)
from lrsearch.pipeline._data import PipelineData
from lrsearch.pipeline._report import undecided_warning
from lrsearch.pipeline._spec import Run
from lrsearch.study import Candidate, SearchResult
from lrsearch.study._storage import open_storage

__all__ = ["Attempt", "Report", "build_report", "drop_interval", "standard_error"]

# A measured speedup this far from the predicted one gets a warning.
PREDICTION_TOLERANCE = 0.15


def drop_interval(base: Evaluation, candidate: Evaluation) -> list[float] | None:
    """95 % interval of an accuracy drop from paired per-sample hits; None for metrics without them."""
    if base.correct is None or candidate.correct is None:
        return None
    return list(paired_drop_interval(base.correct, candidate.correct))


def standard_error(base: Evaluation, candidate: Evaluation) -> float:
    """Standard error of the paired accuracy drop; 0 for metrics without per-sample hits."""
    if base.correct is None or candidate.correct is None:
        return 0.0
    return paired_drop(base.correct, candidate.correct)[1]


def _jsonable(ranks: Mapping[str, Any]) -> dict[str, Any]:
    return {name: list(rank) if isinstance(rank, tuple) else rank for name, rank in ranks.items()}


@dataclass(frozen=True)
class Attempt:
    """One fine-tuned candidate and what it scored on the selection split."""

    candidate: Candidate
    model: nn.Module = field(repr=False)
    evaluation: Evaluation = field(repr=False)
    drop: float
    interval: list[float] | None
    holds: bool
    seconds: float
    family: str = "front"
    """Where the selection took it from: "uniform" (the ladder), "descent" or "front" (the search's front)."""
    start: str = "svd"
    """The factors its fine-tune started from: "svd" (plain SVD) or "search" (the search's own)."""
    start_drop: float | None = None
    """Their drop on the search split, before fine-tuning."""

    def to_dict(self) -> dict[str, Any]:
        return {"trial": self.candidate.trial, "family": self.family, "ranks": _jsonable(self.candidate.ranks),
                "search_drop": self.candidate.drop, "start": self.start, "start_drop": self.start_drop,
                "select_drop": self.drop, "select_drop_interval": self.interval,
                "meets_budget": self.holds, "finetune_seconds": self.seconds}


@dataclass
class Report:
    """Everything a compression found, in the units of ``report.json`` (drops and metrics as fractions)."""

    budget: str
    search_budget: str
    metric: str
    allowed_drop: float
    objective: str
    device: str
    threads: int
    batch_size: int
    dense: dict[str, Any]
    attempts: list[Attempt]
    splits: dict[str, str]
    layer_order: list[str]
    trials: list[dict[str, Any]]
    trial_counts: dict[str, int]
    pareto: list[int]
    coverage: dict[str, Any] | None = None
    search_allowed_drop: float | None = None
    message: str = ""
    meets_budget: bool = False
    final: dict[str, Any] | None = None
    deployment: list[dict[str, Any]] = field(default_factory=list)
    latency: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat())

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` dict; keys without a value (no final model) are left out."""
        data: dict[str, Any] = {"lrsearch_version": __version__, **{
            name: getattr(self, name) for name in (
                "created", "budget", "search_budget", "search_allowed_drop", "metric", "allowed_drop", "objective",
                "meets_budget",
                "device", "threads", "batch_size", "dense", "splits", "layer_order", "warnings", "trials",
                "trial_counts", "pareto", "message", "timing", "paths")}}
        data["attempts"] = [attempt.to_dict() for attempt in self.attempts]
        for name in ("final", "latency", "coverage"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        if self.deployment:
            data["deployment"] = self.deployment
        return data


def _figures(model: nn.Module, batch: Any, forward: ForwardFn | None) -> dict[str, float]:
    return {"params": count_params(model), "macs": macs_per_sample(model, batch, forward=forward)}


def _trials(result: SearchResult, objective: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every complete trial's cost and drop (for the Pareto plot), and the trials counted by how they ended."""
    # result.storage is lrsearch's URL (journal:PATH too), which only open_storage understands
    study = load_study(study_name=result.study_name, storage=open_storage(result.storage, heartbeat_interval=None))
    trials = study.get_trials(deepcopy=False)
    rows = []
    for trial in trials:
        attrs = trial.user_attrs
        if trial.state == TrialState.COMPLETE and objective in attrs and "drop" in attrs:
            cost = attrs[objective] * (1e3 if objective == "latency" else 1.0)  # the report shows ms
            rows.append({"number": trial.number, "cost": cost, "drop": attrs["drop"],
                         "feasible": bool(attrs.get("feasible"))})
    counts = {name: sum(trial.state == state for trial in trials) for name, state in
              (("complete", TrialState.COMPLETE), ("pruned", TrialState.PRUNED), ("failed", TrialState.FAIL))}
    counts["duplicates"] = sum("duplicate_of" in trial.user_attrs for trial in trials)
    return rows, counts


def _predicted_speedups(table: DeploymentLatency | None, candidate: Candidate) -> dict[int, float]:
    """The latency table's predicted speedup of ``candidate`` at each deployment batch size."""
    if table is None:
        return {}
    plan = {name: (candidate.schemes[name], rank) for name, rank in candidate.ranks.items()}
    return {size: dense.dense_model / seconds
            for (size, seconds), dense in zip(table.predict_each(plan).items(), table.tables)}


def _latency_warnings(comparison: LatencyComparison, predicted: Mapping[int, float]) -> list[str]:
    """Say when a measured speedup disagrees with the prediction, or the machine was busy."""
    warnings: list[str] = []
    for size, expected in predicted.items():
        measured = comparison.speedup("compressed", "original", size)
        if abs(measured / expected - 1) > PREDICTION_TOLERANCE:
            warnings.append(f"The measured speedup at batch {size} ({measured:.2f}x) differs from the latency "
                            f"table's prediction ({expected:.2f}x) by more than {PREDICTION_TOLERANCE:.0%}: the "
                            "table may be stale or the machine's load changed; re-measure on a quiet machine.")
    if comparison.busy:
        warnings.append("The latency rounds spread by more than 20% of their median: the machine was busy "
                        "while timing, so the measured speedups are rough.")
    return warnings


def build_report(module: nn.Module, run: Run, result: SearchResult, data: PipelineData, *, base_select: float,
                 selected: Attempt | None, attempts: list[Attempt], metric_name: str,
                 coverage: dict[str, Any] | None) -> tuple[Report, nn.Module | None]:
    """The report, and the final model when the budget holds on the test split (looked at once here)."""
    config, spec = run.search, run.spec
    table = result.latency_table
    threads = table.threads if table else (config.threads or torch.get_num_threads())
    sizes = table.batch_sizes if table else (config.batch_sizes or (batch_size_of(data.search[0]),))
    batches = {size: resize_batch(data.search[0], size) for size in sizes}
    batch = batches[sizes[0]]
    rows, counts = _trials(result, config.objective)
    dense = {**_figures(module, batch, spec.forward), "search_metric": result.baseline, "select_metric": base_select}
    if table is not None:
        dense["predicted_latency_ms"] = table.dense_model * 1e3
    report = Report(
        budget=str(spec.allowed), search_budget=str(result.budget), search_allowed_drop=result.allowed_drop,
        metric=metric_name,
        allowed_drop=spec.allowed.allowed_drop(base_select), objective=config.objective, device=config.device,
        threads=threads, batch_size=sizes[0],
        dense=dense, attempts=attempts, splits={**data.describe(), "verify": data.test_split}, layer_order=list(result.decomposition.targets),
        trials=rows, trial_counts=counts, pareto=[candidate.trial for candidate in result.pareto], coverage=coverage)
    if selected is None:
        report.message = (f"No configuration met the budget {spec.allowed} on {data.select_split} after fine-tuning "
                          f"({len(attempts)} fine-tuned of a front of {len(result.pareto)}). Nothing was saved "
                          "as compressed, and the test split was not looked at.")
        return report, None
    tester = Evaluator(data.test, metric=run.metric, batch_fn=spec.batch_fn)
    base_test, final_test = tester.evaluate(module), tester.evaluate(selected.model)
    allowed = spec.allowed.allowed_drop(base_test.value)
    drop = config.drop(base_test.value, final_test.value)
    interval = drop_interval(base_test, final_test)
    holds = drop <= allowed
    comparison = compare_latency({"original": module, "compressed": selected.model}, batches,
                                 device=config.device, threads=threads, forward=spec.forward)
    candidate = selected.candidate
    predicted = _predicted_speedups(table, candidate)
    timings = comparison.timings
    report.deployment = [
        {"batch_size": size, "dense_ms": timings["original"][size].median_ms,
         "compressed_ms": timings["compressed"][size].median_ms,
         "speedup": comparison.speedup("compressed", "original", size), "predicted_speedup": predicted.get(size),
         "spread": max(timings[name][size].spread for name in ("original", "compressed"))}
        for size in sizes]
    full_ranks = {name: result.decomposition.full_rank(name) for name in result.decomposition.targets}
    report.dense.update(verify_metric=base_test.value, latency_ms=timings["original"][sizes[0]].median_ms)
    report.latency, report.allowed_drop, report.meets_budget = comparison.to_dict(), allowed, holds
    report.final = {
        **_figures(selected.model, batch, spec.forward), "trial": candidate.trial,
        "latency_ms": timings["compressed"][sizes[0]].median_ms,
        "predicted_latency_ms": candidate.latency * 1e3 if candidate.latency is not None else None,
        "speedup": comparison.speedup("compressed", "original", sizes[0]),
        "predicted_speedup": predicted.get(sizes[0]),
        "verify_metric": final_test.value, "verify_drop": drop, "verify_drop_interval": interval,
        "select_metric": selected.evaluation.value, "select_drop": selected.drop,
        "select_drop_interval": selected.interval, "search_metric": candidate.metric, "search_drop": candidate.drop,
        "ranks": _jsonable(candidate.ranks), "full_ranks": _jsonable(full_ranks)}
    report.warnings = [w for w in (undecided_warning(candidate.trial, interval, allowed, data.test_split),
                                   *_latency_warnings(comparison, predicted)) if w]
    verdict = "meets" if holds else "misses"
    report.message = (f"Trial {candidate.trial} {verdict} the budget {spec.allowed} on {data.test_split} after "
                      f"fine-tuning: drop {100 * drop:.2f} points (allowed {100 * allowed:.2f}).")
    if not holds:
        report.message += (" It held on the selection split, so nothing else was tried on the test split; "
                           "nothing was saved as compressed.")
    return report, selected.model if holds else None
