"""Distributed search on a real PostgreSQL and on a journal file: worker processes sharing one
study, workers killed mid-trial, Ctrl-C and resume, reproducibility, an unreachable server.

Workers are separate processes (``_worker.py``) on the tiny MLP of tests/study with the
deterministic "macs" objective. Every wait is bounded and every process is killed on the way out.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from optuna.trial import TrialState
from torch import nn

from lrsearch.study import SearchConfig, StorageError, fail_stale_trials, open_storage, search, sqlite_url
from lrsearch.study import _study as study_module
from lrsearch.study._study import TABLE_FILE
from lrsearch.study._zombies import COUNTED
from tests.reliability._procs import (
    finish,
    hang_and_kill,
    make_spec,
    poll,
    processes,
    reading,
    stderr_of,
    trials_of,
)

N_TRIALS = 16
BASE = {"budget": "1%", "objective": "macs"}


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "n_workers"), [pytest.param("postgres", 3, marks=pytest.mark.postgres),
                                                 ("journal", 2)])
def test_worker_processes_share_one_study(kind: str, n_workers: int, request, trained, saved: Path) -> None:
    model, val = trained
    if kind == "postgres":
        storage = request.getfixturevalue("postgres_url")
    else:
        storage = f"journal:{saved / 'study.log'}"
    options = {**BASE, "n_trials": N_TRIALS, "storage": storage, "study_name": f"workers-{kind}",
               "run_dir": str(saved / "run")}
    prepared = search(model, val, **{**options, "n_trials": 1})
    with reading(storage, options["study_name"]) as study:
        attrs = study.user_attrs
    go = saved / "go"
    specs = [make_spec(saved, f"worker{i}", {**options, "worker_index": i}, trial_sleep=0.2,
                       ready=str(saved / f"ready{i}"), go=str(go)) for i in range(1, n_workers + 1)]
    with processes() as start:
        workers = [start(spec) for spec in specs]
        poll(lambda: all((saved / f"ready{i}").exists() for i in range(1, n_workers + 1))
             or any(p.poll() is not None for p in workers), 90, "the workers to load")
        go.touch()  # all start searching together
        for process, spec in zip(workers, specs, strict=True):
            finish(process, spec)
    reports = [json.loads(spec.with_suffix(".result.json").read_text()) for spec in specs]

    trials = trials_of(storage, options["study_name"])
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    finished = {t.number for t in trials if t.state.is_finished()}
    assert N_TRIALS <= len(finished) <= N_TRIALS + n_workers
    ran = [number for report in reports for number in report["ran"]]
    assert len(ran) == len(set(ran)), "a trial was run by two workers"
    assert set(ran) | {0} == finished
    assert sum(1 for report in reports if report["ran"]) >= 2, "the workers did not overlap"
    for report in reports:  # every worker scored trials against the same stored facts
        assert report["baseline"] == prepared.baseline
        assert report["allowed_drop"] == prepared.allowed_drop
        assert report["dense"] == prepared.dense
        assert report["study_attrs"] == attrs

    final = search(model, val, **options)  # the "finalize" step: results only, no new trial
    assert len(trials_of(storage, options["study_name"])) == len(trials)
    assert final.best is not None and final.best.drop <= final.allowed_drop
    best = next(t for t in trials if t.number == final.best.trial)
    assert best.state == TrialState.COMPLETE and best.user_attrs["feasible"]


@pytest.mark.slow
@pytest.mark.postgres
def test_trial_of_a_killed_worker_is_failed_and_retried_by_the_next_worker(postgres_url: str, trained,
                                                                           saved: Path) -> None:
    model, val = trained
    options = {**BASE, "n_trials": 6, "storage": postgres_url, "study_name": "heartbeat",
               "run_dir": str(saved / "run"), "heartbeat_interval": 1, "warm_start": False}
    search(model, val, **{**options, "n_trials": 1})
    with processes() as start:
        # A worker on another machine: this host cannot tell whether it lives, the heartbeat can.
        hang_and_kill(start, saved, options, after=1.5, foreign_host=True)  # heartbeats: at least 1 per second
    running = [t for t in trials_of(postgres_url, "heartbeat") if t.state == TrialState.RUNNING]
    assert len(running) == 1
    killed = running[0]

    watcher = open_storage(postgres_url, heartbeat_interval=1)  # same grace period (2 s) as the workers
    study_id = watcher.get_study_id_from_name("heartbeat")
    poll(lambda: killed._trial_id in watcher._get_stale_trial_ids(study_id), 30, "the heartbeat to go stale")
    watcher.engine.dispose()

    search(model, val, **{**options, "worker_index": 2})  # the next worker to start: this process
    trials = {t.number: t for t in trials_of(postgres_url, "heartbeat")}
    assert trials[killed.number].state == TrialState.FAIL
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1
    assert retries[0].params == killed.params
    assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retries[0].system_attrs["retry_history"] == [killed.number]
    assert not [t for t in trials.values() if t.state == TrialState.RUNNING]
    assert len([t for t in trials.values() if t.state in COUNTED]) >= options["n_trials"]


@pytest.mark.slow
def test_killed_worker_on_a_journal_leaves_a_zombie_that_fail_stale_trials_clears(trained, saved: Path) -> None:
    model, val = trained
    storage = f"journal:{saved / 'study.log'}"
    options = {**BASE, "n_trials": 6, "storage": storage, "study_name": "zombie", "run_dir": str(saved / "run"),
               "warm_start": False}
    search(model, val, **{**options, "n_trials": 1})
    with processes() as start:
        hang_and_kill(start, saved, options, foreign_host=True)  # on this host, the next run would fail it
    time.sleep(0.2)  # so "older than 0.1 s" below is unambiguous
    running = [t for t in trials_of(storage, "zombie") if t.state == TrialState.RUNNING]
    assert len(running) == 1, "a journal has no heartbeats: the killed trial stays RUNNING"
    zombie = running[0].number

    assert fail_stale_trials(storage, "zombie", older_than=3600) == []
    assert fail_stale_trials(storage, "zombie", older_than=0.1) == [zombie]
    assert fail_stale_trials(storage, "zombie", older_than=0.1) == []
    assert trials_of(storage, "zombie")[zombie].state == TrialState.FAIL
    with pytest.raises(StorageError, match="no study"):
        fail_stale_trials(storage, "missing", older_than=0)
    with pytest.raises(ValueError, match="older_than"):
        fail_stale_trials(storage, "zombie", older_than=-1)

    search(model, val, **options)  # resumes; the failed trial counts toward n_trials
    trials = trials_of(storage, "zombie")
    assert len({t.number for t in trials}) == len(trials)
    assert all(t.state.is_finished() for t in trials)
    assert len([t for t in trials if t.state in COUNTED]) == options["n_trials"]


@pytest.mark.slow
def test_ctrl_c_stops_without_a_traceback_and_the_same_search_resumes(trained, saved: Path) -> None:
    model, val = trained
    run_dir = saved / "run"
    options = {**BASE, "n_trials": 10, "study_name": "interrupted", "run_dir": str(run_dir)}
    storage = sqlite_url(run_dir / "study.db")

    progress = saved / "progress"

    def inside_a_trial() -> bool:
        # Only once a trial has finished: opening the storage while the worker is still creating
        # its tables races with it (both run CREATE TABLE).
        return progress.exists() and any(t.state == TrialState.RUNNING and t.params
                                         for t in trials_of(storage, "interrupted"))

    spec = make_spec(saved, "interrupted", options, trial_sleep=0.5, progress=str(progress))
    with processes() as start:
        process = start(spec)
        poll(lambda: inside_a_trial() or process.poll() is not None, 90, "a trial after the first")
        assert process.poll() is None, stderr_of(spec)[-3000:]
        process.send_signal(signal.SIGINT)
        status = process.wait(timeout=30)
    stderr = stderr_of(spec)
    assert status == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert f"interrupted; re-run the same command to resume study 'interrupted' at {storage}" in stderr

    before = trials_of(storage, "interrupted")
    assert not [t for t in before if t.state == TrialState.RUNNING]
    # Inside a trial Ctrl-C fails that trial; in Optuna's bookkeeping it stops after it (no FAIL).
    assert len([t for t in before if t.state == TrialState.FAIL]) <= 1
    done = {t.number: (t.params, t.datetime_complete) for t in before
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
    assert done

    search(model, val, **options)
    after = trials_of(storage, "interrupted")
    assert len({t.number for t in after}) == len(after)
    assert {t.number: (t.params, t.datetime_complete) for t in after if t.number in done} == done
    assert not [t for t in after if t.state == TrialState.RUNNING]
    assert len([t for t in after if t.state in COUNTED]) == options["n_trials"]


def test_seeded_search_repeats_its_trials_when_the_latency_table_is_reused(trained, tmp_path: Path) -> None:
    _, val = trained
    torch.manual_seed(0)  # wide enough that low ranks are measurably faster even on a busy machine
    model = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
    options = {"budget": "1%", "objective": "latency", "threads": 1, "n_trials": 10, "seed": 5,
               "latency_min_run_time": 0.002, "latency_repeats": 1}
    first = search(model, val, run_dir=str(tmp_path / "first"), **options)
    (tmp_path / "second").mkdir()
    shutil.copy(tmp_path / "first" / TABLE_FILE, tmp_path / "second" / TABLE_FILE)
    table = (tmp_path / "second" / TABLE_FILE).read_bytes()
    second = search(model, val, run_dir=str(tmp_path / "second"), **options)
    assert (tmp_path / "second" / TABLE_FILE).read_bytes() == table, "the copied table was measured again"
    # Warm starts beyond n_trials stay enqueued (WAITING) for a longer run; only the trials that ran count.
    runs = [[t.params for t in trials_of(result.storage, result.study_name) if t.state != TrialState.WAITING]
            for result in (first, second)]
    assert len(runs[0]) == options["n_trials"]
    assert runs[0] == runs[1]
    assert second.latency_table.to_dict() == first.latency_table.to_dict()


def test_unreachable_server_fails_fast_and_writes_nothing(trained, tmp_path: Path) -> None:
    model, val = trained
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    forwards: list[int] = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        for run_dir in (tmp_path / "new", kept):
            with pytest.raises(StorageError, match="127.0.0.1:1"):
                search(model, val, storage="postgresql://postgres@127.0.0.1:1/none", run_dir=str(run_dir),
                       **BASE, n_trials=2)
    finally:
        hook.remove()
    assert forwards == []  # it failed before any evaluation or profiling, not after the work
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]


def test_heartbeat_interval_is_checked_and_reaches_the_storage(trained, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="heartbeat_interval"):
        SearchConfig(heartbeat_interval=0)
    opened = []

    def refuse(url: str, **kwargs: Any) -> None:
        opened.append(kwargs)
        raise StorageError("stop here")

    monkeypatch.setattr(study_module, "open_storage", refuse)
    model, val = trained
    with pytest.raises(StorageError, match="stop here"):
        search(model, val, run_dir=str(tmp_path), heartbeat_interval=7, **BASE)
    assert opened == [{"heartbeat_interval": 7}]
