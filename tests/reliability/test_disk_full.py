"""A full disk (issue 15, part 4): a typed error, nothing half-written, and a study that resumes.

Fault injection covers every platform; the end-to-end cases run on a real, tiny tmpfs when this
process may mount one (root on Linux) and are skipped otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from lrsearch import LrSearchError
from lrsearch._atomic import atomic_write_bytes, atomic_write_json
from lrsearch._errors import StorageIOError
from lrsearch.study import open_storage, search, sqlite_url
from lrsearch.study._io_failures import io_failure, storage_failures
from lrsearch.study._zombies import COUNTED
from tests.reliability._procs import make_spec, processes, stderr_of, trials_of

BASE = {"budget": "1%", "objective": "macs"}


def _full(*_args: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary_file(step: str, tmp_path: Path,
                                                                         monkeypatch) -> None:
    target = tmp_path / "report.json"
    atomic_write_json(target, {"version": 1})
    monkeypatch.setattr(os, step, _full)
    with pytest.raises(StorageIOError, match=r"Could not write .*report\.json: No space left on device") as caught:
        atomic_write_json(target, {"version": 2})
    assert isinstance(caught.value, OSError) and isinstance(caught.value, LrSearchError)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_an_atomic_write_that_fails_for_another_reason_raises_that_error(tmp_path: Path, monkeypatch) -> None:
    def denied(*_args: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(PermissionError):
        atomic_write_bytes(tmp_path / "model.bin", b"x")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_honour_the_umask(umask: int, tmp_path: Path) -> None:
    previous = os.umask(umask)
    try:
        path = atomic_write_bytes(tmp_path / "table.json", b"{}")
        plain = tmp_path / "plain"
        plain.write_bytes(b"")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask == plain.stat().st_mode & 0o777


class _PostgresDiskFull(Exception):
    sqlstate = "53100"


def test_disk_failures_are_recognised_through_the_layers_that_wrap_them() -> None:
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorname = "SQLITE_FULL"
    try:
        try:
            raise full
        except sqlite3.OperationalError as error:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from error
    except optuna.exceptions.StorageInternalError as wrapped:
        assert io_failure(wrapped) == errno.ENOSPC
    assert io_failure(OSError(errno.EIO, "Input/output error")) == errno.EIO
    assert io_failure(_PostgresDiskFull("could not extend file")) == errno.ENOSPC
    assert io_failure(OSError(errno.EACCES, "Permission denied")) is None
    assert io_failure(ValueError("not a disk problem")) is None


def test_a_new_study_that_failed_on_the_disk_before_its_first_trial_is_removed(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "run" / "search" / "study.db")
    with pytest.raises(StorageIOError, match="held no trial and was removed") as caught:
        with storage_failures(url):
            optuna.create_study(study_name="s", storage=open_storage(url))
            _full()
    assert caught.value.errno == errno.ENOSPC
    assert not (tmp_path / "run").exists(), "the study file, its side files and the folders made for it"


def test_a_study_with_trials_is_kept_and_one_that_failed_otherwise_is_untouched(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "study.db")
    with pytest.raises(StorageIOError, match=r"keeps the trials it finished\. HINT: free space"):
        with storage_failures(url):
            study = optuna.create_study(study_name="s", storage=open_storage(url))
            study.enqueue_trial({"x": 1})
            _full()
    assert (tmp_path / "study.db").is_file()
    other = sqlite_url(tmp_path / "other.db")
    with pytest.raises(ValueError, match="not a disk"):
        with storage_failures(other):
            optuna.create_study(study_name="s", storage=open_storage(other))
            raise ValueError("not a disk problem")
    assert (tmp_path / "other.db").is_file()


@contextmanager
def _tmpfs(folder: Path, size: str) -> Iterator[Path]:
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_search_on_a_full_disk_leaves_no_study_file_behind(trained, tmp_path: Path) -> None:
    model, val = trained
    with _tmpfs(tmp_path / "disk", "48k") as disk:
        with pytest.raises(StorageIOError, match="No space left on device.*held no trial and was removed"):
            search(model, val, **BASE, n_trials=4, run_dir=str(disk / "run"))
        assert not list(disk.iterdir()), "no run folder, no study.db, no -wal, -shm or lock file"


@pytest.mark.slow
def test_a_journal_that_filled_the_disk_mid_search_resumes_once_there_is_space(trained, saved: Path) -> None:
    model, val = trained
    with _tmpfs(saved / "disk", "16k") as disk:
        storage = f"journal:{disk / 'study.log'}"
        options = {**BASE, "n_trials": 12, "storage": storage, "study_name": "full", "run_dir": str(disk / "run")}
        spec = make_spec(saved, "filler", options)
        with processes() as start:
            status = start(spec).wait(timeout=120)
        stderr = stderr_of(spec)
        assert status != 0 and "StorageIOError" in stderr, stderr[-3000:]
        assert "No space left on device; study journal:" in stderr and "keeps the trials it finished" in stderr
        assert (disk / "study.log").read_bytes().endswith(b"\n"), "the line the full disk cut short is gone"
        before = {t.number: t.state for t in trials_of(storage, "full") if t.state.is_finished()}
        assert before

        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)  # space is freed
        search(model, val, **options)
        trials = trials_of(storage, "full")
        assert not [t for t in trials if t.state == TrialState.RUNNING], "the filler's last trial is reaped"
        assert {t.number: t.state for t in trials if t.number in before} == before
        assert len([t for t in trials if t.state in COUNTED
                    and not any(o.system_attrs.get("failed_trial") == t.number for o in trials)]) == 12
