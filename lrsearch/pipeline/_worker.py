"""``search_worker``: the search step of :func:`compress` alone, for workers sharing one study.

Several processes (or machines) run ``search_worker`` on the same storage and ``study_name``;
then one ``compress`` call with that storage and study name fine-tunes, verifies and saves the
best configuration they found, running no new trials once the study holds ``n_trials``. The
worker must search exactly the batches ``compress`` searches (the study refuses data with
another baseline), so both take the data the same way, through :func:`resolve_data`.

With ``objective="latency"`` the study's latency table decides which ranks every layer may
take, and workers that measured their own tables would offer different choices for the same
parameter (Optuna then fails the trial). So worker 0 measures and stores the table, and the
other workers wait until it is in the study.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
from torch import nn

from lrsearch._errors import LrSearchError, format_problem
from lrsearch.core._runtime import ForwardFn
from lrsearch.core._targets import Patterns
from lrsearch.measure import parse_budget
from lrsearch.pipeline._compress import AUTO, search_constraint
from lrsearch.pipeline._data import calibration_batches, resolve_data
from lrsearch.pipeline._metric import resolve_metric
from lrsearch.study import SearchConfig, SearchResult, search
from lrsearch.study._storage import open_storage, sqlite_url
from lrsearch.study._study import ATTR

__all__ = ["search_worker"]

_logger = logging.getLogger("lrsearch")


def search_worker(module: nn.Module, *, budget: str | float, run_dir: str | Path,
                  search_budget: str | float | None = AUTO, datamodule: Any = None,
                  train_dataloaders: Any = None, val_dataloaders: Any = None, test_dataloaders: Any = None,
                  search_config: SearchConfig | None = None, select_fraction: float = 0.75,
                  max_samples: int | None = 20_000, metric: Any = None,
                  monitor: str | None = None, metric_name: str | None = None, batch_fn: Any = None, forward: ForwardFn | None = None,
                  target_modules: Patterns = None, exclude_modules: Patterns = None,
                  conv_scheme: str | Mapping[str, str] = "channel",
                  show_progress_bar: bool = False, wait_seconds: float = 1800.0) -> SearchResult:
    """Search ranks of ``module`` as :func:`compress` would, without fine-tuning or saving a model.

    Takes the arguments of :func:`compress` that concern the search. Give every worker the
    same ``search_config.storage`` and ``study_name`` and its own ``worker_index``. Worker 0
    creates the study; with ``objective="latency"`` the others wait up to ``wait_seconds`` for
    its latency table. Writes the latency table and ``search-result.json`` into
    ``run_dir / "search"``, as ``compress`` does.
    """
    relative = (search_config or SearchConfig()).relative_budget
    searched = search_constraint(parse_budget(budget, relative=relative), search_budget)
    data = resolve_data(datamodule=datamodule, train_dataloaders=train_dataloaders,
                        val_dataloaders=val_dataloaders, test_dataloaders=test_dataloaders,
                        select_fraction=select_fraction, max_samples=max_samples)
    metric, metric_name = resolve_metric(metric=metric, monitor=monitor, metric_name=metric_name)
    config = replace(search_config or SearchConfig(), budget=searched, run_dir=str(Path(run_dir) / "search"))
    if config.worker_index > 0 and config.objective == "latency":
        _wait_for_latency_table(config, wait_seconds)
    return search(module, data.search, config, calibration=calibration_batches(data.train, data.search),
                  metric=metric, metric_name=metric_name, batch_fn=batch_fn, forward=forward,
                  target_modules=target_modules, exclude_modules=exclude_modules, conv_scheme=conv_scheme,
                  show_progress_bar=show_progress_bar)


def _wait_for_latency_table(config: SearchConfig, wait_seconds: float, *, poll_seconds: float = 1.0) -> None:
    """Block until worker 0 has stored the study's latency table (its search space)."""
    url = config.storage or sqlite_url(Path(config.run_dir) / "study.db")
    storage = open_storage(url, heartbeat_interval=None)
    deadline = time.monotonic() + wait_seconds
    announced = False
    while True:
        try:
            study = optuna.load_study(study_name=config.study_name, storage=storage)
            if ATTR + "latency_table" in study.user_attrs:
                return
        except KeyError:  # worker 0 has not created the study yet
            pass
        if time.monotonic() >= deadline:
            raise LrSearchError(format_problem(
                f"Worker {config.worker_index} waited {wait_seconds:g} s for worker 0 to store the latency "
                f"table of study {config.study_name!r} in {url}",
                hint="start a worker with worker_index=0 on the same storage and study_name."))
        if not announced:
            _logger.info("worker %d waits for worker 0 to measure the latency table of study %r",
                         config.worker_index, config.study_name)
            announced = True
        time.sleep(poll_seconds)
