"""Zombie trials (issue 15, part 2): a worker SIGKILLed inside a trial leaves it RUNNING; the next run
on the same host fails it at once (its owner's process is dead) and runs its configuration again.

Heartbeats are not involved: the PostgreSQL case keeps the default 60 s interval and re-runs at
once. Workers on other machines are left to the heartbeat (see test_distributed.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from lrsearch._runlock import _open_locked
from lrsearch.study import open_storage, search
from lrsearch.study._zombies import (
    COUNTED,
    OWNER,
    PRESENCE_SUFFIX,
    ZombieReaper,
    _alive,
    _start_time,
    _this_host,
    counted_trials,
    is_zombie,
    reaping,
)
from tests.reliability._procs import hang_and_kill, processes, reading, trials_of

BASE = {"budget": "1%", "objective": "macs", "warm_start": False}


def _running_trial(owner: dict | None) -> tuple[optuna.Study, FrozenTrial]:
    study = optuna.create_study()
    trial = study.ask()
    if owner is not None:
        study._storage.set_trial_system_attr(trial._trial_id, OWNER, {"trial": trial.number, **owner})
    return study, study.trials[0]


def test_a_dead_or_reused_pid_is_dead_and_a_live_one_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = _start_time(child.pid)
        assert start is not None and _alive(child.pid, start)
        assert not _alive(child.pid, start + 1), "the same PID with another start time is another process"
        child.kill()
        child.wait()
        assert not _alive(child.pid, start)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert _alive(os.getpid(), _start_time(os.getpid()))


def test_only_a_running_trial_whose_owner_on_this_host_is_dead_is_a_zombie() -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    gone = {"host": _this_host(), "pid": int(dead.stdout), "start": 1}
    assert is_zombie(_running_trial(gone)[1])
    assert not is_zombie(_running_trial({**gone, "host": "another-machine"})[1])
    assert not is_zombie(_running_trial({"host": _this_host(), "pid": os.getpid(),
                                         "start": _start_time(os.getpid())})[1])
    assert not is_zombie(_running_trial(None)[1]), "no owner: left to the heartbeat or fail_stale_trials"
    study, trial = _running_trial(gone)
    study._storage.set_trial_system_attr(trial._trial_id, OWNER, {**gone, "trial": trial.number + 1})
    assert not is_zombie(study.trials[0]), "an owner copied from another trial (a heartbeat retry) is not its own"
    study.tell(trial.number, 1.0)
    assert not is_zombie(study.trials[0])


def _storage(kind: str, folder: Path, request: pytest.FixtureRequest) -> str:
    if kind == "postgres":
        return request.getfixturevalue("postgres").create_database("zombie")
    if kind == "journal":
        return f"journal:{folder / 'study.log'}"
    return f"sqlite:///{folder / 'study.db'}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", [pytest.param("postgres", marks=pytest.mark.postgres), "journal", "sqlite"])
def test_sigkill_inside_a_trial_then_rerun_at_once_fails_it_and_retries_its_configuration(
        kind: str, request: pytest.FixtureRequest, trained, saved: Path) -> None:
    model, val = trained
    storage = _storage(kind, saved, request)
    options = {**BASE, "n_trials": 6, "storage": storage, "study_name": "zombie", "run_dir": str(saved / "run")}
    search(model, val, **{**options, "n_trials": 1})
    with processes() as start:
        hang_and_kill(start, saved, options)
    zombie = next(t for t in trials_of(storage, "zombie") if t.state == TrialState.RUNNING)
    assert zombie.params, "killed inside the objective, after its ranks were chosen"

    search(model, val, **options)  # the same command again, at once: no heartbeat has expired
    trials = {t.number: t for t in trials_of(storage, "zombie")}
    assert not [t for t in trials.values() if t.state == TrialState.RUNNING]
    assert trials[zombie.number].state == TrialState.FAIL
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == zombie.number]
    assert len(retries) == 1
    assert retries[0].params == zombie.params
    assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retries[0].system_attrs["retry_history"] == [zombie.number]
    counted = [t for t in trials.values() if t.state in COUNTED and t.number != zombie.number]
    assert len(counted) == options["n_trials"], "the zombie does not count; its retry does"


@pytest.mark.slow
def test_a_full_study_with_a_zombie_is_cleaned_up_and_finished(trained, saved: Path) -> None:
    model, val = trained
    options = {**BASE, "storage": f"journal:{saved / 'study.log'}", "study_name": "full",
               "run_dir": str(saved / "run")}
    search(model, val, **options, n_trials=3)
    with processes() as start:
        hang_and_kill(start, saved, {**options, "n_trials": 4})  # the study's 4th and last trial
    before = trials_of(options["storage"], "full")
    assert len([t for t in before if t.state in COUNTED]) == 4, "full, one of them a zombie"
    zombie = next(t for t in before if t.state == TrialState.RUNNING)

    result = search(model, val, **options, n_trials=4)
    trials = trials_of(options["storage"], "full")
    assert [t.state for t in trials].count(TrialState.RUNNING) == 0
    retry = trials[-1]
    assert retry.system_attrs["failed_trial"] == zombie.number and retry.params == zombie.params
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert len(trials) == 5
    assert result.best is not None


@pytest.mark.slow
def test_a_configuration_that_kills_its_worker_twice_is_retried_only_once(trained, saved: Path) -> None:
    model, val = trained
    storage = f"journal:{saved / 'study.log'}"
    options = {**BASE, "n_trials": 4, "storage": storage, "study_name": "twice", "run_dir": str(saved / "run")}
    search(model, val, **{**options, "n_trials": 1})
    with processes() as start:
        hang_and_kill(start, saved, options)  # kills trial 1
        hang_and_kill(start, saved, options)  # reaps 1, then takes its retry (2) and is killed in it
    trials = trials_of(storage, "twice")
    assert [t.state for t in trials[1:]] == [TrialState.FAIL, TrialState.RUNNING]
    assert trials[2].system_attrs["failed_trial"] == 1

    search(model, val, **options)
    trials = {t.number: t for t in trials_of(storage, "twice")}
    assert trials[2].state == TrialState.FAIL
    assert not [t for t in trials.values() if t.system_attrs.get("failed_trial") == 2
                or t.system_attrs.get("retry_history") == [1, 2]], "a retry is not retried again"
    with reading(storage, "twice") as study:
        assert counted_trials(study) == options["n_trials"]
        assert ZombieReaper(storage)(study) == []


def test_a_worker_alone_on_a_file_storage_fails_even_a_trial_whose_owner_was_never_recorded(tmp_path: Path) -> None:
    url = f"journal:{tmp_path / 'study.log'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    study.ask()  # RUNNING, no owner: its process died before its objective began
    presence_file = tmp_path / f"study.log{PRESENCE_SUFFIX}"
    other = _open_locked(presence_file, wait=True, shared=True)  # another live worker is present
    try:
        with reaping(url, study):
            assert [t.state for t in study.trials] == [TrialState.RUNNING], "it may be the other worker's"
    finally:
        os.close(other)
    with reaping(url, study):
        assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
        assert presence_file.exists()
    assert not presence_file.exists(), "the last worker to leave removes the file"
