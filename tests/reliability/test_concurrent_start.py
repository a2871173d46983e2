"""Workers started at the same instant on a fresh storage all join one study (issue 15, part 1).

Four worker processes each run five rounds; in every round they leave a barrier within a
millisecond of each other onto a storage nobody has opened yet (a new PostgreSQL database, a
new journal file, a new SQLite file), so they race to create its tables, the study and its warm
starts. Then a finalize-style search checks the one study they made. Separately, a worker killed
while it measures the latency table does not block the others: the next one measures it.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState
from torch import nn

from lrsearch.study import open_storage, search
from lrsearch.study._study import ATTR
from tests.reliability._procs import (
    finish,
    make_spec,
    poll,
    processes,
    reading,
    stderr_of,
    study_names,
    trials_of,
)

N_WORKERS, N_ROUNDS, N_TRIALS = 4, 5, 8
BASE = {"budget": "1%", "objective": "macs", "n_trials": N_TRIALS}


def _fresh_storages(kind: str, folder: Path, request: pytest.FixtureRequest) -> list[str]:
    if kind == "postgres":
        server = request.getfixturevalue("postgres")
        return [server.create_database(f"race{k}") for k in range(N_ROUNDS)]
    if kind == "journal":
        return [f"journal:{folder / f'race{k}' / 'study.log'}" for k in range(N_ROUNDS)]
    return [f"sqlite:///{folder / f'race{k}' / 'study.db'}" for k in range(N_ROUNDS)]


def _check_round(storage: str, reports: list[dict[str, Any]], model: nn.Module, val: list[Any],
                 options: dict[str, Any]) -> None:
    names = study_names(storage)
    assert names == [options["study_name"]], f"{storage}: studies {names}"
    trials = trials_of(storage, options["study_name"])
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    finished = [t for t in trials if t.state.is_finished()]
    assert N_TRIALS <= len(finished) <= N_TRIALS + N_WORKERS
    assert not [t.number for t in finished if t.state == TrialState.FAIL], "a worker's trial failed"
    # Each warm start is enqueued once, though every worker enqueues them all (skip_if_exists races).
    labels = collections.Counter(t.user_attrs["warm_start"] for t in trials if "warm_start" in t.user_attrs
                                 and not t.user_attrs["warm_start"].startswith("greedy"))
    assert labels and max(labels.values()) == 1, labels
    ran = [number for report in reports for number in report["ran"]]
    assert len(ran) == len(set(ran)), "a trial was run by two workers"
    assert {report["baseline"] for report in reports} == {reports[0]["baseline"]}

    final = search(model, val, **options)  # the "finalize" step: results only, no new trial
    assert len(trials_of(storage, options["study_name"])) == len(trials)
    assert final.best is not None


@pytest.mark.slow
@pytest.mark.parametrize("kind", [pytest.param("postgres", marks=pytest.mark.postgres), "journal", "sqlite"])
def test_workers_started_at_the_same_instant_on_a_fresh_storage_join_one_study(
        kind: str, request: pytest.FixtureRequest, trained, saved: Path) -> None:
    model, val = trained
    storages = _fresh_storages(kind, saved, request)
    barrier = saved / "barrier"
    barrier.mkdir()
    rounds = [[{"options": {**BASE, "storage": storage, "study_name": "race", "worker_index": i,
                            "run_dir": str(saved / f"run{k}")},
                "result": str(saved / f"w{i}.{k}.json")} for k, storage in enumerate(storages)]
              for i in range(N_WORKERS)]
    specs = [make_spec(saved, f"w{i}", {}, rounds=rounds[i], barrier=str(barrier)) for i in range(N_WORKERS)]
    with processes() as start:
        workers = [start(spec) for spec in specs]
        for k, storage in enumerate(storages):
            poll(lambda k=k: all((barrier / f"ready-w{i}-{k}").exists() for i in range(N_WORKERS))
                 or any(w.poll() is not None for w in workers), 180, f"the workers to reach round {k}")
            dead = [stderr_of(spec)[-3000:] for spec, w in zip(specs, workers, strict=True) if w.poll() is not None]
            assert not dead, f"round {k - 1} killed a worker: {dead[0]}"
            (barrier / f"go-{k}").write_text(str(time.time() + 0.5))
        for worker, spec in zip(workers, specs, strict=True):
            finish(worker, spec, timeout=300)
    for k, storage in enumerate(storages):
        reports = [json.loads((saved / f"w{i}.{k}.json").read_text()) for i in range(N_WORKERS)]
        _check_round(storage, reports, model, val, {**BASE, "storage": storage, "study_name": "race",
                                                    "run_dir": str(saved / f"run{k}")})


def _wide() -> nn.Module:
    torch.manual_seed(0)  # wide enough that low ranks are measurably faster even on a busy machine
    return nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))


@pytest.mark.slow
def test_a_worker_killed_while_measuring_the_latency_table_does_not_block_the_others(trained, saved: Path) -> None:
    _, val = trained
    torch.save(_wide().state_dict(), saved / "model.pt")
    storage = f"journal:{saved / 'study.log'}"
    options = {"budget": "1%", "objective": "latency", "threads": 1, "n_trials": 4, "storage": storage,
               "study_name": "table", "run_dir": str(saved / "run"), "latency_min_run_time": 0.002,
               "latency_repeats": 1}
    marker = saved / "measuring"
    first = make_spec(saved, "first", {**options, "worker_index": 0}, model="wide",
                      hang_in_latency_table=str(marker))
    second = make_spec(saved, "second", {**options, "worker_index": 1}, model="wide", log=True)
    with processes() as start:
        measuring = start(first)
        poll(lambda: marker.exists() or measuring.poll() is not None, 120, "the first worker to measure")
        assert measuring.poll() is None, stderr_of(first)[-3000:]
        waiting = start(second)
        poll(lambda: f"waiting for PID {measuring.pid} " in stderr_of(second) or waiting.poll() is not None,
             120, "the second worker to wait for the first")
        assert waiting.poll() is None, stderr_of(second)[-3000:]
        with reading(storage, "table") as study:
            assert ATTR + "latency_table" not in study.user_attrs and not study.trials
        measuring.kill()  # dies holding the lock: the kernel releases it, and the second worker measures
        finish(waiting, second)
    with reading(storage, "table") as study:
        assert ATTR + "latency_table" in study.user_attrs
        assert len([t for t in study.trials if t.state.is_finished()]) == options["n_trials"]


POP = """
import sys, time
from pathlib import Path
import optuna
from lrsearch.study import open_storage
url, ready, go = sys.argv[1:]
study = optuna.load_study(study_name="pop", storage=open_storage(url, heartbeat_interval=None))
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.001)
taken = []
for _ in range(50):
    trial = study.ask()
    taken.append(trial.number)
    study.tell(trial, 1.0)
print(" ".join(map(str, taken)))
"""


@pytest.mark.slow
def test_processes_on_one_sqlite_file_never_take_the_same_enqueued_trial(tmp_path: Path) -> None:
    """Without BEGIN IMMEDIATE, two processes both read trial N as WAITING and both ran it."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="pop", storage=open_storage(url, heartbeat_interval=None))
    for value in range(200):
        study.enqueue_trial({"x": value})
    go = tmp_path / "go"
    runs = [subprocess.Popen([sys.executable, "-c", POP, url, str(tmp_path / f"ready{i}"), str(go)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    try:
        poll(lambda: all((tmp_path / f"ready{i}").exists() for i in range(4))
             or any(r.poll() is not None for r in runs), 120, "the processes to load")
        go.touch()
        outputs = [run.communicate(timeout=120) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
            run.wait()
    assert all(run.returncode == 0 for run in runs), [err[-2000:] for _, err in outputs]
    taken = [int(n) for out, _ in outputs for n in out.split()]
    assert len(taken) == 200 and len(set(taken)) == 200
