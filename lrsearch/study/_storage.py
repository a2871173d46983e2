"""Optuna storages by URL: SQLite by default, a journal file on one machine, any RDB across machines."""

from __future__ import annotations

import importlib.util
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from lrsearch._errors import LrSearchError, format_problem

__all__ = ["StorageError", "check_file_storage", "fail_stale_trials", "open_storage", "sqlite_url"]

JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")


class StorageError(LrSearchError, ValueError):
    """The study storage cannot be opened or reached."""


def sqlite_url(path: str | os.PathLike[str]) -> str:
    """The URL optuna-dashboard and Optuna both accept for a SQLite file."""
    return f"sqlite:///{Path(path).resolve()}"


def is_file_storage(url: str) -> bool:
    """A journal or SQLite file on this machine: opening it writes the file, and it cannot be unreachable."""
    return url.startswith("sqlite:") or _journal_path(url) is not None


def check_file_storage(url: str) -> None:
    """Fail now, writing nothing, if a journal or SQLite file could not be created or written later.

    File storages are opened only after the data and the model are checked (opening writes the
    file), so without this a mistyped path would surface only after minutes of profiling.
    """
    path = _file_of(url)
    if path is None:
        return
    existing = next(parent for parent in (path, *path.parents) if parent.exists())
    problem = None
    if existing == path and path.is_dir():
        problem = "is a folder, not a file"
    elif existing != path and not existing.is_dir():
        problem = f"cannot be created: {existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK):
        problem = f"cannot be written: {existing} is read-only"
    if problem is not None:
        raise StorageError(format_problem(f"The study storage {path} {problem}",
                                          hint="pass --storage (storage=) a writable file path, or another run_dir."))


def _file_of(url: str) -> Path | None:
    journal = _journal_path(url)
    if journal is not None:
        return journal.absolute()
    if url.startswith("sqlite:///"):
        name = url.removeprefix("sqlite:///").split("?")[0]
        return Path(name).absolute() if name and name != ":memory:" else None
    return None


def _journal_path(url: str) -> Path | None:
    """The file of a journal storage (``journal:PATH`` or a ``.log``/``.journal``/``.jsonl`` path)."""
    if url.startswith("journal:") or url.endswith(JOURNAL_SUFFIXES):
        return Path(url.removeprefix("journal:"))
    return None


def redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    if "://" not in url:
        return url
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses; it has no password we could find either
        return url


def open_storage(url: str, *, heartbeat_interval: int | None = 60, connect_timeout: int = 10) -> BaseStorage:
    """Open ``url``: a journal file (``journal:PATH`` or a ``.log``/``.journal`` path) or an RDB URL.

    RDB storages get heartbeats, so a trial left RUNNING by a killed worker is failed and
    retried once by the next worker that asks for a trial.
    """
    path = _journal_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise StorageError(format_problem(
            f"Cannot tell what kind of storage {url!r} is",
            expected="an RDB URL (sqlite:///run/study.db, postgresql://user@host/db) or a journal "
                     "file (journal:run/study.log)",
            hint="prefix a journal file path with 'journal:'."))
    url = _with_postgres_driver(url)
    engine_kwargs = {}
    if url.startswith(("postgresql", "mysql")):
        engine_kwargs = {"connect_args": {"connect_timeout": connect_timeout}}
    heartbeat = {}
    if heartbeat_interval:
        heartbeat = {"heartbeat_interval": heartbeat_interval, "grace_period": 2 * heartbeat_interval,
                     "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=1)}
    try:
        storage = RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
    except (ImportError, ModuleNotFoundError) as error:
        raise StorageError(format_problem(f"The driver for {url.split(':')[0]} is not installed: {error}",
                                          hint="pip install 'lrsearch[distributed]'")) from error
    except Exception as error:  # SQLAlchemy raises many types; all mean "cannot open"
        raise StorageError(format_problem(f"Cannot open the study storage {redacted(url)!r}: {error}",
                                          hint="check the URL, the server and the credentials.")) from error
    if url.startswith("sqlite"):
        _use_write_ahead_log(storage)
    return storage


def _with_postgres_driver(url: str) -> str:
    """``postgresql://`` with the driver that is installed: psycopg 3, else psycopg2.

    SQLAlchemy 2.0 maps a bare ``postgresql://`` to psycopg2 and 2.1 to psycopg 3, so the same
    URL would need a different package depending on the SQLAlchemy version.
    """
    scheme, _, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        return url
    for driver in ("psycopg", "psycopg2"):
        if importlib.util.find_spec(driver) is not None:
            return f"postgresql+{driver}://{rest}"
    return url  # SQLAlchemy's ImportError becomes the "driver is not installed" StorageError


def _use_write_ahead_log(storage: RDBStorage) -> None:
    """WAL with ``synchronous=NORMAL``: a commit no longer waits for fsync (8 ms → 0.1 ms here).

    A killed process still loses nothing committed; only an OS crash or power loss can drop
    the last commits. Without this, SQLite writes dominate the cost of a search trial.
    """
    def pragmas(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    sqlalchemy.event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()


def fail_stale_trials(storage_url: str, study_name: str, *, older_than: float) -> list[int]:
    """Mark RUNNING trials that started more than ``older_than`` seconds ago FAIL; their numbers.

    A worker killed mid-trial (SIGKILL, a lost machine) leaves its trial RUNNING forever on a
    journal file, which has no heartbeats; it counts toward ``n_trials`` and the TPE sampler
    treats it as a bad point. Run this only when no live worker has a trial that old: pick
    ``older_than`` above the longest trial. A trial another process finishes meanwhile is left
    alone. Start times are the workers' local clocks, so workers on machines in other time
    zones need a correspondingly larger ``older_than``.
    """
    if isinstance(older_than, bool) or not isinstance(older_than, (int, float)) or not older_than >= 0:
        raise ValueError(f"older_than must be a non-negative number of seconds but got {older_than!r}.")
    storage = open_storage(storage_url, heartbeat_interval=None)
    try:
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
        except KeyError as error:
            raise StorageError(format_problem(f"There is no study {study_name!r} in {redacted(storage_url)!r}",
                                              hint="check the study name and the storage URL.")) from error
        now = datetime.now()
        failed = []
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            started = trial.datetime_start
            if started is not None and (now - started).total_seconds() < older_than:
                continue
            try:
                frozen = study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            except optuna.exceptions.UpdateFinishedTrialError:  # finished between the check and the write
                continue
            if frozen.state == TrialState.FAIL:
                failed.append(trial.number)
        return failed
    finally:
        if isinstance(storage, RDBStorage):
            storage.engine.dispose()
