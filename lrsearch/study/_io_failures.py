"""A full disk (or an I/O error) while a search writes its study: a typed error, and no debris.

Whatever layer the failure surfaces in (an ``OSError`` from a journal write or an artifact,
SQLite's ``database or disk is full`` inside SQLAlchemy inside Optuna, PostgreSQL's
``DiskFull``), it becomes one :class:`~lrsearch.StorageIOError`. A study file this run created
is removed if it holds no trial yet, with the folders created for it, so the next run starts
clean; a study with trials is kept, since re-running resumes it.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from optuna.storages.journal import JournalFileSymlinkLock

from lrsearch._atomic import DISK_ERRNOS
from lrsearch._errors import StorageIOError, format_problem
from lrsearch.study._storage import journal_file, redacted, storage_file

__all__ = ["io_failure", "storage_failures"]

_SQLITE = {"SQLITE_FULL": errno.ENOSPC, "SQLITE_IOERR": errno.EIO, "SQLITE_READONLY": errno.EROFS}
_POSTGRES = {"53100": errno.ENOSPC, "58030": errno.EIO}  # disk_full, io_error
_CREATE_TRIAL = 4  # optuna.storages.journal's JournalOperation.CREATE_TRIAL


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def io_failure(error: BaseException) -> int | None:
    """The errno of the disk failure behind ``error`` (ENOSPC, EIO...), or None if it is something else."""
    for link in _chain(error):
        if isinstance(link, OSError) and link.errno in DISK_ERRNOS:
            return link.errno
        if isinstance(link, sqlite3.Error):
            name = getattr(link, "sqlite_errorname", "") or ""
            for prefix, number in _SQLITE.items():
                if name.startswith(prefix):
                    return number
        code = getattr(link, "sqlstate", None) or getattr(link, "pgcode", None)
        if code in _POSTGRES:
            return _POSTGRES[code]
    return None


def _sqlite_trials(path: Path) -> int:
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return int(connection.execute("SELECT COUNT(*) FROM trials").fetchone()[0])
        finally:
            connection.close()
    except sqlite3.Error as error:  # no table yet, or not even a database header: nothing to keep
        name = getattr(error, "sqlite_errorname", "")
        if "no such table" in str(error) or name in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
            return 0
        raise


def _journal_trials(path: Path) -> int:
    count = 0
    with path.open("rb") as handle:
        for line in handle:
            with suppress(ValueError):  # a line cut short by the full disk
                count += json.loads(line).get("op_code") == _CREATE_TRIAL
    return count


def _remove_empty_study(url: str, path: Path) -> bool:
    """Remove the study file ``path`` (and SQLite's side files) if it holds no trial; whether it did.

    Takes no lock (a lock file may not fit on the full disk): a worker that joined the study
    this run began, and has no trial in it yet, fails as this one did.
    """
    try:
        trials = _journal_trials(path) if journal_file(url) is not None else _sqlite_trials(path)
    except (OSError, sqlite3.Error):
        return False  # cannot tell: keep it
    if trials:
        return False
    for suffix in ("", "-wal", "-shm", "-journal"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    return True


def _drop_cut_line(path: Path, *, chunk: int = 1 << 16) -> None:
    """Cut a journal back to its last whole line, under the journal's own lock.

    A write the full disk cut short leaves half a line at the end; the next run's first append
    would glue onto it, and Optuna would refuse to read the journal ever after.
    """
    lock = JournalFileSymlinkLock(str(path))
    if not lock.acquire():
        return
    try:
        with path.open("rb+") as handle:
            end = handle.seek(0, os.SEEK_END)
            position = end
            while position > 0:
                start = max(0, position - chunk)
                handle.seek(start)
                newline = handle.read(position - start).rfind(b"\n")
                if newline >= 0:
                    position = start + newline + 1
                    break
                position = start
            if position < end:
                handle.truncate(position)
    finally:
        lock.release()


@contextmanager
def storage_failures(storage_url: str) -> Iterator[None]:
    """Turn a disk failure in the block into :class:`StorageIOError`, removing the study file it began.

    Enter it before the storage file is first opened, so it knows whether this run creates it.
    """
    path = storage_file(storage_url)
    new = [] if path is None else [p for p in (path, *path.parents) if not os.path.lexists(p)]
    try:
        yield
    except BaseException as error:
        number = io_failure(error)
        if number is None:
            raise
        removed = path is not None and path in new and path.exists() and _remove_empty_study(storage_url, path)
        if not removed and path is not None and journal_file(storage_url) is not None and path.exists():
            with suppress(OSError):  # the repair needs a lock file, which may not fit either
                _drop_cut_line(path)
        if removed:
            for folder in new[1:]:
                try:
                    folder.rmdir()
                except OSError:  # not empty, or not ours after all
                    break
        where = getattr(error, "filename", None) or (path or redacted(storage_url))
        fate = (f"the new study {path} held no trial and was removed" if removed
                else f"study {redacted(storage_url)} keeps the trials it finished")
        raise StorageIOError(format_problem(
            f"Could not write {where}: {os.strerror(number)}; {fate}",
            hint="free space (or fix the disk), or give another run_dir or storage, then re-run the same "
                 "command to resume."), errno=number, filename=str(where)) from error
