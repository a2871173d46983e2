"""``compress``: search ranks, select with fine-tuning, verify once on unseen data, measure, save.

Three splits, each with one job (see :mod:`lrsearch.pipeline._data`): the search scores
candidates before fine-tuning on the *search* split, under a wide constraint, keeping the
cost-vs-drop front; fine-tuned candidates (the uniform-rank ladder, a descent from its winner,
the front) are accepted or rejected on the *select* split (bisections,
:mod:`lrsearch.pipeline._select`); the accepted model is scored once on the *test* split, and
that verdict is the result. If nothing holds, nothing is saved as compressed and the result
says so.
"""

from __future__ import annotations

import io
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from lrsearch._atomic import atomic_write_bytes
from lrsearch._errors import Interrupted
from lrsearch._runlock import run_lock
from lrsearch.core import Coverage, Decomposition, coverage, get_recipe, save
from lrsearch.core._serialization import CHECKPOINT_KEY
from lrsearch.measure import Evaluator
from lrsearch.pipeline._console import run_console
from lrsearch.pipeline._finetune import check_trainer_options, finetune
from lrsearch.pipeline._lightning import clone_module, namespace_of
from lrsearch.pipeline._outcome import (
    Attempt,
    Report,
    build_report,
    drop_interval,
    standard_error,
)
from lrsearch.pipeline._report import write_report
from lrsearch.pipeline._report_text import outcome_line
from lrsearch.pipeline._select import Selection
from lrsearch.pipeline._spec import Run, RunSpec
from lrsearch.study import Candidate, SearchResult
from lrsearch.study._storage import redacted

__all__ = ["CompressionResult", "compress", "run_compression"]

_logger = logging.getLogger("lrsearch")


@dataclass(frozen=True)
class CompressionResult:
    """The outcome: whether the budget held on unseen data, the final model, figures and paths.

    ``report`` is the ``report.json`` dict (the one the CLI summary and ``report.html`` render);
    ``summary`` is the typed :class:`~lrsearch.pipeline._outcome.Report` it came from.
    """

    meets_budget: bool
    model: nn.Module | None
    candidate: Candidate | None
    report: dict[str, Any]
    paths: dict[str, Path]
    search: SearchResult = field(repr=False)
    summary: Report | None = field(default=None, repr=False)
    coverage: Coverage | None = field(default=None, repr=False)

    @property
    def ranks(self) -> dict[str, Any]:
        return dict(self.candidate.ranks) if self.candidate else {}


def compress(module: nn.Module, spec: RunSpec | None = None, *, datamodule: Any = None,
             train_dataloaders: Any = None, val_dataloaders: Any = None, test_dataloaders: Any = None,
             **options: Any) -> CompressionResult:
    """Compress a trained LightningModule end to end; the module itself is never modified.

    ``spec`` holds the options (:class:`~lrsearch.pipeline.RunSpec`); keywords name its fields
    (``budget="0.5%"``, ``run_dir=...``, ``search={...}``, ``finetune=FinetuneConfig(...)``)
    and replace them. Data comes from ``datamodule`` or the dataloaders.

    ``budget`` is the drop allowed after fine-tuning. The search scores candidates *before*
    fine-tuning under ``search_budget``: by default ("auto") a much wider constraint, since
    fine-tuning recovers most of a large drop; then up to ``max_finetunes`` candidates are
    fine-tuned (the uniform-rank ladder, a descent from its winner, the search's front), bisecting
    for the cheapest one whose drop on the selection split (``select_fraction`` of the validation
    batches, which the search never sees) is within ``budget``. That candidate alone is scored on
    the test split, once: the verdict.

    Writes into ``run_dir`` (see :mod:`lrsearch.pipeline._layout`): ``search/`` (the Optuna study
    and latency table) and, when the budget holds on the test split, ``model/`` (``lrsearch.save``
    format) and ``compressed.ckpt`` (for ``Model.load_from_checkpoint`` with
    :class:`lrsearch.LowRankCheckpointMixin`); always ``report.json`` and ``report.html``.
    """
    return run_compression(module, RunSpec.build(spec, options).resolve(), datamodule=datamodule,
                           train_dataloaders=train_dataloaders, val_dataloaders=val_dataloaders,
                           test_dataloaders=test_dataloaders)


def run_compression(module: nn.Module, run: Run, *, inherited: Mapping[str, Any] | None = None,
                    announce: bool = True, **sources: Any) -> CompressionResult:
    """:func:`compress` of a resolved run; ``inherited``: Trainer settings the fine-tunes start from.

    ``announce`` ends the run's lines with its outcome and where the report went (the CLI, which
    prints the whole summary instead, turns it off).
    """
    inherited = dict(inherited or {})
    # Fine-tunes show a bar only where the run and the Trainer it runs in both show theirs.
    inherited["enable_progress_bar"] = run.spec.progress and inherited.get("enable_progress_bar", True)
    with run_console(verbose=run.spec.verbose), run_lock(run.layout.root):
        result = _Compression(module, run, inherited).execute(sources)
        if announce:
            _logger.info("%s The report: %s", outcome_line(result.report), result.paths["report_html"])
        return result


class _Compression:
    """One compression: the search, the bisection of its front with fine-tunes, the verdict, the files."""

    def __init__(self, module: nn.Module, run: Run, inherited: Mapping[str, Any]) -> None:
        self.module, self.run, self.spec, self.inherited = module, run, run.spec, inherited
        check_trainer_options(namespace_of(module), self.spec.finetune.trainer)
        self.attempts: list[Attempt] = []
        self.descent: tuple[Candidate, ...] = ()
        self.descent_seconds = 0.0
        self.svd_drops: dict[int, float] = {}
        self.plain_start_lost = False  # finetune_from="auto": a plain-SVD fine-tune ended below the search's start

    def execute(self, sources: Mapping[str, Any]) -> CompressionResult:
        started = time.perf_counter()
        run, spec = self.run, self.spec
        self.data = data = run.data(**sources)
        self.selector = Evaluator(data.select, metric=run.metric, batch_fn=spec.batch_fn)
        self.searcher = Evaluator(data.search, metric=run.metric, batch_fn=spec.batch_fn)
        # Before the search writes anything: a metric the module cannot produce fails here.
        self.base_select = self.selector.evaluate(self.module)
        self.metric_name = run.metric_name or self.base_select.metric_name or "accuracy"
        self.allowed_select = spec.allowed.allowed_drop(self.base_select.value)
        covered = coverage(self.module, data.search[0], forward=spec.forward, target_modules=spec.target_modules,
                           exclude_modules=spec.exclude_modules)
        _logger.info("%s", covered.format())
        self.result = result = run.run_search(self.module, data)
        self.starting = run.starting_factors(self.module, result)
        searched_at = time.perf_counter()
        with _resume_hint(result):
            chosen, _ = Selection(result.uniform, result.pareto, result.cost, spec.max_finetunes,
                                  descend=self.descend).run(self.judge)
            selected = next((a for a in self.attempts if chosen is not None and a.candidate is chosen.candidate), None)
            selected_at = time.perf_counter()
            if selected is not None:
                split = "the test split" + ("" if data.test_split == "test" else f" ({data.test_split})")
                _logger.info("verifying trial %d on %s, looked at once; then timing it against the original in "
                             "interleaved rounds", selected.candidate.trial, split)
            report, final = build_report(self.module, run, result, data, base_select=self.base_select.value,
                                         selected=selected, attempts=self.attempts, metric_name=self.metric_name,
                                         coverage=covered.to_dict())
            kept = report.final["trial"] if final is not None and report.final else None
            result.publish_outcome(
                metric=self.metric_name, budget=str(spec.allowed), budget_drop=report.allowed_drop, final=kept,
                final_note=f"kept: fine-tuned, verified once on {data.test_split}",
                outcome=outcome_line(report.to_dict()))
            report.timing = {"search_seconds": searched_at - started, "selection_seconds": selected_at - searched_at,
                             "finetunes": len(self.attempts), "max_finetunes": spec.max_finetunes,
                             "descent_seconds": self.descent_seconds, "descent_size": len(self.descent),
                             "front_size": len(result.pareto), "total_seconds": time.perf_counter() - started}
            paths = self.save(report, final)
        return CompressionResult(meets_budget=final is not None, model=final,
                                 candidate=selected.candidate if final is not None and selected else None,
                                 report=report.to_dict(), paths=paths, search=result, summary=report, coverage=covered)

    def judge(self, candidate: Candidate) -> bool:
        """Fine-tune ``candidate`` and say whether it holds on the selection split."""
        begun = time.perf_counter()
        data, layout = self.data, self.run.layout
        family = self.family(candidate)
        where = {"uniform": f"uniform-rank ladder of {len(self.result.uniform)}",
                 "descent": f"descent of {len(self.descent)}", "front": f"front of {len(self.result.pareto)}"}
        factors, start = self.start(candidate)
        _logger.info("fine-tuning trial %d (%d of at most %d; %s) from %s, drop %.2f points before fine-tuning",
                     candidate.trial, len(self.attempts) + 1, self.spec.max_finetunes, where[family],
                     "plain-SVD factors" if start == "svd" else "the search's factors",
                     100 * self.start_drop(candidate))
        model = factors.build(dict(candidate.ranks), schemes=candidate.schemes)
        tuned = finetune(clone_module(model).train(), teacher=clone_module(self.module),
                         root_dir=layout.finetune(candidate.trial), config=self.spec.finetune,
                         train_dataloaders=data.train, val_dataloaders=DataLoader(data.search, batch_size=None),
                         forward=self.spec.forward, inherited=self.inherited, name=f"trial{candidate.trial}")
        evaluation = self.selector.evaluate(tuned)
        drop = self.run.search.drop(self.base_select.value, evaluation.value)
        error = standard_error(self.base_select, evaluation)
        margin = self.spec.select_margin * error
        attempt = Attempt(candidate, tuned, evaluation, drop, drop_interval(self.base_select, evaluation),
                          drop + margin <= self.allowed_select, time.perf_counter() - begun, family,
                          start, self.start_drop(candidate))
        self.attempts.append(attempt)
        _logger.info("trial %d after fine-tuning: drop %.2f points on %s (allowed %.2f): %s", candidate.trial,
                     100 * drop, data.select_split, 100 * self.allowed_select,
                     "holds" if attempt.holds else "does not hold")
        # Further down by more than one standard error: a near-dense rung's noise does not switch the start.
        if start == "svd" and self.spec.finetune_from == "auto" and drop - error > candidate.drop:
            self.plain_start_lost = True
            _logger.info("fine-tuned from plain-SVD factors, trial %d ended further down (%.2f points) than the "
                         "search's factors started (%.2f): the next candidates start from the search's factors",
                         candidate.trial, 100 * drop, 100 * candidate.drop)
        return attempt.holds

    def descend(self, winner: Candidate, failed: Candidate | None, points: int) -> tuple[Candidate, ...]:
        """Cheaper variants of the ladder's winner, scored before fine-tuning (see :meth:`SearchResult.descend`).

        The cuts are ordered by the drop of the factors the fine-tunes start from: on the MNIST-1D
        MLP plain-SVD factors ranked them as fine-tuning did where the search's whitened ones did
        not (``lrsearch.study._descent``).
        """
        begun = time.perf_counter()
        drop: Callable[[Candidate], float] = self.start_drop
        self.descent = self.result.descend(winner, points=points, drop=drop,
                                           ceiling=None if failed is None else drop(failed))
        self.descent_seconds = time.perf_counter() - begun
        _logger.info("descent from trial %d: %d cheaper variants to bisect (%.1f s of scoring)", winner.trial,
                     len(self.descent), self.descent_seconds)
        return self.descent

    def start(self, candidate: Candidate) -> tuple[Decomposition, str]:
        """The factors ``candidate``'s fine-tune starts from, and their name: "svd" or "search".

        ``finetune_from="auto"``: plain SVD until a fine-tune from it ends further down on the
        selection split, by more than a standard error, than the search's own factors started
        (the trial's drop on the search split), then the search's factors. On the MNIST-1D MLP
        plain SVD recovered better even from three times the drop; on all-MiniLM-L6-v2 a short
        fine-tune lost ground from it.
        """
        if self.starting is self.result.decomposition or self.plain_start_lost:
            return self.result.decomposition, "search"
        return self.starting, "svd"

    def start_drop(self, candidate: Candidate) -> float:
        """The drop on the search split of the factors ``candidate``'s fine-tune would start from."""
        return self.svd_drop(candidate) if self.start(candidate)[1] == "svd" else candidate.drop

    def svd_drop(self, candidate: Candidate) -> float:
        """The drop on the search split of ``candidate`` built from plain-SVD factors (evaluated once)."""
        if candidate.trial not in self.svd_drops:
            model = self.starting.build(dict(candidate.ranks), schemes=candidate.schemes)
            value = self.searcher.evaluate(model).value
            self.svd_drops[candidate.trial] = self.run.search.drop(self.result.baseline, value)
        return self.svd_drops[candidate.trial]

    def family(self, candidate: Candidate) -> str:
        """Where the selection found ``candidate``: "uniform" (the ladder), "descent" (from its winner) or "front"."""
        if candidate in self.result.uniform:
            return "uniform"
        return "descent" if candidate in self.descent else "front"

    def save(self, report: Report, final: nn.Module | None) -> dict[str, Path]:
        """The result files, all together: Ctrl-C while they are written waits until they are."""
        layout = self.run.layout
        paths: dict[str, Path] = {}
        with _ctrl_c_deferred():
            if final is not None:
                paths["model"] = save(final, layout.model, metadata={"report": "../report.json"})
                paths["checkpoint"] = _save_checkpoint(final, layout.checkpoint)
            report.paths = {**{name: str(path) for name, path in paths.items()}, "study": redacted(self.result.storage)}
            paths["report"], paths["report_html"] = write_report(layout.root, report.to_dict())
        return paths


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
