"""Ctrl-C in one search process, in-process and deterministic: the signal is sent from inside a
trial and from between trials (Optuna's bookkeeping), and the study is left clean either way."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import optuna
import pytest
from optuna.storages._heartbeat import HeartbeatThread
from optuna.trial import TrialState

from lrsearch.study import search
from lrsearch.study._objective import Objective

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
    with caplog.at_level(logging.INFO), pytest.raises(KeyboardInterrupt):
        search(model, val, run_dir=str(tmp_path), **OPTIONS)
    trials = [t for t in _trials(tmp_path) if t.state != TrialState.WAITING]  # warm starts still queued
    assert [t.number for t in trials] == [0, 1, 2]
    assert trials[0].state.is_finished() and trials[1].state.is_finished()
    assert trials[2].state == TrialState.FAIL
    failed = [r for r in caplog.records if "failed with parameters" in r.getMessage()]
    assert failed and all(r.exc_info is None for r in failed), "optuna's traceback of the interrupt is kept"
    assert any(r.getMessage().startswith("interrupted; re-run the same command to resume study 'ctrl-c'")
               for r in caplog.records)
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
