"""``RunSpec``: every option of a run of lrsearch, validated once where the run enters.

A run enters through :func:`lrsearch.compress`, :func:`lrsearch.pipeline.search_worker`,
``RankSearch.__init__`` or ``lrsearch tune | worker | finalize``; each builds one
:class:`RunSpec` (the command line generates its flags and YAML keys from these fields) and
passes it down whole. The budgets are parsed here, once; nothing below rewrites an option, and
two options that say the same thing differently (two budgets, two run folders) are a
:class:`~lrsearch._checks.ConflictError`. :meth:`RunSpec.resolve` adds what only the entry
point knows (the run folder) and gives the :class:`Run` that the pipeline reads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from lrsearch._checks import (
    ConflictError,
    check_bool,
    check_choice,
    check_int,
    check_positive,
    check_unit_interval,
    check_unknown,
)
from lrsearch._errors import BudgetError, format_problem
from lrsearch.core import Decomposition
from lrsearch.measure import Budget, parse_budget
from lrsearch.pipeline._data import PipelineData, calibration_batches, resolve_data
from lrsearch.pipeline._finetune import FinetuneConfig
from lrsearch.pipeline._layout import RunLayout
from lrsearch.pipeline._metric import resolve_metric
from lrsearch.study import SearchConfig, SearchResult, search

__all__ = ["AUTO", "FINETUNE_FROM", "Run", "RunSpec", "search_constraint"]

AUTO = "auto"
# Where a fine-tune's factors come from. Whitened factors approximate the trained model best, so
# the search scores with them; plain SVD factors fine-tune better (benchmarks/README.md).
FINETUNE_FROM = ("auto", "svd", "search")
# With search_budget="auto" the search may lose this many times the final budget before
# fine-tuning. Fine-tuning recovers most of a large drop (a uniform rank-32 MNIST-1D MLP: a
# 5.25-point drop became -0.80 points), and the selection bisects the front, so a wide front
# costs a fine-tune or two more, while a narrow one caps the speedup.
SEARCH_WIDENING = 50
# ... but never more than this share of the baseline metric: a model that loses more than
# half of its accuracy before fine-tuning is retraining, not recovery.
MAX_SEARCH_SHARE = 0.5


def search_constraint(budget: Budget, search_budget: Budget | None) -> Budget:
    """The search's constraint before fine-tuning: ``search_budget``, or (None) a widened ``budget``."""
    if search_budget is not None:
        return search_budget
    return Budget(max(min(budget.drop * SEARCH_WIDENING, MAX_SEARCH_SHARE), budget.drop), budget.relative)


def _parsed(name: str, value: Any, relative: bool) -> Budget:
    """``value`` parsed as a budget; the error names the option it came from."""
    try:
        return parse_budget(value, relative=relative)
    except BudgetError as error:
        raise BudgetError(f"{name}: {error}") from None


@dataclass(frozen=True)
class RunSpec:
    """Options of a run of lrsearch: compress, RankSearch, lrsearch tune, worker and finalize.

    Attributes:
        budget: allowed drop of the metric on the test split after fine-tuning: "0.5%" (half an
            accuracy point) or 0.005.
        search_budget: the search's constraint before fine-tuning: auto (50 times budget, at most
            half the baseline metric: fine-tuning recovers most of a large drop) or a budget.
        run_dir: output folder; the same folder resumes its study; unset: lrsearch-runs/tune (in
            the callback: the Trainer's default_root_dir/lrsearch).
        max_finetunes: candidates fine-tuned at most while selecting (the uniform-rank ladder, the
            descent from its winner, then the front; each bisected).
        select_fraction: share of the validation batches held out from the search, to accept or
            reject fine-tuned candidates (the wide search needs few samples).
        select_margin: a fine-tuned candidate holds when its drop plus this many standard errors
            of it is within the budget (0 for logged metrics, which have none): the bisection keeps
            the cheapest candidate that passed, so one that passed by luck would fail on the test split.
        max_samples: samples each split keeps in memory at most; unset: no cap.
        monitor: score by a value the module logs in validation_step (e.g. val_acc), like
            ModelCheckpoint(monitor=...); for a loss also set search.higher_is_better false.
        metric: a torchmetrics Metric or fn(outputs, targets) to score with; unset: top-1
            accuracy of model(inputs).
        metric_name: the metric's name in the study, the dashboard and the report.
        batch_fn: fn(model, batch) -> (outputs, targets); unset: (model(batch[0]), batch[1]).
        forward: fn(model, batch) -> outputs, how calibration, latency timing and distillation
            feed a batch to the model; unset: model(batch[0]).
        target_modules: factorize only modules matching these names or regexes; unset: every
            Linear and Conv2d.
        exclude_modules: keep modules matching these names or regexes dense.
        conv_scheme: how Conv2d layers factorize: channel or spatial, or a map from module name
            to scheme.
        finetune_from: the factors a candidate's fine-tune starts from: svd (plain SVD at the
            candidate's ranks; on the MNIST-1D MLP it recovered 0.4-1.5 points more than
            whitened factors of the same ranks), search (the search's own factors), or auto:
            plain SVD until a fine-tune from it ends further down than the search's factors
            started, then the search's (on all-MiniLM-L6-v2 a short fine-tune from plain SVD
            lost ground).
        progress: show one progress bar over the search's trials, and Lightning's during each
            fine-tune unless finetune.progress says otherwise.
        verbose: also show Optuna's per-trial log lines and warnings and Lightning's messages.
        search: options of the rank search (lrsearch.SearchConfig).
        finetune: options of each candidate's fine-tune (lrsearch.FinetuneConfig).
    """

    budget: str | float = "0.5%"
    search_budget: str | float | None = AUTO
    run_dir: str | Path | None = None
    max_finetunes: int = 5
    select_fraction: float = 0.75
    select_margin: float = 1.0
    max_samples: int | None = 20_000
    monitor: str | None = None
    metric: Callable[..., Any] | None = None
    metric_name: str | None = None
    batch_fn: Callable[..., Any] | None = None
    forward: Callable[..., Any] | None = None
    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    conv_scheme: str | dict[str, str] = "channel"
    finetune_from: str = "auto"
    progress: bool = True
    verbose: bool = False
    search: SearchConfig = field(default_factory=SearchConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    allowed: Budget = field(init=False, repr=False, compare=False)
    """The parsed ``budget``: what the test split's verdict holds the model to."""
    constraint: Budget = field(init=False, repr=False, compare=False)
    """The parsed search constraint (``search_budget``, or the widened ``budget`` for auto)."""

    def __post_init__(self) -> None:
        for name, kind in (("search", SearchConfig), ("finetune", FinetuneConfig)):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, kind())
            elif isinstance(value, Mapping):
                check_unknown(name, value, (f.name for f in fields(kind) if f.init))
                object.__setattr__(self, name, kind(**value))
            elif not isinstance(value, kind):
                raise TypeError(f"{name} must be a {kind.__name__}, a dict or None but got {type(value).__name__}.")
        relative = self.search.relative_budget
        object.__setattr__(self, "allowed", _parsed("budget", self.budget, relative))
        auto = self.search_budget is None or (isinstance(self.search_budget, str)
                                              and self.search_budget.strip().lower() == AUTO)
        searched = None if auto else _parsed("search_budget", self.search_budget, relative)
        object.__setattr__(self, "constraint", search_constraint(self.allowed, searched))
        if self.search.budget is not None:
            raise ConflictError(format_problem(
                f"Two budgets: budget={self.budget!r} and search.budget={self.search.budget!r}",
                hint="in a run, budget is the drop allowed after fine-tuning and search_budget the search's "
                     "constraint before it; leave search.budget unset."))
        if self.search.run_dir is not None:
            raise ConflictError(format_problem(
                f"Two run folders: run_dir={self.run_dir!r} and search.run_dir={self.search.run_dir!r}",
                hint="set run_dir only; the search goes into RUN_DIR/search."))
        check_int("max_finetunes", self.max_finetunes, low=1)
        check_unit_interval("select_fraction", self.select_fraction, open_low=True, open_high=True)
        check_positive("select_margin", self.select_margin, zero=True)
        check_int("max_samples", self.max_samples, low=1, optional=True)
        check_choice("finetune_from", self.finetune_from, FINETUNE_FROM)
        check_bool("progress", self.progress)
        check_bool("verbose", self.verbose)
        resolve_metric(metric=self.metric, monitor=self.monitor, metric_name=self.metric_name)

    @classmethod
    def build(cls, spec: RunSpec | None, options: Mapping[str, Any]) -> RunSpec:
        """``spec`` (default: all defaults) with ``options`` (field names) replaced: keywords build the spec."""
        check_unknown("run", options, (f.name for f in fields(cls) if f.init))
        if spec is None:
            return cls(**options)
        return replace(spec, **options) if options else spec

    def resolve(self, default_run_dir: str | Path | None = None) -> Run:
        """The run this spec describes, in ``run_dir`` (else ``default_run_dir``, else lrsearch-runs/tune)."""
        layout = RunLayout.of(self.run_dir if self.run_dir is not None else default_run_dir)
        metric, metric_name = resolve_metric(metric=self.metric, monitor=self.monitor, metric_name=self.metric_name)
        searched = replace(self.search, budget=self.constraint, run_dir=str(layout.search))
        return Run(self, layout, searched, metric, metric_name)


@dataclass(frozen=True)
class Run:
    """A resolved :class:`RunSpec`: its folder, the search's own config, the metric to score with."""

    spec: RunSpec
    layout: RunLayout
    search: SearchConfig
    metric: Any
    metric_name: str | None

    def data(self, **sources: Any) -> PipelineData:
        """The search, selection and test batches of ``sources`` (datamodule or dataloaders)."""
        return resolve_data(**sources, select_fraction=self.spec.select_fraction, max_samples=self.spec.max_samples)

    def starting_factors(self, module: Any, result: SearchResult) -> Decomposition:
        """The factors fine-tunes start from (see ``finetune_from``): the search's, or plain SVD of the same layers."""
        spec = self.spec
        if spec.finetune_from == "search" or self.search.method == "svd":
            return result.decomposition
        return Decomposition(module, method="svd", forward=spec.forward, layers=list(result.decomposition.targets),
                             conv_scheme=spec.conv_scheme)

    def run_search(self, module: Any, data: PipelineData) -> SearchResult:
        """The rank search of this run on ``data``'s search split."""
        spec = self.spec
        return search(module, data.search, self.search, calibration=calibration_batches(data.train, data.search),
                      metric=self.metric, metric_name=self.metric_name, batch_fn=spec.batch_fn,
                      forward=spec.forward, target_modules=spec.target_modules,
                      exclude_modules=spec.exclude_modules, conv_scheme=spec.conv_scheme,
                      show_progress_bar=spec.progress)
