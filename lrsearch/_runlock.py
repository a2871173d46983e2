"""Lock files that a dead process no longer holds: one run per run folder, one study setup at a time.

``fcntl.flock`` on an open file is dropped by the kernel when its process ends, however it ends
(SIGKILL, a crash, a lost NFS client's lease), so a lock never outlives its holder the way a PID
file does. The file names its holder (PID and host) for whoever finds it taken, and is removed
on release, so a finished run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lrsearch._errors import RunFolderInUseError, format_problem

__all__ = ["LOCK_NAME", "file_lock", "presence", "run_lock"]

LOCK_NAME = ".lrsearch.lock"

_logger = logging.getLogger("lrsearch")


def _holder(path: Path) -> str:
    """Who holds ``path``, as its holder wrote it: ``PID 123 on HOST``."""
    try:
        pid, _, host = path.read_text().partition(" ")
    except OSError:
        pid = host = ""
    return f"PID {pid} on {host.strip()}" if pid.isdigit() and host.strip() else "another process"


def _open_locked(path: Path, *, wait: bool, shared: bool = False) -> int | None:
    """A descriptor holding a flock on ``path`` (created if need be); None if taken and not ``wait``.

    Exclusive unless ``shared``; an exclusive holder writes its PID and host into the file.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
            # The previous holder removes the file on release: if it did so after we opened it,
            # we locked a file nobody else can find, so start again on the one at the path.
            opened, current = os.fstat(fd), os.stat(path)
            if (opened.st_dev, opened.st_ino) == (current.st_dev, current.st_ino):
                if not shared:
                    with contextlib.suppress(OSError):  # only informs others; a full disk must not stop us
                        os.ftruncate(fd, 0)
                        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
                return fd
        except BlockingIOError:
            os.close(fd)
            return None
        except FileNotFoundError:  # removed between our open and our stat: as above
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _release(path: Path, fd: int) -> None:
    """Remove the file while still holding it (see :func:`_open_locked`), then let go."""
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


@contextmanager
def file_lock(path: str | os.PathLike[str], *, waiting: str, unless_read_only: bool = False) -> Iterator[None]:
    """Hold ``path`` exclusively, waiting for its holder if need be; ``waiting`` says for what, in the log.

    With ``unless_read_only``, a folder this process may not write in is no error: the block runs
    unlocked (a reader of a study someone else owns changes nothing that needs the lock).
    Not reentrant: a process that takes the same lock twice waits for itself.
    """
    target = Path(path)
    try:
        fd = _open_locked(target, wait=False)
    except OSError as error:
        if not (unless_read_only and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS)):
            raise
        yield
        return
    if fd is None:
        _logger.info("waiting for %s, which holds %s, to finish %s", _holder(target), target, waiting)
        fd = _open_locked(target, wait=True)
    assert fd is not None, "a blocking flock returns only once it holds the lock"
    try:
        yield
    finally:
        _release(target, fd)


@contextmanager
def run_lock(run_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Claim ``run_dir`` for this process until the block ends; its lock file's path.

    A second run on the same folder (another ``lrsearch tune``, a second ``compress``) stops at
    once with :class:`RunFolderInUseError` instead of interleaving its files with the first's.
    The folder is created if need be, and removed again on release if this left it empty.

    Raises:
        RunFolderInUseError: a live process holds the folder.
    """
    folder = Path(run_dir)
    created = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = _open_locked(path, wait=False)
    if fd is None:
        raise RunFolderInUseError(format_problem(
            f"Run folder {folder} in use by {_holder(path)}",
            hint="wait for that run to end, or give this one another run folder (--run_dir)."))
    try:
        yield path
    finally:
        _release(path, fd)
        for parent in created:  # innermost first
            try:
                parent.rmdir()
            except OSError:  # not empty: the run wrote something
                break


@contextmanager
def presence(path: str | os.PathLike[str], *, if_alone: Callable[[], object]) -> Iterator[None]:
    """Be present at ``path`` for the block, with every other process there: a shared flock each.

    A process that comes while no other is present calls ``if_alone()`` first, still holding the
    file exclusively, so nobody joins meanwhile: the place for work that is safe only when no
    other live process could be using what it touches. The last to leave removes the file.
    """
    target = Path(path)
    fd = _open_locked(target, wait=False)
    if fd is None:
        fd = _open_locked(target, wait=True, shared=True)
        assert fd is not None, "a blocking flock returns only once it holds the lock"
    else:
        try:
            if_alone()
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            _release(target, fd)
            raise
    try:
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # others are still here
            os.close(fd)
        else:
            _release(target, fd)
