"""Soak run of distributed search under SIGKILL (issue 15): 4 workers, one killed and restarted every few trials.

Four worker processes share one study (a journal file by default, or any ``--storage`` URL) on
a tiny MLP whose trials take about a second each. Every few seconds one worker, chosen at
random among those that have finished a trial since they started, is SIGKILLed wherever it is
(mostly inside a trial, sometimes recording one) and started again at once with the same command. When the study holds its trials and every worker has ended, one
finalize-style search runs, as ``lrsearch finalize`` would. Reported (goals in brackets):

* ``trials_lost`` [0]: configurations whose trial was killed and never ran to the end again;
* ``trials_run_twice`` [0]: one trial number finished by two processes (a storage race);
* ``duplicate_retries`` [0]: a killed trial retried more than once;
* ``running_at_end`` [0]: trials still RUNNING after the finalize search (and before it);
* ``same_configuration_evaluated_concurrently``: two workers evaluating one configuration
  at the same time because their samplers proposed it together (not a storage fault).

Run: ``.venv/bin/python benchmarks/soak_distributed.py [--trials 240] [--kill-every 6] [--storage URL]``;
writes ``benchmarks/results/soak_distributed.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState
from torch import nn

RESULTS = Path(__file__).parent / "results"
STUDY = "soak"
N_WORKERS = 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=generator)
    y = (x[:, :4] * torch.tensor([1.0, -2.0, 0.5, 1.5])).argmax(1)
    return [(x[i:i + 128], y[i:i + 128]) for i in range(0, 512, 128)]


def _slow_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy that takes a quarter second a batch, so that kills land inside trials."""
    time.sleep(0.25)
    return float((outputs.argmax(1) == targets).double().mean())


def _work(spec: dict[str, Any]) -> int:
    """One worker: search the shared study, appending ``PID NUMBER`` to the log for each trial it finishes."""
    import lrsearch

    torch.set_num_threads(1)
    log = Path(spec["log"])

    def finished(_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        with log.open("a") as handle:
            handle.write(f"{os.getpid()} {trial.number}\n")

    lrsearch.search(_model(), _data(), metric=_slow_accuracy, metric_name="accuracy", callbacks=[finished],
                    budget="1%", objective="macs", n_trials=spec["n_trials"], storage=spec["storage"],
                    study_name=STUDY, worker_index=spec["worker_index"], run_dir=spec["run_dir"])
    return 0


def _start(folder: Path, index: int) -> subprocess.Popen[bytes]:
    spec = folder / f"worker{index}.json"
    with (folder / f"worker{index}.err").open("ab") as err:
        return subprocess.Popen([sys.executable, __file__, "--worker", str(spec)], stdout=subprocess.DEVNULL,
                                stderr=err, stdin=subprocess.DEVNULL)


def _study(storage: str) -> optuna.Study | None:
    """The shared study as a reader sees it, or None before a worker created it."""
    from lrsearch.study import open_storage

    try:
        return optuna.load_study(study_name=STUDY, storage=open_storage(storage, heartbeat_interval=None))
    except KeyError:
        return None


def _soak(folder: Path, storage: str, n_trials: int, kill_every: float, seed: int) -> dict[str, Any]:
    """Run the workers and the killer until the study is full and every worker ended; the kill log."""
    rng = random.Random(seed)
    for index in range(N_WORKERS):
        (folder / f"worker{index}.json").write_text(json.dumps({
            "storage": storage, "n_trials": n_trials, "worker_index": index, "run_dir": str(folder / "run"),
            "log": str(folder / "finished.log")}))
    from lrsearch.study._zombies import counted_trials

    workers = {index: _start(folder, index) for index in range(N_WORKERS)}
    kills, failures, study = 0, 0, None
    started = time.monotonic()
    next_kill = started + kill_every
    try:
        while any(w.poll() is None for w in workers.values()):
            time.sleep(0.2)
            for index, worker in workers.items():  # a worker that failed (not one we killed) is restarted too
                if worker.returncode not in (None, 0, -signal.SIGKILL):
                    failures += 1
                    workers[index] = _start(folder, index)
            study = study or _study(storage)
            # Only a worker that has finished a trial since it started: it is in its trial loop,
            # and most of that loop is inside a trial (a kill during start-up would test less).
            log = folder / "finished.log"
            searching = {int(line.split()[0]) for line in log.read_text().splitlines()} if log.exists() else set()
            victims = [i for i, w in workers.items() if w.poll() is None and w.pid in searching]
            if time.monotonic() >= next_kill and victims and not (study and counted_trials(study) >= n_trials):
                index = rng.choice(victims)
                workers[index].kill()
                workers[index].wait()
                kills += 1
                workers[index] = _start(folder, index)  # the same command again, at once
                next_kill = time.monotonic() + rng.uniform(0.5, 1.5) * kill_every
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                worker.kill()
            worker.wait()
    return {"kills": kills, "worker_failures": failures, "soak_seconds": round(time.monotonic() - started, 1)}


def _audit(trials: list[optuna.trial.FrozenTrial], finished_log: Path) -> dict[str, Any]:
    from lrsearch.study._space import SearchSpace

    by_number = {t.number: t for t in trials}
    retries = collections.defaultdict(list)
    for trial in trials:
        if "failed_trial" in trial.system_attrs:
            retries[trial.system_attrs["failed_trial"]].append(trial.number)
    done = (TrialState.COMPLETE, TrialState.PRUNED)
    killed = [t.number for t in trials if t.state == TrialState.FAIL]
    # A configuration is lost if its first trial failed and no retry of it finished.
    lost = [n for n in killed if "failed_trial" not in by_number[n].system_attrs
            and not any(by_number[r].state in done for r in retries.get(n, []))]
    runs = collections.Counter(int(line.split()[1]) for line in finished_log.read_text().splitlines())
    evaluated = collections.defaultdict(list)
    for trial in trials:
        if trial.state in done and "duplicate_of" not in trial.user_attrs:
            evaluated[SearchSpace.key(trial.params)].append(trial.number)
    return {"trials_in_study": len(trials), "failed_killed": len(killed),
            "trials_lost": len(lost), "lost_trials": lost,
            "trials_run_twice": sum(1 for count in runs.values() if count > 1),
            "duplicate_retries": sum(1 for numbers in retries.values() if len(numbers) > 1),
            "same_configuration_evaluated_concurrently": sum(len(n) - 1 for n in evaluated.values()),
            "concurrent_evaluations": [[(n, by_number[n].user_attrs.get("warm_start", "sampled")) for n in numbers]
                                       for numbers in evaluated.values() if len(numbers) > 1],
            "states": dict(collections.Counter(t.state.name for t in trials))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=240)
    parser.add_argument("--kill-every", type=float, default=6.0, help="seconds between kills, on average")
    parser.add_argument("--storage", default=None, help="default: a journal file in a temporary folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.exit(_work(json.loads(Path(args.worker).read_text())))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import lrsearch
    from lrsearch.study._zombies import counted_trials

    with tempfile.TemporaryDirectory(prefix="lrsearch-soak-") as tmp:
        folder = Path(tmp)
        storage = args.storage or f"journal:{folder / 'study.log'}"
        soak = _soak(folder, storage, args.trials, args.kill_every, args.seed)
        before = _study(storage)
        running_before = 0 if before is None else sum(t.state == TrialState.RUNNING for t in before.get_trials())
        start = time.monotonic()
        lrsearch.search(_model(), _data(), metric=_slow_accuracy, metric_name="accuracy", budget="1%",
                        objective="macs", n_trials=args.trials, storage=storage, study_name=STUDY,
                        run_dir=str(folder / "run"))
        final = _study(storage)
        assert final is not None, "the finalize search ran on the study"
        at_end = final.get_trials()
        report = {
            "storage": "journal" if args.storage is None else args.storage.split(":")[0],
            "workers": N_WORKERS, "n_trials": args.trials, "kill_every_s": args.kill_every, "seed": args.seed,
            **soak, "finalize_seconds": round(time.monotonic() - start, 1),
            "running_before_finalize": running_before,
            "running_at_end": sum(t.state == TrialState.RUNNING for t in at_end),
            "counted_at_end": counted_trials(final),
            **_audit(at_end, folder / "finished.log"),
            "lrsearch": lrsearch.__version__, "optuna": optuna.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(),
        }
    print(json.dumps(report, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak_distributed.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
