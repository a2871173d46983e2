"""``search``: the Optuna study that picks every layer's rank under an accuracy-drop budget.

One process (or many workers sharing a storage) runs the same study. The first one to open
it measures the baseline and the latency table and stores both in the study, so every
worker scores trials identically and a resumed run never measures them again.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.study import _optimize as optuna_optimize
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from lrsearch._atomic import atomic_write_json
from lrsearch._errors import Interrupted, LrSearchError, format_problem
from lrsearch.core import Decomposition, count_params, macs_per_sample
from lrsearch.core._runtime import ForwardFn, batch_size_of, model_device
from lrsearch.core._targets import Patterns
from lrsearch.measure import (
    Budget,
    DeploymentLatency,
    EvaluationError,
    Evaluator,
    LatencyTable,
    build_latency_table,
)
from lrsearch.study._config import SearchConfig
from lrsearch.study._dashboard import publish_plots
from lrsearch.study._descent import DESCENT, allocation_of, descend
from lrsearch.study._fingerprint import check_same_model
from lrsearch.study._io_failures import storage_failures
from lrsearch.study._objective import CONSTRAINT, Objective, PlanCosts
from lrsearch.study._space import Choice, SearchSpace
from lrsearch.study._progress import SearchProgress
from lrsearch.study._storage import check_file_storage, is_file_storage, open_storage, redacted, storage_lock
from lrsearch.study._stored_table import store_latency_table, stored_latency_table
from lrsearch.study._warmstart import (
    GREEDY,
    GreedyBisection,
    kept_energy,
    uniform_allocation,
    uniform_ranks,
    warm_starts,
)
from lrsearch.study._zombies import StopWhenFull, counted_trials, reaping, record_owner

__all__ = ["Candidate", "SearchResult", "search"]

_logger = logging.getLogger("lrsearch")
ATTR = "lrsearch:"
TABLE_FILE = "latency-table.json"


@dataclass(frozen=True)
class Candidate:
    """One evaluated configuration: its ranks and figures (latency is the table's prediction)."""

    trial: int
    ranks: dict[str, Any]
    schemes: dict[str, str]
    metric: float
    drop: float
    params: float
    macs: float
    latency: float | None

    @classmethod
    def from_trial(cls, trial: FrozenTrial) -> Candidate:
        attrs = trial.user_attrs
        ranks = {name: tuple(r) if isinstance(r, list) else r for name, r in attrs["ranks"].items()}
        return cls(trial=trial.number, ranks=ranks, schemes=dict(attrs["schemes"]),
                   metric=attrs["metric"], drop=attrs["drop"], params=attrs["params"],
                   macs=attrs["macs"], latency=attrs.get("latency"))

    def to_dict(self) -> dict[str, Any]:
        return {"trial": self.trial, "ranks": {k: list(v) if isinstance(v, tuple) else v
                                               for k, v in self.ranks.items()},
                "schemes": self.schemes, "metric": self.metric, "drop": self.drop,
                "params": self.params, "macs": self.macs, "latency": self.latency}


@dataclass(frozen=True)
class SearchResult:
    """What a search found: the best feasible configuration (None if none) and the feasible Pareto set.

    ``uniform`` holds the feasible rungs of the uniform-rank ladder (one rank for every layer,
    as a person would try by hand), narrowest rank first: the selection fine-tunes along it too.
    """

    study_name: str
    storage: str
    run_dir: Path
    baseline: float
    budget: Budget
    allowed_drop: float
    best: Candidate | None
    pareto: tuple[Candidate, ...]
    dense: dict[str, float]
    space: SearchSpace = field(repr=False)
    decomposition: Decomposition = field(repr=False)
    latency_table: DeploymentLatency | None = field(default=None, repr=False)
    uniform: tuple[Candidate, ...] = field(default=(), repr=False)
    objective: str = "latency"
    scorer: Callable[[str, Mapping[str, Choice]], Candidate | None] | None = field(
        default=None, repr=False, compare=False)

    def cost(self, candidate: Candidate) -> float:
        """``candidate``'s value of the search's objective (latency, macs or params): what "cheaper" means."""
        return _cost_value(candidate, self.objective)

    def descend(self, anchor: Candidate, *, points: int, ceiling: float | None = None,
                drop: Callable[[Candidate], float] | None = None) -> tuple[Candidate, ...]:
        """Up to ``points`` cheaper variants of ``anchor``, most cut first (:mod:`lrsearch.study._descent`).

        Every variant is scored as a trial of the study after the search (its cost and
        feasibility). ``drop`` orders the cuts and is what ``ceiling`` bounds: by default the
        trial's own drop; the pipeline passes the drop of the factors fine-tuning starts from.
        Empty when the result has no scorer (built by hand).
        """
        scorer = self.scorer
        allocation = allocation_of(self.space, anchor.ranks, anchor.schemes)
        if scorer is None or allocation is None or points < 1:
            return ()
        drop_of = drop or (lambda candidate: candidate.drop)

        def figures(label: str, point: Mapping[str, Choice]) -> tuple[float, float] | None:
            candidate = scorer(label, point)
            return None if candidate is None else (self.cost(candidate), drop_of(candidate))

        chain = descend(self.space, allocation, anchor_cost=self.cost(anchor), anchor_drop=drop_of(anchor),
                        score=figures, label=f"{DESCENT}{anchor.trial}", points=points, ceiling=ceiling)
        found = [scorer(DESCENT, point) for point in reversed(chain)]  # scored already: looked up, not run
        return tuple(candidate for candidate in found if candidate is not None)

    def publish_outcome(self, *, metric: str, budget: str, budget_drop: float, final: int | None,
                        final_note: str = "", outcome: str = "") -> list[str]:
        """Tell the study's dashboard what the pipeline chose: the figures redrawn with every trial (the
        descent's too), the final budget beside the search's constraint and the kept trial's ranks;
        ``outcome`` (one line) and the kept trial as study user attributes.
        """
        with storage_failures(self.storage):
            study = optuna.load_study(study_name=self.study_name,
                                      storage=open_storage(self.storage, heartbeat_interval=None))
            if outcome:
                study.set_user_attr(ATTR + "outcome", outcome)
                study.set_user_attr(ATTR + "kept_trial", final)
            return publish_plots(study, objective=self.objective, metric=metric, constraint=str(self.budget),
                                 constraint_drop=self.allowed_drop, budget=budget, budget_drop=budget_drop,
                                 front=[c.trial for c in self.pareto], dense_cost=self.dense.get(self.objective),
                                 full_ranks={name: self.decomposition.full_rank(name) for name in self.space.layers},
                                 final=final, final_note=final_note)

    def build(self, candidate: Candidate | None = None) -> nn.Module:
        """The compressed model of ``candidate`` (default: the best), from the cached factors."""
        candidate = candidate or self.best
        if candidate is None:
            raise LrSearchError(format_problem("No configuration met the budget, so there is nothing to build",
                                               hint="pass one of result.pareto, or widen the budget."))
        return self.decomposition.build(dict(candidate.ranks), schemes=candidate.schemes)

    @property
    def feasible(self) -> bool:
        return self.best is not None

    def to_dict(self) -> dict[str, Any]:
        return {"study_name": self.study_name, "storage": self.storage, "run_dir": str(self.run_dir),
                "baseline": self.baseline, "budget": self.budget.to_dict(),
                "allowed_drop": self.allowed_drop, "dense": self.dense,
                "best": self.best.to_dict() if self.best else None,
                "pareto": [c.to_dict() for c in self.pareto],
                "uniform": [c.to_dict() for c in self.uniform],
                "searched_layers": {n: list(map(str, s.choices)) for n, s in self.space.layers.items()},
                "fixed_dense": self.space.fixed_dense}


def _sampler(config: SearchConfig) -> optuna.samplers.BaseSampler:
    seed = config.seed + config.worker_index
    if config.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if config.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def search(model: nn.Module, data: Iterable[Any], config: SearchConfig | None = None, *,
           calibration: Iterable[Any] | None = None, metric: Any = None, metric_name: str | None = None,
           batch_fn: Any = None, forward: ForwardFn | None = None, target_modules: Patterns = None,
           exclude_modules: Patterns = None, conv_scheme: str | Mapping[str, str] = "channel",
           callbacks: Sequence[Any] = (), show_progress_bar: bool = False,
           **options: Any) -> SearchResult:
    """Search per-layer ranks of ``model`` that minimize cost with the drop within the budget.

    Args:
        model: the trained model; never modified.
        data: validation batches the search scores candidates on.
        config: a :class:`SearchConfig`; ``**options`` override its fields by name.
        calibration: batches for whitening statistics (default: ``data``).
        metric: a torchmetrics ``Metric``, ``fn(outputs, targets)`` or a
            :class:`~lrsearch.measure.LoggedMetric` (what a LightningModule logs); default top-1 accuracy.
        metric_name: the name the study and dashboard show for the metric.
        batch_fn: ``fn(model, batch) -> (outputs, targets)``; default ``(model(b[0]), b[1])``.
        forward: how a batch is fed to the model for calibration and latency.
        callbacks: extra Optuna callbacks passed to ``study.optimize``.
    """
    try:
        config = replace(config or SearchConfig(), **options)
    except TypeError as error:
        raise TypeError(f"{error}; valid options are the fields of lrsearch.SearchConfig.") from error
    budget, run_dir, storage_url = config.constraint, config.folder, config.storage_url
    # A server first, so an unreachable one fails in seconds, before any evaluation. A file only once
    # the data and the model's layers are checked, so that bad input leaves no study file behind.
    storage = None
    if is_file_storage(storage_url):
        check_file_storage(storage_url)
    else:
        storage = open_storage(storage_url, heartbeat_interval=config.heartbeat_interval)
    with _resume_hint(config.study_name, storage_url), storage_failures(storage_url):
        batches = list(data)
        evaluator = Evaluator(batches, metric=metric, batch_fn=batch_fn, device=model_device(model))
        if evaluator.higher_is_better not in (None, config.higher_is_better):
            raise LrSearchError(format_problem(
                f"The metric {metric!r} improves {'upward' if evaluator.higher_is_better else 'downward'}, "
                f"but higher_is_better={config.higher_is_better}",
                hint=f"pass higher_is_better={evaluator.higher_is_better} (SearchConfig)."))
        baseline = evaluator.evaluate(model)
        allowed = budget.allowed_drop(baseline.value)
        decomposition = Decomposition(model, method=config.method,  # type: ignore[arg-type]
                                      calibration=calibration if calibration is not None else batches,
                                      forward=forward, target_modules=target_modules,
                                      exclude_modules=exclude_modules, conv_scheme=conv_scheme)
        run_dir.mkdir(parents=True, exist_ok=True)
        if storage is None:
            storage = open_storage(storage_url, heartbeat_interval=config.heartbeat_interval)
        directions = ["minimize", "minimize"] if config.two_objectives else ["minimize"]
        study = optuna.create_study(storage=storage, study_name=config.study_name, sampler=_sampler(config),
                                    directions=directions, load_if_exists=True)
        check_same_model(study, decomposition)
        with storage_lock(storage_url, f"the latency table of study {config.study_name!r}"):
            table = _prepared_table(study, config, decomposition, batches, forward, run_dir)
        space = _space(decomposition, config, table).matching(study.get_trials(deepcopy=False))
        costs = PlanCosts(decomposition, dense_params=count_params(model),
                          dense_macs=round(macs_per_sample(model, batches[0], forward=forward)), table=table)
        dense = costs({})
        _prepare_study(study, config, budget=budget, baseline=baseline.value, allowed=allowed, dense=dense,
                       metric_name=metric_name or baseline.metric_name)
        bisection = None
        if config.warm_start:
            cost_of = _cost_fn(space, costs, config.objective)
            with storage_lock(storage_url, f"the warm starts of study {config.study_name!r}"):
                for label, allocation in warm_starts(decomposition, space, cost_of):
                    study.enqueue_trial(space.params(allocation), user_attrs={"warm_start": label},
                                        skip_if_exists=True)
            if config.worker_index == 0:  # one worker refines; the others would probe the same points
                bisection = GreedyBisection(space, kept_energy(decomposition, space), cost_of)
        objective = Objective(decomposition=decomposition, space=space, evaluator=evaluator, baseline=baseline,
                              allowed_drop=allowed, costs=costs, objective=config.objective,
                              two_objectives=config.two_objectives, higher_is_better=config.higher_is_better,
                              early_abort=config.early_abort)
        with reaping(storage_url, study) as reaper, SearchProgress(
                study, n_trials=config.n_trials, objective=config.objective, enabled=show_progress_bar) as progress:
            _run_trials(study, objective, config, space=space, bisection=bisection,
                        callbacks=[*callbacks, reaper, progress])
        feasible = _feasible_candidates(study)
        pareto = _feasible_pareto(feasible, config.objective)
        best = pareto[0] if pareto else None
        publish_plots(study, objective=config.objective, metric=metric_name or baseline.metric_name,
                      constraint=str(budget), constraint_drop=allowed, front=[c.trial for c in pareto],
                      dense_cost=dense.get(config.objective),
                      full_ranks={name: decomposition.full_rank(name) for name in space.layers})
        result = SearchResult(study_name=config.study_name, storage=storage_url, run_dir=run_dir,
                              baseline=baseline.value, budget=budget, allowed_drop=allowed, best=best,
                              pareto=tuple(pareto), dense=dense, space=space, decomposition=decomposition,
                              latency_table=table, uniform=tuple(_uniform_ladder(feasible, space)),
                              objective=config.objective,
                              scorer=_Scorer(study, objective, space, config.study_name, storage_url))
        atomic_write_json(run_dir / "search-result.json", result.to_dict())
        return result


def _space(decomposition: Decomposition, config: SearchConfig, table: DeploymentLatency | None) -> SearchSpace:
    """Each layer's rank choices; a rank the latency table measured no faster than dense is left out."""
    is_faster = None if table is None else (lambda n, s, r: r in table.faster_ranks(n, s))
    space = SearchSpace.build(decomposition, multiple=config.multiple, is_faster=is_faster)
    if not space.layers:
        raise LrSearchError(format_problem(
            "No layer has a rank that is cheaper than its dense version",
            given="; ".join(f"{n}: {r}" for n, r in list(space.fixed_dense.items())[:5]),
            hint="layers this small gain nothing from factorization; try objective='macs' or a larger "
                 "batch_size."))
    return space


def _run_trials(study: optuna.Study, objective: Objective, config: SearchConfig, *, space: SearchSpace,
                bisection: GreedyBisection | None, callbacks: Sequence[Any]) -> None:
    """Run the trials the study still lacks; Ctrl-C ends them cleanly (see :class:`_CtrlC`).

    With a ``bisection``, the enqueued warm starts run first, then the bisection's probes one at a
    time (each depends on the last one's feasibility), then the sampler; all count toward
    ``n_trials`` and share ``timeout``.
    """
    deadline = None if config.timeout is None else time.monotonic() + config.timeout
    ctrl_c = _CtrlC(objective)
    ran: list[FrozenTrial] = []

    def optimize(n_trials: int) -> bool:
        """Up to ``n_trials`` more trials; False once the study is full, out of time or stopped."""
        left = config.n_trials - counted_trials(study)
        timeout = None if deadline is None else deadline - time.monotonic()
        if left <= 0 or ctrl_c.requested or (timeout is not None and timeout <= 0):
            return False  # optimize() would run one trial even when the study already has enough
        # A candidate that fails (the evaluator reports its forward's error as an EvaluationError;
        # the baseline ran fine on the same data) fails its own trial, and the search goes on.
        study.optimize(ctrl_c, n_trials=min(n_trials, left), timeout=timeout,
                       callbacks=[StopWhenFull(config.n_trials), *callbacks,
                                  ctrl_c.stop_if_requested, lambda _study, trial: ran.append(trial)],
                       catch=(RuntimeError, FloatingPointError, EvaluationError))
        return not ctrl_c.requested

    with _no_traceback_for_interrupts(), ctrl_c.handling():
        if bisection is not None:
            waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
            if not waiting or optimize(waiting):
                _bisect(study, space, bisection, optimize, ran)
        optimize(config.n_trials)
    if ctrl_c.requested:
        raise KeyboardInterrupt


def _bisect(study: optuna.Study, space: SearchSpace, bisection: GreedyBisection,
            optimize: Callable[[int], bool], ran: list[FrozenTrial]) -> None:
    """Score the bisection's probes until it has its answer; resumed studies reuse their probes."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        label = str(trial.user_attrs.get("warm_start", ""))
        if label.startswith(GREEDY):
            bisection.observe(float(label.removeprefix(GREEDY)), space.allocation(trial.params), _feasible(trial))
    while (probe := bisection.probe()) is not None:
        fraction, allocation = probe
        study.enqueue_trial(space.params(allocation), user_attrs={"warm_start": f"{GREEDY}{fraction:.6g}"})
        ran.clear()
        if not optimize(1) or not ran:
            return
        bisection.observe(fraction, allocation, _feasible(ran[-1]))


@dataclass(frozen=True)
class _Scorer:
    """Scores one allocation after the search as a trial of its study (a finished twin is reused, not rerun).

    Returns the candidate if it is feasible, else None. Warm starts that a small ``n_trials``
    left enqueued run first (Optuna takes the oldest waiting trial), and count as trials.
    Ctrl-C and storage failures end it as they end the search.
    """

    study: optuna.Study
    objective: Objective
    space: SearchSpace
    study_name: str
    storage_url: str

    def __call__(self, label: str, allocation: Mapping[str, Choice]) -> Candidate | None:
        params = self.space.params(allocation)
        key = SearchSpace.key(params)
        with _resume_hint(self.study_name, self.storage_url), storage_failures(self.storage_url):
            if not self._has(key, TrialState.COMPLETE, TrialState.PRUNED):
                if not self._has(key, TrialState.WAITING):
                    self.study.enqueue_trial(params, user_attrs={"warm_start": label})
                waiting = len(self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
                ctrl_c = _CtrlC(self.objective)
                with _no_traceback_for_interrupts(), ctrl_c.handling():
                    for _ in range(waiting):
                        self.study.optimize(ctrl_c, n_trials=1, callbacks=[ctrl_c.stop_if_requested],
                                            catch=(RuntimeError, FloatingPointError, EvaluationError))
                        if ctrl_c.requested or self._has(key, TrialState.COMPLETE, TrialState.PRUNED):
                            break
                if ctrl_c.requested:
                    raise KeyboardInterrupt
            return _feasible_candidates(self.study).get(key)

    def _has(self, key: tuple[tuple[str, str], ...], *states: TrialState) -> bool:
        """Whether a trial in ``states`` has this configuration (a waiting one holds it as fixed params)."""
        trials = self.study.get_trials(deepcopy=False, states=states)
        return any(SearchSpace.key(trial.params or trial.system_attrs.get("fixed_params", {})) == key
                   for trial in trials)


def _feasible(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.COMPLETE and trial.user_attrs.get("feasible") is True


@contextmanager
def _resume_hint(study_name: str, storage_url: str) -> Iterator[None]:
    """Ctrl-C anywhere in a search (profiling or trials) becomes :class:`Interrupted`, which says how to resume."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        raise Interrupted(f"interrupted; re-run the same command to resume study {study_name!r} at "
                          f"{redacted(storage_url)} (its finished trials are kept)") from interrupt


class _CtrlC:
    """The objective, wrapped so that Ctrl-C stops a search cleanly wherever it lands.

    Inside a trial it interrupts at once (Optuna fails the trial). Elsewhere, Optuna 5 mishandles
    a KeyboardInterrupt: in its heartbeat thread's start the process then hangs at exit (the
    thread is never stopped), in its ``tell`` it crashes with UnboundLocalError, in ``ask`` it
    leaves the trial RUNNING. So there Ctrl-C is deferred: a trial about to start fails at once
    when its objective is entered, one being recorded is recorded, then the loop stops and
    :func:`search` raises KeyboardInterrupt; only a second Ctrl-C while one is deferred
    interrupts wherever it lands. The stop request also covers an interrupt
    that Python swallows (one raised inside a garbage-collection callback is only printed).
    """

    def __init__(self, objective: Callable[[optuna.Trial], Any]) -> None:
        self.objective = objective
        self.requested = self.deferred = self.in_trial = False

    def __call__(self, trial: optuna.Trial) -> Any:
        if self.requested:
            raise KeyboardInterrupt
        record_owner(trial)
        self.in_trial = True
        try:
            return self.objective(trial)
        finally:
            self.in_trial = False

    def stop_if_requested(self, study: optuna.Study, _trial: FrozenTrial) -> None:
        if self.requested:
            study.stop()

    def _on_sigint(self, _signum: int, _frame: Any) -> None:
        self.requested = True
        if self.in_trial or self.deferred:
            raise KeyboardInterrupt
        self.deferred = True

    @contextmanager
    def handling(self) -> Iterator[None]:
        """Our SIGINT handler while optimizing, if Python's default one is in place (main thread)."""
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            yield
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class _DropInterruptTraceback(logging.Filter):
    """Optuna logs a trial failed by Ctrl-C with its whole traceback; keep just the one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            record.exc_info, record.exc_text = None, None
        return True


@contextmanager
def _no_traceback_for_interrupts() -> Iterator[None]:
    logger = logging.getLogger(optuna_optimize.__name__)  # where optuna logs failed trials
    quiet = _DropInterruptTraceback()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _cost_fn(space: SearchSpace, costs: PlanCosts, objective: str) -> Callable[[str, Any], float]:
    """Per-layer cost of a choice in the objective's unit, for the greedy warm start.

    ``PlanCosts`` prices whole models, so a layer's own cost is its dense cost plus the change the
    choice makes to the whole model. (Whole-model costs summed over layers would count the rest of
    the model once per layer, and every greedy fraction below about 1 would buy nothing.)
    """
    dense_model = costs({})[objective]

    def cost(name: str, choice: Any) -> float:
        decoded = space.layers[name].decode(choice)
        change = costs({name: decoded})[objective] - dense_model if decoded else 0.0
        return costs.dense_layer(name, objective) + change
    return cost


def _cost_value(candidate: Candidate, objective: str) -> float:
    return {"latency": candidate.latency, "macs": candidate.macs, "params": candidate.params}[objective] or 0.0


def _prepared_table(study: optuna.Study, config: SearchConfig, decomposition: Decomposition,
                    batches: list[Any], forward: ForwardFn | None, run_dir: Path) -> DeploymentLatency | None:
    """The study's deployment latency; measured (or reused from the run folder) only if the study has none."""
    if config.objective != "latency":
        return None
    stored = stored_latency_table(study)
    if stored is not None:
        return stored
    threads = config.threads or torch.get_num_threads()
    sizes = config.batch_sizes or (batch_size_of(batches[0]),)
    geometries = {name: decomposition.geometry(name).to_dict() for name in decomposition.targets}
    path = run_dir / TABLE_FILE
    cached: dict[int, LatencyTable] = {}
    if path.is_file():
        previous = DeploymentLatency.from_dict(json.loads(path.read_text(encoding="utf-8")))
        cached = {table.batch_size: table for table in previous.tables
                  if table.matches(device=config.device, threads=threads, batch_size=table.batch_size,
                                   layers=geometries)}
    tables = []
    for size in sizes:
        if size not in cached:
            _logger.info("measuring the latency table on %s (%d threads, batch %d)", config.device, threads, size)
            cached[size] = build_latency_table(decomposition, batches[0], batch_size=size, device=config.device,
                                               threads=threads, forward=forward, multiple=config.multiple,
                                               min_run_time=config.latency_min_run_time,
                                               repeats=config.latency_repeats)
        tables.append(cached[size])
    deployment = DeploymentLatency(tuple(tables), config.batch_weights or (1.0,) * len(tables),
                                   config.latency_reduce)
    atomic_write_json(path, deployment.to_dict())
    # Another worker may have stored its table while this one measured: the first stored wins, so
    # every worker offers the same rank choices (Optuna refuses a parameter whose choices differ).
    stored = stored_latency_table(study)
    if stored is not None:
        return stored
    store_latency_table(study, deployment)
    return deployment


def _prepare_study(study: optuna.Study, config: SearchConfig, *, budget: Budget, baseline: float,
                   allowed: float, dense: Mapping[str, float], metric_name: str) -> None:
    """Record the study's fixed facts once; on resume, refuse data that gives another baseline."""
    stored = study.user_attrs.get(ATTR + "baseline")
    if stored is not None:
        if abs(stored - baseline) > 1e-9:
            raise LrSearchError(format_problem(
                f"Study {config.study_name!r} was run on data with baseline {stored:.6f}",
                given=f"a baseline of {baseline:.6f} on this data",
                hint="resume with the same validation data, or use a new study_name."))
        return
    attrs = {"budget": str(budget), "allowed_drop": allowed, "metric": metric_name,
             "objective": config.objective, "constraint": CONSTRAINT,
             "dense": dict(dense), "config": config.to_dict()}
    for key, value in attrs.items():
        study.set_user_attr(ATTR + key, value)
    names = [config.objective, "accuracy_drop"] if config.two_objectives else [config.objective]
    study.set_metric_names(names)
    # Last: a study interrupted while being prepared has no baseline yet, so the next run prepares it again.
    study.set_user_attr(ATTR + "baseline", baseline)


def _feasible_candidates(study: optuna.Study) -> dict[tuple[tuple[str, str], ...], Candidate]:
    """The feasible complete trials, one per configuration (the first that scored it)."""
    found: dict[tuple[tuple[str, str], ...], Candidate] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if not trial.user_attrs.get("feasible") or trial.constraints.get(CONSTRAINT, 1.0) > 0:
            continue
        if "ranks" in trial.user_attrs:
            found.setdefault(SearchSpace.key(trial.params), Candidate.from_trial(trial))
    return found


def _feasible_pareto(feasible: Mapping[Any, Candidate], objective: str) -> list[Candidate]:
    """Feasible candidates not dominated in (cost, drop), cheapest first."""
    candidates = list(feasible.values())
    front = [c for c in candidates if not any(
        _cost_value(o, objective) <= _cost_value(c, objective) and o.drop <= c.drop
        and (_cost_value(o, objective) < _cost_value(c, objective) or o.drop < c.drop) for o in candidates)]
    return sorted(front, key=lambda c: (_cost_value(c, objective), c.drop))


def _uniform_ladder(feasible: Mapping[Any, Candidate], space: SearchSpace) -> list[Candidate]:
    """The feasible rungs of the uniform-rank ladder (:func:`uniform_ranks`), narrowest rank first.

    Ordered by rank, not by measured cost: the rank is what fine-tuning recovers from, and on a
    busy machine two neighbouring rungs can time the wrong way round. Rungs are found by
    configuration, not by warm-start label: a rung that equals another warm start was enqueued
    only once, under that one's label.
    """
    ladder: list[Candidate] = []
    for rank in uniform_ranks(space):
        candidate = feasible.get(SearchSpace.key(space.params(uniform_allocation(space, rank=rank))))
        if candidate is not None and candidate not in ladder:
            ladder.append(candidate)
    return ladder
