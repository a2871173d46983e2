"""One run per run folder (issue 15, part 3), and the storage lock that dies with its holder."""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest

from lrsearch._errors import LrSearchError, RunFolderInUseError
from lrsearch._runlock import LOCK_NAME, run_lock
from lrsearch.study._storage import storage_lock
from tests.reliability._procs import poll

def _hold(take: Callable[[], AbstractContextManager[object]], held: Connection) -> None:
    with take():
        held.send("held")
        time.sleep(120)


def _holder(take: Callable[[], AbstractContextManager[object]]) -> BaseProcess:
    """A forked process that takes the lock and holds it until killed; returns once it holds it."""
    ours, theirs = multiprocessing.Pipe()
    holder = multiprocessing.get_context("fork").Process(target=_hold, args=(take, theirs), daemon=True)
    holder.start()
    assert ours.poll(60) and ours.recv() == "held"
    return holder


def _kill(holder: BaseProcess) -> None:
    holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
    holder.join(timeout=30)


def test_a_second_run_on_a_folder_in_use_stops_at_once_and_runs_once_the_first_is_killed(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    holder = _holder(lambda: run_lock(folder))
    try:
        started = time.monotonic()
        with pytest.raises(RunFolderInUseError, match=rf"in use by PID {holder.pid} on {socket.gethostname()}"):
            with run_lock(folder):
                pass
        assert time.monotonic() - started < 5, "it must not wait for the other run"
        assert isinstance(RunFolderInUseError("x"), LrSearchError)
    finally:
        _kill(holder)
    assert (folder / LOCK_NAME).exists(), "a killed holder leaves its lock file, but not its lock"
    with run_lock(folder) as path:
        assert path.read_text().split() == [str(os.getpid()), socket.gethostname()]
    assert folder.is_dir() and not list(folder.iterdir()), "the lock file is removed on release"


def test_run_lock_removes_the_folders_it_created_only_if_the_run_left_them_empty(tmp_path: Path) -> None:
    with run_lock(tmp_path / "empty" / "run"):
        pass
    assert not (tmp_path / "empty").exists()
    folder = tmp_path / "new" / "run"
    with run_lock(folder):
        (folder / "report.json").write_text("{}")
    assert sorted(p.name for p in folder.iterdir()) == ["report.json"]
    existing = tmp_path / "existing"
    existing.mkdir()
    with run_lock(existing):
        pass
    assert existing.is_dir() and not list(existing.iterdir())


@pytest.mark.parametrize("kind", [pytest.param("postgres", marks=pytest.mark.postgres), "sqlite", "journal"])
def test_the_storage_lock_waits_for_its_holder_and_is_released_when_the_holder_is_killed(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if kind == "postgres":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'study.db'}" if kind == "sqlite" else f"journal:{tmp_path / 'study.log'}"
    holder = _holder(lambda: storage_lock(url, "setup"))
    acquired = threading.Event()

    def take() -> None:
        with storage_lock(url, "setup"):
            acquired.set()

    waiter = threading.Thread(target=take, daemon=True)
    try:
        waiter.start()
        assert not acquired.wait(1.0), "the lock is held by the other process"
    finally:
        _kill(holder)
    poll(acquired.is_set, 30, "the lock of the killed holder")
    waiter.join(timeout=10)
    assert not list(tmp_path.glob("*.lrsearch-lock")), "the lock file is removed on release"
