"""Worker processes for the reliability tests: start them (all killed on the way out), wait on
them with bounded waits, and read their study as a reader does."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial

from lrsearch.study import open_storage

WORKER = Path(__file__).with_name("_worker.py")
Start = Callable[[Path], "subprocess.Popen[bytes]"]


@contextmanager
def processes() -> Iterator[Start]:
    """``start(spec)`` runs a worker with its output in files beside the spec; all are killed at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(spec: Path) -> subprocess.Popen[bytes]:
        with spec.with_suffix(".out").open("wb") as out, spec.with_suffix(".err").open("wb") as err:
            process = subprocess.Popen([sys.executable, str(WORKER), str(spec)], stdout=out, stderr=err,
                                       stdin=subprocess.DEVNULL)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)


def make_spec(folder: Path, name: str, options: dict[str, Any], **knobs: Any) -> Path:
    """A worker's spec file: the saved model and data of ``folder``, the search options and test knobs."""
    spec = folder / f"{name}.json"
    spec.write_text(json.dumps({"state": str(folder / "model.pt"), "data": str(folder / "data.pt"),
                                "options": options, "result": str(folder / f"{name}.result.json"), **knobs}))
    return spec


def stderr_of(spec: Path) -> str:
    return spec.with_suffix(".err").read_text(errors="replace")


def finish(process: subprocess.Popen[bytes], spec: Path, timeout: float = 120) -> None:
    assert process.wait(timeout=timeout) == 0, stderr_of(spec)[-3000:]


def poll(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@contextmanager
def reading(storage: str, study_name: str) -> Iterator[optuna.Study]:
    """The study as a reader sees it: no heartbeats, and no connection left open afterwards."""
    opened = open_storage(storage, heartbeat_interval=None)
    try:
        yield optuna.load_study(study_name=study_name, storage=opened)
    finally:
        if isinstance(opened, RDBStorage):
            opened.engine.dispose()


def study_names(storage: str) -> list[str]:
    opened = open_storage(storage, heartbeat_interval=None)
    try:
        return optuna.get_all_study_names(storage=opened)
    finally:
        if isinstance(opened, RDBStorage):
            opened.engine.dispose()


def trials_of(storage: str, study_name: str) -> list[FrozenTrial]:
    with reading(storage, study_name) as study:
        return study.get_trials()


def hang_and_kill(start: Start, folder: Path, options: dict[str, Any], after: float = 0.0,
                  **knobs: Any) -> None:
    """Start a worker whose first trial hangs; SIGKILL it ``after`` seconds into that trial."""
    marker = folder / "hanging"
    marker.unlink(missing_ok=True)
    spec = make_spec(folder, "victim", {**options, "worker_index": 1}, hang_marker=str(marker), **knobs)
    victim = start(spec)
    poll(lambda: marker.exists() or victim.poll() is not None, 90, "the victim's trial to start")
    assert victim.poll() is None, stderr_of(spec)[-3000:]
    time.sleep(after)
    victim.kill()
    victim.wait(timeout=30)
