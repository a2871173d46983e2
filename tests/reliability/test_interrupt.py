"""Ctrl-C in every phase of a compression, and the same command resuming the same study.

In-process and deterministic: the signal is sent from inside a trial and from between trials
(Optuna's bookkeeping), from inside a Lightning fine-tune, and while the result files are written.
Through the command line, as a user presses Ctrl-C: ``lrsearch tune`` in a subprocess gets SIGINT
while it measures the latency table (profiling, before any trial) and while it fine-tunes, and, as
a terminal sends it, to its whole process group (DataLoader workers too) at every moment of a
fine-tune; it must exit with status 130 and one line saying how to resume, leave no half-written
file and the user's checkpoint untouched, and the same command must then finish the same study.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import pytorch_lightning as pl
import torch
from optuna.storages._heartbeat import HeartbeatThread
from optuna.trial import TrialState
from pytorch_lightning.trainer.states import TrainerStatus

import lrsearch
from lrsearch import _runlock as runlock
from lrsearch import cli
from lrsearch._errors import Interrupted
from lrsearch.pipeline import FinetuneConfig
from lrsearch.pipeline import _compress as compress_module
from lrsearch.pipeline._finetune import finetune
from lrsearch.study import SearchConfig, open_storage, search, sqlite_url
from lrsearch.study._objective import Objective
from tests.reliability._lit import MOMENTS, TinyClassifier, TinyData, in_a_finalizer, press_ctrl_c

OPTIONS = {"budget": "1%", "objective": "macs", "n_trials": 8, "study_name": "ctrl-c"}


def _trials(run_dir: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="ctrl-c", storage=f"sqlite:///{run_dir / 'study.db'}").trials


@pytest.fixture(autouse=True)
def _default_sigint():
    """The handler an interactive Python has; search() only replaces that one."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_inside_a_trial_fails_it_and_logs_no_traceback(trained, tmp_path: Path, monkeypatch,
                                                              caplog) -> None:
    model, val = trained
    original = Objective._finished_twin
    calls = []

    def interrupted_third(trial, params):
        calls.append(trial.number)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(trial, params)

    monkeypatch.setattr(Objective, "_finished_twin", staticmethod(interrupted_third))
    with caplog.at_level(logging.INFO), pytest.raises(Interrupted) as interrupted:
        search(model, val, run_dir=str(tmp_path), **OPTIONS)
    trials = [t for t in _trials(tmp_path) if t.state != TrialState.WAITING]  # warm starts still queued
    assert [t.number for t in trials] == [0, 1, 2]
    assert trials[0].state.is_finished() and trials[1].state.is_finished()
    assert trials[2].state == TrialState.FAIL
    failed = [r for r in caplog.records if "failed with parameters" in r.getMessage()]
    assert failed and all(r.exc_info is None for r in failed), "optuna's traceback of the interrupt is kept"
    assert str(interrupted.value).startswith("interrupted; re-run the same command to resume study 'ctrl-c'")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_in_optunas_bookkeeping_is_deferred(trained, tmp_path: Path, monkeypatch) -> None:
    """Sent while Optuna starts a trial's heartbeat thread: a KeyboardInterrupt raised there
    leaves the thread running and the process hanging at exit, so search() must defer it."""
    model, val = trained
    started: list[HeartbeatThread] = []
    original = HeartbeatThread.start

    def start_then_interrupt(self: HeartbeatThread) -> None:
        original(self)
        started.append(self)
        if len(started) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(HeartbeatThread, "start", start_then_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            search(model, val, run_dir=str(tmp_path), **OPTIONS)
        assert not [t for t in started if t._thread.is_alive()], "a heartbeat thread was left running"
    finally:
        for heartbeat in started:  # never leave a thread that would keep pytest from exiting
            heartbeat._stop_event.set()
    trials = _trials(tmp_path)
    assert [t.number for t in trials if t.state.is_finished()] == [0, 1]
    assert trials[1].state == TrialState.FAIL  # interrupted before its objective began: failed, not run
    assert not [t for t in trials if t.state == TrialState.RUNNING]

    result = search(model, val, run_dir=str(tmp_path), **OPTIONS)  # resumes to n_trials
    assert len([t for t in _trials(tmp_path) if t.state.is_finished()]) == OPTIONS["n_trials"]
    assert result.best is not None


# Fine-tuning and saving, in-process. ----------------------------------------------------------

_TRAINING_STEP = TinyClassifier.training_step


def _interrupting_step(self: TinyClassifier, batch: Any, index: int) -> torch.Tensor:
    os.kill(os.getpid(), signal.SIGINT)
    return _TRAINING_STEP(self, batch, index)


def _fit_as_older_lightning(self: pl.Trainer, *args: Any, **kwargs: Any) -> None:
    """Lightning before ``sys.exit(1)`` on Ctrl-C: the fit returns as if finished, marked interrupted."""
    self.state.status = TrainerStatus.INTERRUPTED


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
@pytest.mark.parametrize("lightning", ["exits", "returns interrupted"])
def test_ctrl_c_in_a_fine_tune_raises_keyboard_interrupt_and_restores_the_handler(lightning: str, tmp_path: Path,
                                                                                  monkeypatch) -> None:
    """Lightning catches Ctrl-C in ``fit``, sets SIGINT to "ignore" and calls ``sys.exit(1)`` (or, in
    older versions, returns): neither may pass for a finished fine-tune or leave Ctrl-C dead."""
    if lightning == "exits":
        monkeypatch.setattr(TinyClassifier, "training_step", _interrupting_step)
    else:
        monkeypatch.setattr(pl.Trainer, "fit", _fit_as_older_lightning)
    config = FinetuneConfig(distill=False, progress=False, accelerator="cpu")
    with pytest.raises(KeyboardInterrupt) as raised:
        finetune(TinyClassifier(), teacher=None, root_dir=tmp_path, config=config,
                 train_dataloaders=TinyData().train_dataloader())
    assert type(raised.value) is KeyboardInterrupt
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not list(tmp_path.iterdir())


def _compress_tiny(tiny_checkpoint: Path, run_dir: Path, **module_args: Any) -> lrsearch.CompressionResult:
    """``compress`` of the tiny trained module: 4 search trials, then one-epoch fine-tunes."""
    module = TinyClassifier(**module_args)
    module.load_state_dict(torch.load(tiny_checkpoint, weights_only=True)["state_dict"])
    return lrsearch.compress(module, budget="10%", run_dir=run_dir, datamodule=TinyData(),
                             search=SearchConfig(objective="macs", n_trials=4),
                             finetune=FinetuneConfig(epochs=1, progress=False, accelerator="cpu"))


@pytest.mark.parametrize("in_finalizer", [False, True], ids=["in the step", "in a finalizer"])
@pytest.mark.parametrize("moment", MOMENTS)
def test_ctrl_c_at_any_moment_of_a_fine_tune_stops_the_compression(moment: str, in_finalizer: bool,
                                                                   tiny_checkpoint: Path, tmp_path: Path,
                                                                   capfd) -> None:
    """In a training or validation batch, an optimizer step, the end of the fit or the scoring
    after it; and also where Python would only print the interrupt and go on (a finalizer, such
    as a DataLoader iterator's ``__del__`` joining its workers): the run stops, quietly."""
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupted, match="interrupted after the search; re-run the same command"):
        _compress_tiny(tiny_checkpoint, run_dir, interrupt_at=moment, interrupt_in_finalizer=in_finalizer)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    assert not {"report.json", "compressed.ckpt", "model"} & {p.name for p in run_dir.iterdir()}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_in_a_finalizer_while_the_report_measures_latency_stops_before_saving(tiny_checkpoint: Path,
                                                                                     tmp_path: Path,
                                                                                     monkeypatch, capfd) -> None:
    original = compress_module.build_report

    def build_report_after_ctrl_c(*args: Any, **kwargs: Any) -> Any:
        in_a_finalizer(press_ctrl_c)
        return original(*args, **kwargs)

    monkeypatch.setattr(compress_module, "build_report", build_report_after_ctrl_c)
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupted, match="interrupted after the search"):
        _compress_tiny(tiny_checkpoint, run_dir)
    assert "Exception ignored" not in capfd.readouterr().err
    assert not (run_dir / "report.json").exists()


def test_a_second_ctrl_c_while_the_first_unwinds_keeps_its_one_line(tiny_checkpoint: Path, tmp_path: Path,
                                                                    monkeypatch, capsys) -> None:
    """The second lands while the run folder's lock is released: the line still says how to resume."""
    original = runlock._release

    def release_after_ctrl_c(path: Path, fd: int) -> None:
        if path.name == runlock.LOCK_NAME:  # the run folder's, not the study's lock
            press_ctrl_c()
        original(path, fd)

    monkeypatch.setattr(runlock, "_release", release_after_ctrl_c)
    (tmp_path / "tiny.ckpt").write_bytes(tiny_checkpoint.read_bytes())
    argv = _tune(tmp_path, "--model.interrupt_at", "train", "--search.objective", "macs", "--finetune.epochs", "1")
    assert cli.main(argv) == cli.EXIT_INTERRUPTED
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[-1].startswith("lrsearch tune: interrupted after the search; re-run the same command to resume")
    assert len([line for line in lines if "interrupted" in line]) == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_while_the_result_is_saved_waits_until_every_file_is_written(tiny_checkpoint: Path, tmp_path: Path,
                                                                           monkeypatch) -> None:
    original = compress_module.save

    def save_after_ctrl_c(*args: Any, **kwargs: Any) -> Path:
        os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(compress_module, "save", save_after_ctrl_c)
    module = TinyClassifier()
    module.load_state_dict(torch.load(tiny_checkpoint, weights_only=True)["state_dict"])
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupted, match="re-run the same command to resume"):
        lrsearch.compress(module, budget="10%", run_dir=run_dir, datamodule=TinyData(),
                          search=SearchConfig(objective="macs", n_trials=4),
                          finetune=FinetuneConfig(epochs=1, progress=False, accelerator="cpu"))
    for name in ("compressed.ckpt", "report.json", "report.html"):
        assert (run_dir / name).is_file(), name
    assert lrsearch.get_recipe(lrsearch.load(run_dir / "model", TinyClassifier()))["layers"]
    assert not list(run_dir.rglob("*.tmp"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# The command line, in a subprocess. -----------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
MODEL = ["--model", "tests.reliability._lit.TinyClassifier", "--data", "tests.reliability._lit.TinyData"]


def _tune(folder: Path, *flags: str) -> list[str]:
    """``lrsearch tune`` arguments on the tiny module and a copy of its checkpoint in ``folder``."""
    return ["tune", *MODEL, "--ckpt_path", str(folder / "tiny.ckpt"), "--run_dir", str(folder / "run"),
            "--budget", "5%", "--search.n_trials", "4", "--search.threads", "1", "--finetune.progress", "false", *flags]


def _interrupt(folder: Path, argv: list[str], started: Callable[[], bool]) -> tuple[int, str]:
    """Run the CLI, send SIGINT once ``started()``; its exit status and stderr."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    err = folder / "stderr.txt"
    with err.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "lrsearch", *argv], cwd=ROOT, env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while not started() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, err.read_text()[-3000:]
        assert started(), "the phase to interrupt did not begin within 120 s"
        process.send_signal(signal.SIGINT)
        status = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    return status, err.read_text()


def _files(run_dir: Path) -> set[str]:
    """What the run folder holds, without SQLite's own -wal and -shm files."""
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if not p.name.endswith(("-wal", "-shm"))}


def _finished_trials(run_dir: Path) -> list[tuple[Any, ...]]:
    """Number, state, parameters and end time of every finished trial of the run's only study."""
    storage = open_storage(sqlite_url(run_dir / "search" / "study.db"), heartbeat_interval=None)
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["lrsearch"]
    trials = optuna.load_study(study_name="lrsearch", storage=storage).get_trials()
    storage.engine.dispose()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    return [(t.number, t.state, t.params, t.datetime_complete) for t in trials if t.state.is_finished()]


def _check_one_line(status: int, stderr: str, message: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert lines[-1] == message, stderr[-3000:]
    assert len([line for line in lines if "interrupted" in line]) == 1, stderr[-3000:]


@pytest.mark.slow
def test_cli_ctrl_c_while_profiling_stops_cleanly_and_the_same_study_resumes(tiny_checkpoint: Path,
                                                                            tmp_path: Path) -> None:
    checkpoint = (tmp_path / "tiny.ckpt")
    checkpoint.write_bytes(tiny_checkpoint.read_bytes())
    run_dir = tmp_path / "run"
    # Latency at a large batch, so that low ranks are measurably faster even on a busy machine.
    argv = _tune(tmp_path, "--search.batch_size", "4096", "--search.latency_repeats", "2",
                 "--finetune.epochs", "1")
    # A minute per table entry: Ctrl-C lands while the first entry is timed.
    status, stderr = _interrupt(tmp_path, [*argv, "--search.latency_min_run_time", "60"],
                                lambda: "measuring the latency table" in (tmp_path / "stderr.txt").read_text())
    study = sqlite_url(run_dir / "search" / "study.db")
    _check_one_line(status, stderr, f"lrsearch tune: interrupted; re-run the same command to resume study "
                                    f"'lrsearch' at {study} (its finished trials are kept)")
    assert _files(run_dir) == {"search", "search/study.db"}  # no latency table, model, checkpoint or report
    assert _finished_trials(run_dir) == []
    assert checkpoint.read_bytes() == tiny_checkpoint.read_bytes()

    # The same command, with a shorter measurement so that the test ends soon.
    assert cli.main([*argv, "--search.latency_min_run_time", "0.01"]) in (cli.EXIT_OK, cli.EXIT_MISSED)
    assert len(_finished_trials(run_dir)) == 4
    assert {"search/latency-table.json", "report.json", "report.html"} <= _files(run_dir)
    assert checkpoint.read_bytes() == tiny_checkpoint.read_bytes()


@pytest.mark.slow
def test_cli_ctrl_c_while_fine_tuning_saves_nothing_and_the_same_study_resumes(tiny_checkpoint: Path,
                                                                              tmp_path: Path) -> None:
    checkpoint = (tmp_path / "tiny.ckpt")
    checkpoint.write_bytes(tiny_checkpoint.read_bytes())
    run_dir, started = tmp_path / "run", tmp_path / "fine-tuning"
    argv = _tune(tmp_path, "--model.started_file", str(started), "--search.objective", "macs")
    # Far too many epochs to finish: Ctrl-C lands inside Lightning's fit.
    status, stderr = _interrupt(tmp_path, [*argv, "--finetune.epochs", "100000"], started.exists)
    study = sqlite_url(run_dir / "search" / "study.db")
    _check_one_line(status, stderr, f"lrsearch tune: interrupted after the search; re-run the same command to "
                                    f"resume: study 'lrsearch' at {study} keeps its trials, so only fine-tuning "
                                    "and verification run again")
    assert _files(run_dir) == {"search", "search/study.db", "search/search-result.json"}
    searched = _finished_trials(run_dir)
    assert len(searched) == 4
    assert checkpoint.read_bytes() == tiny_checkpoint.read_bytes()

    # The same command, with one epoch so that the test ends soon: no new trial, none repeated.
    assert cli.main([*argv, "--finetune.epochs", "1"]) == cli.EXIT_OK
    assert _finished_trials(run_dir) == searched
    assert {"model/recipe.json", "compressed.ckpt", "report.json", "report.html"} <= _files(run_dir)
    assert checkpoint.read_bytes() == tiny_checkpoint.read_bytes()


def _until_it_presses_ctrl_c(folder: Path, argv: list[str]) -> tuple[int, str]:
    """Run the CLI in a session of its own, as a terminal runs a command, until it has pressed
    Ctrl-C for its process group (``TinyClassifier(interrupt_group=True)``); status and stderr."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    err = folder / "stderr.txt"
    with err.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "lrsearch", *argv], cwd=ROOT, env=env, start_new_session=True,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        status = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    return status, err.read_text()


@pytest.mark.slow
def test_cli_ctrl_c_to_the_process_group_during_a_fine_tune(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """With two DataLoader workers, which get the signal too: in the first training batch, in a
    finalizer during the validation loop, and in the scoring after the fit (the in-process tests
    above take every moment). Each run resumes the study of the last."""
    checkpoint = (tmp_path / "tiny.ckpt")
    checkpoint.write_bytes(tiny_checkpoint.read_bytes())
    run_dir = tmp_path / "run"
    argv = _tune(tmp_path, "--search.objective", "macs", "--finetune.epochs", "1", "--max_finetunes", "1",
                 "--data.num_workers", "2", "--model.interrupt_group", "true")
    study = sqlite_url(run_dir / "search" / "study.db")
    line = (f"lrsearch tune: interrupted after the search; re-run the same command to resume: study 'lrsearch' at "
            f"{study} keeps its trials, so only fine-tuning and verification run again")
    searched = None
    for moment, in_finalizer in (("train", "false"), ("validation", "true"), ("score", "false")):
        status, stderr = _until_it_presses_ctrl_c(tmp_path, [*argv, "--model.interrupt_at", moment,
                                                             "--model.interrupt_in_finalizer", in_finalizer])
        _check_one_line(status, stderr, line)
        assert _files(run_dir) == {"search", "search/study.db", "search/search-result.json"}, moment
        searched = searched or _finished_trials(run_dir)
        assert len(searched) == 4 and _finished_trials(run_dir) == searched, moment
    assert checkpoint.read_bytes() == tiny_checkpoint.read_bytes()

    assert cli.main(argv) in (cli.EXIT_OK, cli.EXIT_MISSED)  # the same command, uninterrupted
    assert _finished_trials(run_dir) == searched
    assert {"report.json", "report.html"} <= _files(run_dir)
