"""One search worker process of the reliability tests: ``python _worker.py SPEC.json``.

SPEC holds the saved model and data (see the ``saved`` fixture), the ``search`` options, and
test knobs: ``trial_sleep`` (seconds each trial sleeps once its parameters are chosen, so
workers overlap and a signal lands inside a trial), ``hang_marker`` (the first trial writes
this file and then sleeps until it is killed), ``ready``/``go`` (write ``ready``, then wait for ``go`` before
searching, so all workers start together), ``progress`` (a file holding how many trials this
process has finished, written after each) and ``result`` (a JSON file this process writes
when its search returns). Ctrl-C ends the process with status 130, the one line that says how to
resume and no traceback, as a CLI would.

``rounds`` (a list of ``{"options", "result"}``) runs several searches in one process, each
behind a barrier in the folder ``barrier``: the process writes ``ready-NAME-K`` and waits for
``go-K``, which holds the wall-clock instant all workers begin round K together. Other knobs:
``hang_in_latency_table`` (a marker file: measuring the latency table writes it and hangs
until the process is killed) and ``foreign_host`` (this process's trials claim another host, as
a worker on another machine's would), ``model: "wide"`` (256 hidden units, where low ranks are
measurably faster) and ``log`` (lrsearch's INFO messages on stderr).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from torch import nn


def mlp(width: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))


def _slow_trials(*, trial_sleep: float, hang_marker: str | None) -> None:
    """Make every trial sleep (or hang, if ``hang_marker``) once its parameters are chosen.

    The sleep sits in the objective's duplicate check, which every trial passes right after
    suggesting its parameters, so a trial that replays an earlier one is slow too.
    """
    from lrsearch.study._objective import Objective

    original = Objective._finished_twin

    def finished_twin(trial: Any, params: Any) -> Any:
        if hang_marker:
            Path(hang_marker).write_text(str(os.getpid()))
            time.sleep(600)
        time.sleep(trial_sleep)
        return original(trial, params)

    Objective._finished_twin = staticmethod(finished_twin)  # type: ignore[method-assign]


def _hang_in_latency_table(marker: str) -> None:
    from lrsearch.study import _study

    def hang(*_args: Any, **_kwargs: Any) -> Any:
        Path(marker).write_text(str(os.getpid()))
        time.sleep(600)

    _study.build_latency_table = hang  # type: ignore[assignment]


def _pretend_another_host() -> None:
    from lrsearch.study import _zombies

    _zombies._this_host = lambda: "another-machine"  # type: ignore[assignment]


def _barrier(folder: Path, name: str, round_index: int) -> None:
    """Say this process is ready for the round, then start it at the instant the driver wrote."""
    (folder / f"ready-{name}-{round_index}").write_text(str(os.getpid()))
    go = folder / f"go-{round_index}"
    _wait_for(go, timeout=300)
    start = float(go.read_text() or 0)
    while time.time() < start:  # spin, so every worker leaves within a millisecond of the others
        pass


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def main(spec_path: str) -> int:
    # A parent that ignores SIGINT (a background job of a non-interactive shell) passes that on.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import optuna
    import torch

    import lrsearch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    if spec.get("log"):
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    model = mlp(256 if spec.get("model") == "wide" else 64)
    model.load_state_dict(torch.load(spec["state"], weights_only=True))
    data = [tuple(batch) for batch in torch.load(spec["data"], weights_only=True)]
    if spec.get("trial_sleep") or spec.get("hang_marker"):
        _slow_trials(trial_sleep=spec.get("trial_sleep", 0.0), hang_marker=spec.get("hang_marker"))
    if spec.get("hang_in_latency_table"):
        _hang_in_latency_table(spec["hang_in_latency_table"])
    if spec.get("foreign_host"):
        _pretend_another_host()
    if spec.get("ready") or spec.get("barrier"):
        lrsearch.core.macs_per_sample(model, data[0])  # its first call imports torch._dynamo: seconds
    if spec.get("ready"):
        Path(spec["ready"]).write_text(str(os.getpid()))
        _wait_for(Path(spec["go"]), timeout=120)
    rounds = spec.get("rounds") or [{"options": spec["options"], "result": spec.get("result")}]
    for index, one in enumerate(rounds):
        if spec.get("barrier"):
            _barrier(Path(spec["barrier"]), Path(spec_path).stem, index)
        ran: list[int] = []

        def finished(study: Any, trial: Any, ran: list[int] = ran) -> None:
            ran.append(trial.number)
            if spec.get("progress"):
                Path(spec["progress"]).write_text(str(len(ran)))

        try:
            result = lrsearch.search(model, data, callbacks=[finished], **one["options"])
        except KeyboardInterrupt as interrupt:  # lrsearch's Interrupted says how to resume
            print(interrupt, file=sys.stderr)
            return 130
        study = optuna.load_study(study_name=result.study_name,
                                  storage=lrsearch.study.open_storage(result.storage, heartbeat_interval=None))
        report = {"pid": os.getpid(), "ran": ran, "baseline": result.baseline, "allowed_drop": result.allowed_drop,
                  "dense": result.dense, "study_attrs": study.user_attrs,
                  "best": None if result.best is None else result.best.trial}
        if one.get("result"):
            Path(one["result"]).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
