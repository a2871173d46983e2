"""Optuna storages by URL: SQLite by default, a journal file on one machine, any RDB across machines."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from lrsearch._errors import LrSearchError, format_problem
from lrsearch._runlock import file_lock

__all__ = ["StorageError", "check_file_storage", "fail_stale_trials", "open_storage", "sqlite_url", "storage_lock"]

_logger = logging.getLogger("lrsearch")

JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")
SQLITE_HEADER = b"SQLite format 3\x00"
LOCK_SUFFIX = ".lrsearch-lock"


class StorageError(LrSearchError, ValueError):
    """The study storage cannot be opened or reached."""


def sqlite_url(path: str | os.PathLike[str]) -> str:
    """The URL optuna-dashboard and Optuna both accept for a SQLite file."""
    return f"sqlite:///{Path(path).resolve()}"


def is_file_storage(url: str) -> bool:
    """A journal or SQLite file on this machine: opening it writes the file, and it cannot be unreachable."""
    return url.startswith("sqlite:") or journal_file(url) is not None


def check_file_storage(url: str) -> None:
    """Fail now, writing nothing, if a journal or SQLite file could not be created or written later.

    File storages are opened only after the data and the model are checked (opening writes the
    file), so without this a mistyped path would surface only after minutes of profiling.
    """
    path = storage_file(url)
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
    elif existing == path:
        problem = _foreign_content(path, journal=journal_file(url) is not None)
    if problem is not None:
        raise StorageError(format_problem(f"The study storage {path} {problem}",
                                          hint="pass --storage (storage=) a writable file path, or another run_dir."))


def _foreign_content(path: Path, *, journal: bool) -> str | None:
    """Why the existing file ``path`` is not a study of the kind its URL says, or None if it may be one."""
    try:
        with path.open("rb") as handle:
            head = handle.readline(4096) if journal else handle.read(len(SQLITE_HEADER))
    except OSError as error:
        return f"cannot be read: {error.strerror}"
    if not head:
        return None  # empty: Optuna starts a study in it
    if journal:
        try:
            first = json.loads(head)
        except ValueError:
            first = None
        return None if isinstance(first, dict) and "op_code" in first else "is not an Optuna journal file"
    return None if head == SQLITE_HEADER else "is not a SQLite database"


def storage_file(url: str) -> Path | None:
    journal = journal_file(url)
    if journal is not None:
        return journal.absolute()
    if url.startswith("sqlite:///"):
        name = url.removeprefix("sqlite:///").split("?")[0]
        return Path(name).absolute() if name and name != ":memory:" else None
    return None


def journal_file(url: str) -> Path | None:
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
    retried once by the next worker that asks for a trial. Any number of processes may open a
    new storage at the same moment: the tables are created under :func:`storage_lock`.
    """
    path = journal_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise StorageError(format_problem(
            f"Cannot tell what kind of storage {url!r} is",
            expected="an RDB URL (sqlite:///run/study.db, postgresql://user@host/db) or a journal "
                     "file (journal:run/study.log)",
            hint="prefix a journal file path with 'journal:'."))
    file = storage_file(url)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
    heartbeat = {}
    if heartbeat_interval:
        heartbeat = {"heartbeat_interval": heartbeat_interval, "grace_period": 2 * heartbeat_interval,
                     "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=1)}
    try:
        with storage_lock(url, "schema", connect_timeout=connect_timeout):
            storage = RDBStorage(_with_postgres_driver(url), engine_kwargs=_engine_kwargs(url, connect_timeout),
                                 **heartbeat)
    except (ImportError, ModuleNotFoundError) as error:
        raise StorageError(format_problem(f"The driver for {url.split(':')[0]} is not installed: {error}",
                                          hint="pip install 'lrsearch[distributed]'")) from error
    except Exception as error:  # SQLAlchemy raises many types; all mean "cannot open"
        hint = ("check that the file is an Optuna study and its folder is writable." if file is not None
                else "check the URL, the server and the credentials.")
        raise StorageError(format_problem(f"Cannot open the study storage {redacted(url)!r}: {_reason(error)}",
                                          hint=hint)) from error
    if url.startswith("sqlite"):
        _tune_sqlite(storage, writable=file is None or os.access(file, os.W_OK))
    return storage


def _reason(error: Exception) -> str:
    """The driver's own words, on one line, without SQLAlchemy's wrapping (class names, SQL, links)."""
    original = getattr(error, "orig", None) if isinstance(error, sqlalchemy.exc.DBAPIError) else None
    return " ".join(str(original or error).split())


def _engine_kwargs(url: str, connect_timeout: int) -> dict[str, Any]:
    if url.startswith(("postgres", "mysql")):
        return {"connect_args": {"connect_timeout": connect_timeout}}
    return {}


@contextmanager
def storage_lock(url: str, scope: str, *, connect_timeout: int = 10) -> Iterator[None]:
    """Hold the storage's lock named ``scope`` for the block: one process at a time, wherever it runs.

    What Optuna does not make atomic happens under it: creating the tables of a new database,
    measuring the study's latency table, enqueuing warm starts, failing zombie trials. The lock
    dies with its holder, so a killed worker never blocks the others: a PostgreSQL advisory
    lock (held by a connection the server drops when the process dies) on a server, an
    ``flock`` on a file beside a journal or SQLite file (one lock per file, whatever ``scope``).
    Other servers (MySQL...) take no lock. Not reentrant.
    """
    file = storage_file(url)
    if file is not None:
        with file_lock(file.with_name(file.name + LOCK_SUFFIX), waiting=f"{scope} of {file.name}",
                       unless_read_only=True):
            yield
        return
    if not url.startswith(("postgresql", "postgres:")):
        yield
        return
    engine = sqlalchemy.create_engine(_with_postgres_driver(url), poolclass=sqlalchemy.pool.NullPool,
                                      isolation_level="AUTOCOMMIT", **_engine_kwargs(url, connect_timeout))
    key = int.from_bytes(hashlib.sha256(f"lrsearch:{scope}".encode()).digest()[:8], "big", signed=True)
    try:
        with engine.connect() as connection:
            if not connection.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar():
                _logger.info("waiting for another process to finish %s in %s", scope, redacted(url))
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            yield  # closing the connection releases the lock
    finally:
        engine.dispose()


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


def _tune_sqlite(storage: RDBStorage, *, writable: bool) -> None:
    """WAL with ``synchronous=NORMAL``, and transactions that take the write lock when they begin.

    WAL: a commit no longer waits for fsync (8 ms → 0.1 ms here). A killed process still loses
    nothing committed; only an OS crash or power loss can drop the last commits. Without this,
    SQLite writes dominate the cost of a search trial.

    ``BEGIN IMMEDIATE``: Python's sqlite3 starts a transaction only at the first write, so
    Optuna's "read a WAITING trial, mark it RUNNING" ran as two steps, and two processes could
    both take the same enqueued trial and evaluate it twice (then one crashed telling it). Not
    on a file this process may only read (a dashboard on someone else's study): it writes nothing.
    """
    def on_connect(connection: Any, _record: Any) -> None:
        if writable:
            connection.isolation_level = None  # no implicit BEGIN: the "begin" event below issues it
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    def on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    sqlalchemy.event.listen(storage.engine, "connect", on_connect)
    if writable:
        sqlalchemy.event.listen(storage.engine, "begin", on_begin)
    storage.engine.dispose()


def fail_stale_trials(storage_url: str, study_name: str, *, older_than: float) -> list[int]:
    """Mark RUNNING trials that started more than ``older_than`` seconds ago FAIL; their numbers.

    A search fails the trials of workers killed on its own host by itself, and on a journal or
    SQLite file every RUNNING trial when it starts while no other worker is present. This is
    for the rest: a worker on another machine killed mid-trial on a journal file shared over
    NFS, which has no heartbeats; its trial counts toward ``n_trials`` and the TPE sampler
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
