"""``search_worker``: the search step of :func:`compress` alone, for workers sharing one study.

Several processes (or machines) run ``search_worker`` on the same storage and ``study_name``;
then one ``compress`` call with that storage and study name fine-tunes, verifies and saves the
best configuration they found, running no new trials once the study holds ``n_trials``. The
worker must search exactly the batches ``compress`` searches (the study refuses data with
another baseline), so both take the data the same way, through :func:`resolve_data`.

With ``objective="latency"`` the study's latency table decides which ranks every layer may
take, and workers that measured their own tables would offer different choices for the same
parameter (Optuna then fails the trial). So the table is measured under the storage's lock
(:func:`lrsearch.study._storage.storage_lock`): the first worker to need it measures and stores
it while the others wait for the lock, then read it from the study; a worker killed while
measuring releases the lock, and the next one measures instead.
"""

from __future__ import annotations

from typing import Any

import optuna
from torch import nn

from lrsearch._errors import format_problem
from lrsearch.pipeline._console import run_console
from lrsearch.pipeline._spec import RunSpec
from lrsearch.study import SearchResult
from lrsearch.study._storage import StorageError, open_storage, redacted, storage_file
from lrsearch.study._zombies import counted_trials as study_trials

__all__ = ["check_study_exists", "counted_trials", "search_worker"]


def search_worker(module: nn.Module, spec: RunSpec | None = None, *, datamodule: Any = None,
                  train_dataloaders: Any = None, val_dataloaders: Any = None, test_dataloaders: Any = None,
                  **options: Any) -> SearchResult:
    """Search ranks of ``module`` as :func:`compress` would, without fine-tuning or saving a model.

    Takes the same spec and data as :func:`compress`. Give every worker the same
    ``search.storage`` and ``study_name`` and its own ``worker_index``; start them in any order.
    Writes the latency table and ``search-result.json`` into ``RUN_DIR/search``, as ``compress`` does.
    """
    run = RunSpec.build(spec, options).resolve()
    with run_console(verbose=run.spec.verbose):
        data = run.data(datamodule=datamodule, train_dataloaders=train_dataloaders,
                        val_dataloaders=val_dataloaders, test_dataloaders=test_dataloaders)
        return run.run_search(module, data)


def check_study_exists(storage_url: str) -> None:
    """Reading a study must not create an empty journal or SQLite file by opening a mistyped path."""
    path = storage_file(storage_url)
    if path is not None and not path.is_file():
        raise StorageError(f"no study file at {path} ({storage_url}).")


def counted_trials(storage_url: str, study_name: str) -> int:
    """The trials an existing study counts toward ``n_trials``: what ``finalize`` takes as its total."""
    check_study_exists(storage_url)
    storage = open_storage(storage_url, heartbeat_interval=None)
    names = [s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)]
    if study_name not in names:
        raise StorageError(format_problem(
            f"No study {study_name!r} in {redacted(storage_url)}", given=f"studies {names}" if names else "no study",
            hint="run lrsearch worker with this --storage and --study-name first, or fix the name."))
    finished = study_trials(optuna.load_study(study_name=study_name, storage=storage))
    if finished == 0:
        raise StorageError(f"study {study_name!r} in {redacted(storage_url)} has no trials yet; run workers first.")
    return finished
