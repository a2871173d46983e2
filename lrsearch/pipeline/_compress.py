"""``compress``: search ranks, fine-tune the best candidates, verify on unseen data, measure, save.

A candidate is accepted only if, after fine-tuning, its drop against the original model on
the verification split (which the search never saw) is within the budget. Candidates are
tried cheapest first from the feasible Pareto set; if none holds, nothing is saved as
compressed and the result says so.
"""

from __future__ import annotations

import datetime
import io
import logging
import signal
import threading
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
from lrsearch.core._runtime import ForwardFn, batch_size_of, default_forward, move_to_device
from lrsearch.core._serialization import CHECKPOINT_KEY
from lrsearch.core._targets import Patterns
from lrsearch.measure import Evaluation, Evaluator, paired_drop_interval, parse_budget, time_call
from lrsearch.pipeline._data import PipelineData, calibration_batches, resolve_data
from lrsearch.pipeline._finetune import FinetuneConfig, finetune
from lrsearch.pipeline._lightning import clone_module, namespace_of
from lrsearch.pipeline._metric import resolve_metric
from lrsearch.pipeline._report import write_report
from lrsearch.study import Candidate, SearchConfig, SearchResult, search
from lrsearch.study._storage import open_storage, redacted

__all__ = ["CompressionResult", "compress"]

_logger = logging.getLogger("lrsearch")
MODEL_DIR = "model"
CHECKPOINT_FILE = "compressed.ckpt"


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


def compress(module: nn.Module, *, budget: str | float, run_dir: str | Path,
             search_budget: str | float | None = None,
             datamodule: Any = None, train_dataloaders: Any = None, val_dataloaders: Any = None,
             test_dataloaders: Any = None, search_config: SearchConfig | None = None,
             finetune_config: FinetuneConfig | None = None, max_candidates: int = 3,
             verify_fraction: float = 0.3, metric: Any = None, monitor: str | None = None,
             metric_name: str | None = None, batch_fn: Any = None, forward: ForwardFn | None = None,
             target_modules: Patterns = None, exclude_modules: Patterns = None,
             conv_scheme: str | Mapping[str, str] = "channel", show_progress_bar: bool = False) -> CompressionResult:
    """Compress a trained LightningModule end to end; the module itself is never modified.

    ``budget`` is checked on the verification split after fine-tuning. ``search_budget``
    (default: the same) is the constraint of the search, which scores candidates *before*
    fine-tuning: a looser one lets the search propose smaller models that fine-tuning may
    bring back within ``budget``; candidates that do not are rejected and the next is tried.

    The score is top-1 accuracy unless ``metric`` (a torchmetrics ``Metric`` or
    ``fn(outputs, targets)``) or ``monitor`` (a name the module logs in ``validation_step``,
    like ``ModelCheckpoint(monitor=...)``) says otherwise; for a loss, set
    ``search_config.higher_is_better=False``.

    Writes into ``run_dir``: ``search/`` (the Optuna study and latency table) and, when a
    candidate holds, ``model/``
    (``lrsearch.save`` format) and ``compressed.ckpt`` (for ``Model.load_from_checkpoint``
    with :class:`lrsearch.LowRankCheckpointMixin`); always ``report.json`` and ``report.html``.
    """
    if isinstance(max_candidates, bool) or not isinstance(max_candidates, int) or max_candidates < 1:
        raise ValueError(f"max_candidates must be an integer of at least 1 but got {max_candidates!r}.")
    namespace_of(module)
    relative = (search_config or SearchConfig()).relative_budget
    parsed = parse_budget(budget, relative=relative)
    searched = parse_budget(search_budget if search_budget is not None else budget, relative=relative)
    finetune_config = finetune_config or FinetuneConfig()
    run_dir = Path(run_dir)
    data = resolve_data(datamodule=datamodule, train_dataloaders=train_dataloaders,
                        val_dataloaders=val_dataloaders, test_dataloaders=test_dataloaders,
                        verify_fraction=verify_fraction)
    metric, metric_name = resolve_metric(metric=metric, monitor=monitor, metric_name=metric_name)
    verifier = Evaluator(data.verify, metric=metric, batch_fn=batch_fn)
    searcher = Evaluator(data.search, metric=metric, batch_fn=batch_fn)
    # Before the search writes anything: a metric the module cannot produce fails here.
    base_evaluation = verifier.evaluate(module)
    base_verify = base_evaluation.value
    config = replace(search_config or SearchConfig(), budget=searched.drop, run_dir=str(run_dir / "search"))
    result = search(module, data.search, config, calibration=calibration_batches(data.train, data.search),
                    metric=metric, metric_name=metric_name, batch_fn=batch_fn, forward=forward,
                    target_modules=target_modules, exclude_modules=exclude_modules, conv_scheme=conv_scheme,
                    show_progress_bar=show_progress_bar)
    allowed = parsed.allowed_drop(base_verify)
    sign = 1.0 if config.higher_is_better else -1.0
    attempts: list[dict[str, Any]] = []
    final: tuple[Candidate, nn.Module, float] | None = None
    with _resume_hint(result):
        for candidate in result.pareto[:max_candidates]:
            tuned = result.build(candidate)
            tuned = finetune(clone_module(tuned).train(), teacher=clone_module(module),
                             root_dir=run_dir / f"finetune-trial{candidate.trial}", config=finetune_config,
                             train_dataloaders=data.train, val_dataloaders=DataLoader(data.search, batch_size=None),
                             forward=forward)
            evaluation = verifier.evaluate(tuned)
            value = evaluation.value
            drop = sign * (base_verify - value)
            holds = drop <= allowed
            interval = _drop_interval(base_evaluation, evaluation)
            attempts.append({"trial": candidate.trial, "ranks": _jsonable(candidate.ranks),
                             "search_drop": candidate.drop, "verify_drop": drop,
                             "verify_drop_interval": interval, "meets_budget": holds})
            _logger.info("trial %d after fine-tuning: drop %.4f on %s (allowed %.4f)", candidate.trial, drop,
                         data.verify_split, allowed)
            _warn_if_undecided(candidate.trial, interval, allowed, data.verify_split)
            if holds:
                final = (candidate, tuned, value)
                break
        report = _report(module, result, data, budget=str(parsed), final=final, attempts=attempts,
                         allowed=allowed, base_verify=base_verify, searcher=searcher, config=config,
                         forward=forward, metric_name=metric_name)
        paths: dict[str, Path] = {}
        with _ctrl_c_deferred():
            if final is not None:
                paths["model"] = save(final[1], run_dir / MODEL_DIR, metadata={"report": "../report.json"})
                paths["checkpoint"] = _save_checkpoint(final[1], run_dir / CHECKPOINT_FILE)
            report["paths"] = {**{name: str(path) for name, path in paths.items()},
                               "study": redacted(result.storage)}
            paths["report"], paths["report_html"] = write_report(run_dir, report)
    return CompressionResult(meets_budget=final is not None, model=final[1] if final else None,
                             candidate=final[0] if final else None, report=report, paths=paths, search=result)


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


def _drop_interval(base: Evaluation, candidate: Evaluation) -> list[float] | None:
    """95 % interval of an accuracy drop from paired per-sample hits; None for metrics without them."""
    if base.correct is None or candidate.correct is None:
        return None
    return list(paired_drop_interval(base.correct, candidate.correct))


def _warn_if_undecided(trial: int, interval: list[float] | None, allowed: float, split: str) -> None:
    """Say so when the verify split cannot tell whether the budget holds: the verdict is then luck."""
    if interval is not None and interval[0] <= allowed < interval[1]:
        _logger.warning("trial %d: the 95%% interval of its drop on %s, %.2f to %.2f points, straddles the "
                        "allowed %.2f: the split is too small to tell whether the budget holds; a larger test "
                        "split would", trial, split, 100 * interval[0], 100 * interval[1], 100 * allowed)


def _jsonable(ranks: Mapping[str, Any]) -> dict[str, Any]:
    return {name: list(rank) if isinstance(rank, tuple) else rank for name, rank in ranks.items()}


def _measure(model: nn.Module, batch: Any, *, forward: ForwardFn | None, threads: int, device: str) -> dict[str, float]:
    """Measured whole-model latency (ms) at the table's batch size and threads, params, MACs/sample."""
    forward = forward or default_forward
    target = torch.device(device)
    original = next(model.parameters()).device
    moved = model.to(target)
    on_device = move_to_device(batch, target)
    try:
        with torch.inference_mode():
            seconds = time_call(lambda: forward(moved, on_device), device=target, threads=threads)
    finally:
        model.to(original)
    return {"latency_ms": seconds * 1e3, "params": count_params(model),
            "macs": macs_per_sample(model, batch, forward=forward)}


def _report(module: nn.Module, result: SearchResult, data: PipelineData, *, budget: str,
            final: tuple[Candidate, nn.Module, float] | None, attempts: list[dict[str, Any]], allowed: float,
            base_verify: float, searcher: Evaluator, config: SearchConfig, forward: ForwardFn | None,
            metric_name: str | None) -> dict[str, Any]:
    table = result.latency_table
    threads = table.threads if table else (config.threads or torch.get_num_threads())
    batch = _deployment_batch(data.search[0], table.batch_size if table else None)
    dense = {**_measure(module, batch, forward=forward, threads=threads, device=config.device),
             "search_metric": result.baseline, "verify_metric": base_verify}
    report: dict[str, Any] = {
        "lrsearch_version": __version__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "budget": budget, "search_budget": str(result.budget), "allowed_drop": allowed, "metric": metric_name or "accuracy",
        "objective": config.objective, "meets_budget": final is not None, "device": config.device,
        "threads": threads, "batch_size": batch_size_of(batch), "dense": dense, "attempts": attempts,
        "splits": {"search": data.search_split, "verify": data.verify_split},
        "layer_order": list(result.decomposition.targets),
        "trials": _trials(result, config.objective)}
    if final is None:
        report["message"] = (f"No configuration met the budget {budget} on {data.verify_split} after "
                             f"fine-tuning ({len(attempts)} tried). Nothing was saved as compressed.")
        return report
    candidate, model, value = final
    measured = _measure(model, batch, forward=forward, threads=threads, device=config.device)
    predicted = candidate.latency * 1e3 if candidate.latency is not None else None
    full_ranks = {name: result.decomposition.full_rank(name) for name in result.decomposition.targets}
    report["final"] = {
        **measured, "trial": candidate.trial, "predicted_latency_ms": predicted,
        "search_metric": searcher.evaluate(model).value,
        "verify_metric": value, "search_drop": candidate.drop, "verify_drop": attempts[-1]["verify_drop"],
        "verify_drop_interval": attempts[-1]["verify_drop_interval"],
        "ranks": _jsonable(candidate.ranks),
        "full_ranks": {name: list(rank) if isinstance(rank, tuple) else rank for name, rank in full_ranks.items()},
        "speedup": dense["latency_ms"] / measured["latency_ms"],
        "predicted_speedup": (table.dense_model * 1e3 / predicted) if table and predicted else None}
    report["message"] = (f"Trial {candidate.trial} meets the budget {budget} on {data.verify_split} after "
                         f"fine-tuning: drop {attempts[-1]['verify_drop']:.4f} <= {allowed:.4f}.")
    return report


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
