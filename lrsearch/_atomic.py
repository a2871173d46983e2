"""Atomic file writes: a reader sees the old file or the new one, never half of one.

A full disk or an I/O error while writing leaves no temporary file and the old file (if any)
untouched, and surfaces as :class:`~lrsearch.StorageIOError`. The file gets the permissions a
plain ``open`` would give it (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from lrsearch._errors import StorageIOError, format_problem

__all__ = ["DISK_ERRNOS", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "disk_error"]

# The failures of the disk rather than of the caller: full, over quota, broken, read-only.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EROFS})


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (``os.umask`` sets it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def disk_error(path: Path, error: OSError) -> StorageIOError:
    """``error`` (one of :data:`DISK_ERRNOS`) writing ``path``, as the typed error lrsearch raises."""
    return StorageIOError(format_problem(
        f"Could not write {path}: {error.strerror or error}",
        hint=f"free space on the disk holding {path.parent} (or fix it), or write elsewhere; "
             "any earlier version of the file is unchanged."), errno=error.errno, filename=str(path))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``.

    Raises:
        StorageIOError: the disk is full, over quota, failing or read-only.
    """
    target = Path(path)
    tmp: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
            raise disk_error(target, error) from error
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Serialize first (so an unserializable object leaves no file), then write atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
