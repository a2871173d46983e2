"""Zombie trials: RUNNING for ever because their process was killed (SIGKILL, OOM killer, a crash).

Each trial records its owner (host, PID and the process's start time) when it starts. A worker
fails a RUNNING trial whose owner is a dead process on its own host at once, without waiting
for a heartbeat (journal files have none; an RDB's takes twice ``heartbeat_interval``), and
enqueues its configuration again, once, as Optuna's heartbeat retry does. On a journal or
SQLite file a worker that starts while no other is present fails every RUNNING trial, also one
whose owner was never recorded (see :func:`reaping`). Trials owned by other hosts are otherwise
left to the RDB heartbeat. A failed trial that was retried does not count toward ``n_trials``:
its retry does, so a study that already had all its trials runs the retry too.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from lrsearch._runlock import presence
from lrsearch.study._storage import storage_file, storage_lock

__all__ = ["COUNTED", "OWNER", "StopWhenFull", "ZombieReaper", "counted_trials", "reaping", "record_owner"]

_logger = logging.getLogger("lrsearch")
OWNER = "lrsearch:owner"
PRESENCE_SUFFIX = ".lrsearch-workers"
# Every trial that ran or runs counts toward n_trials; enqueued (WAITING) ones do not yet.
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


@functools.cache
def _this_host() -> str:
    """Processes compare PIDs only within one kernel boot and PID namespace of one host."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}|{_read('/proc/sys/kernel/random/boot_id') or ''}|{namespace}"


def _start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), None if it is gone, dead or unknown (no /proc)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name in parentheses may hold spaces
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _alive(pid: int, start: int | None) -> bool:
    if start is not None:  # Linux: a reused PID has another start time
        return _start_time(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _owner() -> dict[str, Any]:
    return {"host": _this_host(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def record_owner(trial: optuna.Trial) -> None:
    """Note on ``trial`` that this process runs it (call first thing in the objective)."""
    trial.storage.set_trial_system_attr(trial._trial_id, OWNER, {**_owner(), "trial": trial.number})


def is_zombie(trial: FrozenTrial, *, host: str | None = None, alone: bool = False) -> bool:
    """``trial`` is RUNNING, and its owner on this host is dead; or no live owner at all if ``alone``.

    A trial without an owner of its own (an older lrsearch, a retry that copied its failed
    trial's attributes, one killed or out of disk before its objective began) is judged only
    when this worker is ``alone``: no other worker is present on the storage (see :func:`reaping`).
    """
    if trial.state != TrialState.RUNNING:
        return False
    owner = trial.system_attrs.get(OWNER)
    if not isinstance(owner, dict) or owner.get("trial") != trial.number:
        return alone
    if owner.get("host") != (host or _this_host()):
        return alone
    return not _alive(int(owner["pid"]), owner.get("start"))


class ZombieReaper:
    """``reaper(study)`` fails the study's zombie trials and enqueues each one's configuration again.

    Pass it as an ``optimize`` callback (see :func:`reaping`), so a worker that outlives a killed
    one cleans up after it. Works under :func:`storage_lock`, so two workers never retry the same
    zombie twice.
    """

    def __init__(self, storage_url: str) -> None:
        self.storage_url = storage_url
        self.host = _this_host()

    def __call__(self, study: optuna.Study, _finished: FrozenTrial | None = None, *,
                 alone: bool = False) -> list[int]:
        def dead(trial: FrozenTrial) -> bool:
            return is_zombie(trial, host=self.host, alone=alone)

        if not any(dead(t) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
            return []
        reaped = []
        with storage_lock(self.storage_url, f"zombies of {study.study_name}"):
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if dead(trial) and self._fail(study, trial):
                    reaped.append(trial.number)
        if reaped:
            _logger.warning("failed trial(s) %s of study %r: the process running them was killed; "
                            "their configurations run again", reaped, study.study_name)
        return reaped

    @staticmethod
    def _fail(study: optuna.Study, trial: FrozenTrial) -> bool:
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # a heartbeat failed it meanwhile
            return False
        history = [*trial.system_attrs.get("retry_history", []), trial.number]
        if len(history) == 1:  # retried once, like the heartbeat: a configuration that kills its worker stops
            warm = {"warm_start": trial.user_attrs["warm_start"]} if "warm_start" in trial.user_attrs else {}
            study.add_trial(optuna.trial.create_trial(
                state=TrialState.WAITING, user_attrs=warm,
                system_attrs={"fixed_params": {**trial.system_attrs.get("fixed_params", {}), **trial.params},
                              "failed_trial": trial.number,
                              "retry_history": history}))
        return True


@contextmanager
def reaping(storage_url: str, study: optuna.Study) -> Iterator[ZombieReaper]:
    """Fail the study's zombies now; the reaper to pass to ``optimize`` for the ones to come.

    On a journal or SQLite file, a worker is present (a shared flock beside the file) while it
    runs trials. One that comes while no other is present knows that every RUNNING trial is dead,
    even one whose owner was never recorded (killed, or out of disk, as the trial began).
    """
    reaper = ZombieReaper(storage_url)
    file = storage_file(storage_url)
    if file is None:
        reaper(study)
        yield reaper
        return
    with presence(file.with_name(file.name + PRESENCE_SUFFIX), if_alone=lambda: reaper(study, alone=True)):
        reaper(study)
        yield reaper


def counted_trials(study: optuna.Study) -> int:
    """Trials that count toward ``n_trials``: those that ran or run, less failed ones that were retried."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}
    return sum(1 for t in trials if t.state in COUNTED and t.number not in retried)


class StopWhenFull:
    """``optimize`` callback: stop once the study holds ``n_trials`` counted trials (see :func:`counted_trials`)."""

    def __init__(self, n_trials: int) -> None:
        self.n_trials = n_trials

    def __call__(self, study: optuna.Study, _trial: FrozenTrial) -> None:
        if counted_trials(study) >= self.n_trials:
            study.stop()
