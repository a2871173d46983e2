"""Each exit status means one thing: 3 for a failed write, 4 for an internal error with its traceback logged."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from lrsearch import cli
from lrsearch._errors import RunFolderInUseError, StorageIOError
from lrsearch._runlock import run_lock


def _raising(error: BaseException):
    def handler(_command, _parser, _args):
        raise error
    return handler


def test_a_failed_write_is_exit_3_in_one_line(monkeypatch, tmp_path: Path, capsys) -> None:
    full = StorageIOError("Could not write run/report.json: No space left on device")
    full.errno = errno.ENOSPC
    monkeypatch.setitem(cli._HANDLERS, "report", _raising(full))
    assert cli.main(["report", str(tmp_path)]) == cli.EXIT_IO == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lrsearch report: error: Could not write run/report.json: No space left on device"]


def test_an_internal_error_is_exit_4_with_the_traceback_in_the_run_folder(monkeypatch, tmp_path: Path,
                                                                          capsys) -> None:
    monkeypatch.setitem(cli._HANDLERS, "report", _raising(RuntimeError("boom")))
    assert cli.main(["report", str(tmp_path)]) == cli.EXIT_INTERNAL == 4
    err = capsys.readouterr().err.strip().splitlines()
    log = tmp_path / cli.ERROR_LOG
    assert len(err) == 1 and "internal error: RuntimeError: boom" in err[0] and str(log) in err[0]
    assert "Traceback" in log.read_text() and "RuntimeError: boom" in log.read_text()


def test_a_run_folder_in_use_stops_at_once(tmp_path: Path) -> None:
    with run_lock(tmp_path / "run"):
        with pytest.raises(RunFolderInUseError, match="in use by PID"):
            with run_lock(tmp_path / "run"):
                pass


def test_compress_refuses_a_run_folder_another_run_holds(tmp_path: Path) -> None:
    import lrsearch
    from tests.reliability._lit import TinyClassifier, TinyData

    run = tmp_path / "run"
    with run_lock(run):
        with pytest.raises(RunFolderInUseError, match="in use by PID"):
            lrsearch.compress(TinyClassifier(), budget="2%", run_dir=run, datamodule=TinyData())
    assert not run.exists() or not any(run.iterdir())  # the refused run wrote nothing
