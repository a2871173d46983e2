"""``compress``: search ranks, select with fine-tuning, verify once on unseen data, measure, save.

Three splits, each with one job (see :mod:`lrsearch.pipeline._data`): the search scores
candidates before fine-tuning on the *search* split, under a wide constraint, keeping the
cost-vs-drop front; fine-tuned candidates from that front are accepted or rejected on the
*select* split (a bisection along the front, :mod:`lrsearch.pipeline._select`); the accepted
model is scored once on the *test* split, and that verdict is the result. If nothing holds,
nothing is saved as compressed and the result says so.
"""

from __future__ import annotations

import datetime
import io
import logging
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from optuna import load_study
from optuna.trial import TrialState
from torch import nn
from torch.utils.data import DataLoader

from lrsearch._atomic import atomic_write_bytes
from lrsearch._errors import Interrupted
from lrsearch._version import __version__
from lrsearch.core import count_params, get_recipe, macs_per_sample, save
from lrsearch.core._runtime import ForwardFn, batch_size_of
from lrsearch.core._serialization import CHECKPOINT_KEY
from lrsearch.core._targets import Patterns
from lrsearch.measure import (
    Budget,
    DeploymentLatency,
    Evaluation,
    Evaluator,
    LatencyComparison,
    compare_latency,
    paired_drop,
    paired_drop_interval,
    parse_budget,
)
from lrsearch.pipeline._data import PipelineData, calibration_batches, resolve_data
from lrsearch.pipeline._finetune import FinetuneConfig, finetune
from lrsearch.pipeline._lightning import clone_module, namespace_of
from lrsearch.pipeline._metric import resolve_metric
from lrsearch.pipeline._report import write_report
from lrsearch.pipeline._select import Bisection
from lrsearch.study import Candidate, SearchConfig, SearchResult, search
from lrsearch.study._storage import open_storage, redacted

__all__ = ["AUTO", "CompressionResult", "compress", "search_constraint"]

_logger = logging.getLogger("lrsearch")
MODEL_DIR = "model"
CHECKPOINT_FILE = "compressed.ckpt"
AUTO = "auto"
# With search_budget="auto" the search may lose this many times the final budget before
# fine-tuning. Fine-tuning recovers most of a large drop (a uniform rank-32 MNIST-1D MLP: a
# 5.25-point drop became -0.80 points), and the selection bisects the front, so a wide front
# costs a fine-tune or two more, while a narrow one caps the speedup.
SEARCH_WIDENING = 50
# ... but never more than this share of the baseline metric: a model that loses more than
# half of its accuracy before fine-tuning is retraining, not recovery.
MAX_SEARCH_SHARE = 0.5
# A measured speedup this far from the predicted one gets a warning.
PREDICTION_TOLERANCE = 0.15


@dataclass(frozen=True)
class CompressionResult:
    """The outcome: whether the budget held on unseen data, the final model, figures and paths."""

    meets_budget: bool
    model: nn.Module | None
    candidate: Candidate | None
    report: dict[str, Any]
    paths: dict[str, Path]
    search: SearchResult = field(repr=False)

    @property
    def ranks(self) -> dict[str, Any]:
        return dict(self.candidate.ranks) if self.candidate else {}


def search_constraint(budget: Budget, search_budget: str | float | None) -> Budget:
    """The search's constraint before fine-tuning: ``search_budget``, or "auto": a widened ``budget``."""
    if search_budget is None or search_budget == AUTO:
        widened = min(budget.drop * SEARCH_WIDENING, MAX_SEARCH_SHARE)
        return Budget(max(widened, budget.drop), budget.relative)
    return parse_budget(search_budget, relative=budget.relative)


@dataclass(frozen=True)
class _Attempt:
    """One fine-tuned candidate and what it scored on the selection split."""

    candidate: Candidate
    model: nn.Module
    evaluation: Evaluation
    drop: float
    interval: list[float] | None
    holds: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"trial": self.candidate.trial, "ranks": _jsonable(self.candidate.ranks),
                "search_drop": self.candidate.drop, "select_drop": self.drop, "select_drop_interval": self.interval,
                "meets_budget": self.holds, "finetune_seconds": self.seconds}


def compress(module: nn.Module, *, budget: str | float, run_dir: str | Path,
             search_budget: str | float | None = AUTO,
             datamodule: Any = None, train_dataloaders: Any = None, val_dataloaders: Any = None,
             test_dataloaders: Any = None, search_config: SearchConfig | None = None,
             finetune_config: FinetuneConfig | None = None, max_finetunes: int = 6,
             select_fraction: float = 0.75, select_margin: float = 1.0, max_samples: int | None = 20_000,
             metric: Any = None,
             monitor: str | None = None, metric_name: str | None = None, batch_fn: Any = None,
             forward: ForwardFn | None = None, target_modules: Patterns = None, exclude_modules: Patterns = None,
             conv_scheme: str | Mapping[str, str] = "channel", show_progress_bar: bool = False) -> CompressionResult:
    """Compress a trained LightningModule end to end; the module itself is never modified.

    ``budget`` is the drop allowed after fine-tuning. The search scores candidates *before*
    fine-tuning under ``search_budget``: by default ("auto") a much wider constraint, since
    fine-tuning recovers most of a large drop; then up to ``max_finetunes`` candidates of the
    search's front are fine-tuned, bisecting for the cheapest one whose drop on the selection
    split (``select_fraction`` of the validation batches, which the search never sees) is
    within ``budget`` with a margin of ``select_margin`` standard errors of that drop (the
    bisection keeps the cheapest candidate that passed, so a candidate that passed by luck would
    otherwise break the budget on the test split). That candidate alone is scored on the test
    split, once: the verdict.

    The score is top-1 accuracy unless ``metric`` (a torchmetrics ``Metric`` or
    ``fn(outputs, targets)``) or ``monitor`` (a name the module logs in ``validation_step``,
    like ``ModelCheckpoint(monitor=...)``) says otherwise; for a loss, set
    ``search_config.higher_is_better=False``.

    Writes into ``run_dir``: ``search/`` (the Optuna study and latency table) and, when the
    budget holds on the test split, ``model/`` (``lrsearch.save`` format) and ``compressed.ckpt``
    (for ``Model.load_from_checkpoint`` with :class:`lrsearch.LowRankCheckpointMixin`); always
    ``report.json`` and ``report.html``.
    """
    started = time.perf_counter()
    namespace_of(module)
    relative = (search_config or SearchConfig()).relative_budget
    parsed = parse_budget(budget, relative=relative)
    searched = search_constraint(parsed, search_budget)
    finetune_config = finetune_config or FinetuneConfig()
    Bisection([], max_finetunes)  # checks max_finetunes before any work
    if not (isinstance(select_margin, (int, float)) and not isinstance(select_margin, bool) and select_margin >= 0):
        raise ValueError(f"select_margin must be a number of at least 0 but got {select_margin!r}.")
    run_dir = Path(run_dir)
    data = resolve_data(datamodule=datamodule, train_dataloaders=train_dataloaders,
                        val_dataloaders=val_dataloaders, test_dataloaders=test_dataloaders,
                        select_fraction=select_fraction, max_samples=max_samples)
    metric, metric_name = resolve_metric(metric=metric, monitor=monitor, metric_name=metric_name)
    selector = Evaluator(data.select, metric=metric, batch_fn=batch_fn)
    # Before the search writes anything: a metric the module cannot produce fails here.
    base_select = selector.evaluate(module)
    config = replace(search_config or SearchConfig(), budget=searched, run_dir=str(run_dir / "search"))
    result = search(module, data.search, config, calibration=calibration_batches(data.train, data.search),
                    metric=metric, metric_name=metric_name, batch_fn=batch_fn, forward=forward,
                    target_modules=target_modules, exclude_modules=exclude_modules, conv_scheme=conv_scheme,
                    show_progress_bar=show_progress_bar)
    searched_at = time.perf_counter()
    allowed_select = parsed.allowed_drop(base_select.value)
    sign = 1.0 if config.higher_is_better else -1.0
    attempts: list[_Attempt] = []

    def judge(candidate: Candidate) -> bool:
        """Fine-tune ``candidate`` and say whether it holds on the selection split."""
        begun = time.perf_counter()
        tuned = finetune(clone_module(result.build(candidate)).train(), teacher=clone_module(module),
                         root_dir=run_dir / f"finetune-trial{candidate.trial}", config=finetune_config,
                         train_dataloaders=data.train, val_dataloaders=DataLoader(data.search, batch_size=None),
                         forward=forward)
        evaluation = selector.evaluate(tuned)
        drop = sign * (base_select.value - evaluation.value)
        attempt = _Attempt(candidate, tuned, evaluation, drop, _drop_interval(base_select, evaluation),
                           drop + select_margin * _standard_error(base_select, evaluation) <= allowed_select,
                           time.perf_counter() - begun)
        attempts.append(attempt)
        _logger.info("trial %d after fine-tuning: drop %.2f points on %s (allowed %.2f)", candidate.trial,
                     100 * drop, data.select_split, 100 * allowed_select)
        return attempt.holds

    with _resume_hint(result):
        chosen, _ = Bisection(result.pareto, max_finetunes).run(judge)
        selected = next((a for a in attempts if chosen is not None and a.candidate is chosen.candidate), None)
        selected_at = time.perf_counter()
        report, final = _report(module, result, data, parsed=parsed, base_select=base_select.value,
                                selected=selected, attempts=attempts,
                                metric=metric, batch_fn=batch_fn, config=config, forward=forward,
                                metric_name=metric_name, sign=sign)
        report["timing"] = {"search_seconds": searched_at - started, "selection_seconds": selected_at - searched_at,
                            "finetunes": len(attempts), "max_finetunes": max_finetunes,
                            "front_size": len(result.pareto), "total_seconds": time.perf_counter() - started}
        paths: dict[str, Path] = {}
        with _ctrl_c_deferred():
            if final is not None:
                paths["model"] = save(final, run_dir / MODEL_DIR, metadata={"report": "../report.json"})
                paths["checkpoint"] = _save_checkpoint(final, run_dir / CHECKPOINT_FILE)
            report["paths"] = {**{name: str(path) for name, path in paths.items()},
                               "study": redacted(result.storage)}
            paths["report"], paths["report_html"] = write_report(run_dir, report)
    return CompressionResult(meets_budget=final is not None, model=final,
                             candidate=selected.candidate if final is not None and selected else None,
                             report=report, paths=paths, search=result)


@contextmanager
def _resume_hint(result: SearchResult) -> Iterator[None]:
    """Ctrl-C after the search becomes :class:`Interrupted`, which says how to resume."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        raise Interrupted(
            f"interrupted after the search; re-run the same command to resume: study {result.study_name!r} at "
            f"{redacted(result.storage)} keeps its trials, so only fine-tuning and verification run again"
        ) from interrupt


@contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Ctrl-C waits until the block is done, so the result files are written all together or not at all."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _standard_error(base: Evaluation, candidate: Evaluation) -> float:
    """Standard error of the paired accuracy drop; 0 for metrics without per-sample hits."""
    if base.correct is None or candidate.correct is None:
        return 0.0
    return paired_drop(base.correct, candidate.correct)[1]


def _drop_interval(base: Evaluation, candidate: Evaluation) -> list[float] | None:
    """95 % interval of an accuracy drop from paired per-sample hits; None for metrics without them."""
    if base.correct is None or candidate.correct is None:
        return None
    return list(paired_drop_interval(base.correct, candidate.correct))


def _undecided_warning(interval: list[float] | None, allowed: float, split: str) -> str | None:
    """A warning when the split cannot tell whether the budget holds: the verdict is then luck."""
    if interval is None or not interval[0] <= allowed < interval[1]:
        return None
    return (f"The 95% interval of the drop on the {split} split, {100 * interval[0]:.2f} to "
            f"{100 * interval[1]:.2f} points, straddles the allowed {100 * allowed:.2f} points: the split is too "
            "small to tell whether the budget holds. A larger test split would narrow the interval.")


def _jsonable(ranks: Mapping[str, Any]) -> dict[str, Any]:
    return {name: list(rank) if isinstance(rank, tuple) else rank for name, rank in ranks.items()}


def _figures(model: nn.Module, batch: Any, forward: ForwardFn | None) -> dict[str, float]:
    return {"params": count_params(model), "macs": macs_per_sample(model, batch, forward=forward)}


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


def _report(module: nn.Module, result: SearchResult, data: PipelineData, *, parsed: Budget,
            base_select: float, selected: _Attempt | None, attempts: list[_Attempt], metric: Any, batch_fn: Any,
            config: SearchConfig, forward: ForwardFn | None, metric_name: str | None,
            sign: float) -> tuple[dict[str, Any], nn.Module | None]:
    """The report, and the final model when the budget holds on the test split (looked at once here)."""
    table = result.latency_table
    threads = table.threads if table else (config.threads or torch.get_num_threads())
    sizes = table.batch_sizes if table else (config.batch_sizes or (batch_size_of(data.search[0]),))
    batch_size = sizes[0]
    batches = {size: _deployment_batch(data.search[0], size) for size in sizes}
    batch = batches[batch_size]
    report: dict[str, Any] = {
        "lrsearch_version": __version__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "budget": str(parsed), "search_budget": str(result.budget), "metric": metric_name or "accuracy",
        "allowed_drop": parsed.allowed_drop(base_select), "objective": config.objective, "meets_budget": False,
        "device": config.device,
        "threads": threads, "batch_size": batch_size,
        "dense": {**_figures(module, batch, forward), "search_metric": result.baseline,
                  "select_metric": base_select},
        "attempts": [attempt.to_dict() for attempt in attempts], "splits": data.describe(),
        "layer_order": list(result.decomposition.targets), "warnings": [],
        "trials": _trials(result, config.objective)}
    if selected is None:
        report["message"] = (f"No configuration met the budget {parsed} on {data.select_split} after fine-tuning "
                             f"({len(attempts)} fine-tuned of a front of {len(result.pareto)}). Nothing was saved "
                             "as compressed, and the test split was not looked at.")
        return report, None
    tester = Evaluator(data.test, metric=metric, batch_fn=batch_fn)
    base_test, final_test = tester.evaluate(module), tester.evaluate(selected.model)
    allowed = parsed.allowed_drop(base_test.value)
    drop = sign * (base_test.value - final_test.value)
    interval = _drop_interval(base_test, final_test)
    holds = drop <= allowed
    comparison = compare_latency({"original": module, "compressed": selected.model}, batches,
                                 device=config.device, threads=threads, forward=forward)
    candidate = selected.candidate
    predicted = _predicted_speedups(table, candidate)
    report["deployment"] = [
        {"batch_size": size, "dense_ms": comparison.timings["original"][size].median_ms,
         "compressed_ms": comparison.timings["compressed"][size].median_ms,
         "speedup": comparison.speedup("compressed", "original", size), "predicted_speedup": predicted.get(size),
         "spread": max(comparison.timings[name][size].spread for name in ("original", "compressed"))}
        for size in sizes]
    full_ranks = {name: result.decomposition.full_rank(name) for name in result.decomposition.targets}
    report["dense"].update(verify_metric=base_test.value,
                           latency_ms=comparison.timings["original"][batch_size].median_ms)
    report["latency"] = comparison.to_dict()
    report["allowed_drop"] = allowed
    report["meets_budget"] = holds
    report["final"] = {
        **_figures(selected.model, batch, forward), "trial": candidate.trial,
        "latency_ms": comparison.timings["compressed"][batch_size].median_ms,
        "predicted_latency_ms": candidate.latency * 1e3 if candidate.latency is not None else None,
        "speedup": comparison.speedup("compressed", "original", batch_size),
        "predicted_speedup": predicted.get(batch_size),
        "verify_metric": final_test.value, "verify_drop": drop, "verify_drop_interval": interval,
        "select_metric": selected.evaluation.value, "select_drop": selected.drop,
        "select_drop_interval": selected.interval, "search_drop": candidate.drop,
        "ranks": _jsonable(candidate.ranks), "full_ranks": _jsonable(full_ranks)}
    report["warnings"] = [w for w in (_undecided_warning(interval, allowed, data.test_split),
                                      *_latency_warnings(comparison, predicted)) if w]
    verdict = "meets" if holds else "misses"
    report["message"] = (f"Trial {candidate.trial} {verdict} the budget {parsed} on {data.test_split} after "
                         f"fine-tuning: drop {100 * drop:.2f} points (allowed {100 * allowed:.2f}).")
    if not holds:
        report["message"] += (" It held on the selection split, so nothing else was tried on the test split; "
                              "nothing was saved as compressed.")
    return report, selected.model if holds else None


def _trials(result: SearchResult, objective: str) -> list[dict[str, Any]]:
    # result.storage is lrsearch's URL (journal:PATH too), which only open_storage understands
    study = load_study(study_name=result.study_name, storage=open_storage(result.storage, heartbeat_interval=None))
    rows = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        if objective in attrs and "drop" in attrs:
            cost = attrs[objective] * (1e3 if objective == "latency" else 1.0)  # the report shows ms
            rows.append({"number": trial.number, "cost": cost, "drop": attrs["drop"],
                         "feasible": bool(attrs.get("feasible"))})
    return rows


def _deployment_batch(batch: Any, size: int | None) -> Any:
    """The first search batch, cut or tiled to the latency table's batch size."""
    if size is None:
        return batch

    def resize(tensor: Any) -> Any:
        if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
            return tensor
        reps = -(-size // tensor.shape[0])
        return tensor.repeat(reps, *([1] * (tensor.dim() - 1)))[:size]

    if isinstance(batch, (list, tuple)):
        return type(batch)(resize(item) for item in batch)
    if isinstance(batch, Mapping):
        return {key: resize(value) for key, value in batch.items()}
    return resize(batch)


def _save_checkpoint(module: nn.Module, path: Path) -> Path:
    """A checkpoint ``Model.load_from_checkpoint`` rebuilds: weights, hyperparameters, recipe."""
    namespace = namespace_of(module)
    checkpoint: dict[str, Any] = {
        "state_dict": {key: value.detach().cpu() for key, value in module.state_dict().items()},
        "pytorch-lightning_version": namespace.__version__, "epoch": 0, "global_step": 0,
        CHECKPOINT_KEY: get_recipe(module)}
    hparams = getattr(module, "hparams", None)
    if hparams:
        checkpoint[type(module).CHECKPOINT_HYPER_PARAMS_KEY] = dict(hparams)
        name = getattr(module, "_hparams_name", None)
        if name:
            checkpoint[type(module).CHECKPOINT_HYPER_PARAMS_NAME] = name
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return atomic_write_bytes(path, buffer.getvalue())
