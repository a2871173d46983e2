"""The ``lrsearch`` command line, run as users run it: ``python -m lrsearch ...`` in a subprocess.

One tiny default ``tune`` run (module fixture) feeds the report and dashboard tests. Every
bad-input case runs concurrently in one fixture (each subprocess spends most of its time importing
Lightning), then each is asserted by its own test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import lrsearch
from lrsearch import cli
from lrsearch.pipeline import _compress
from tests.cli._bars import search_bars

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--search.n_trials", "4", "--search.threads", "1", "--search.latency_min_run_time", "0.005",
        "--search.latency_repeats", "1", "--finetune.epochs", "1", "--finetune.progress", "false"]


def _env(*, warnings: str = "ignore") -> dict[str, str]:
    # One torch thread per process: on a small shared CI machine, torch's spinning worker threads
    # otherwise multiply the CPU time of every subprocess (4x measured on 2 busy cores).
    environment = {**os.environ, "PYTHONWARNINGS": warnings, "OMP_NUM_THREADS": "1"}
    if not warnings:
        environment.pop("PYTHONWARNINGS")
    return environment


def _run(*args: str, cwd: Path = ROOT, timeout: float = 300, warnings: str = "ignore") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lrsearch", *args], cwd=cwd, env=_env(warnings=warnings),
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The default job (built-in pretrained MNIST-1D MLP, latency objective) at a tiny size, with
    Python's default warning filters, as a user runs it."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    result = _run("tune", "--budget", "5%", "--run_dir", str(run_dir), *TINY, warnings="")
    return result, run_dir


def test_tune_default_runs_end_to_end(tuned) -> None:
    result, run_dir = tuned
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    report = json.loads((run_dir / "report.json").read_text())
    assert report["meets_budget"] is True and report["budget"] == "5%"
    for name in ("model/recipe.json", "compressed.ckpt", "report.html", "search/study.db",
                 "search/latency-table.json"):
        assert (run_dir / name).exists(), name
    # The summary: both columns, the measured speedup, and where everything went.
    out = result.stdout
    assert "MEETS THE BUDGET 5%" in out
    for text in ("original", "compressed", "parameters", "MACs per sample", "x faster", "accuracy (test split)",
                 str(run_dir / "compressed.ckpt"), str(run_dir / "report.html"), "lrsearch dashboard"):
        assert text in out, text
    assert f"{report['dense']['params']:,}" in out and f"{report['final']['params']:,}" in out
    low, high = report["final"]["verify_drop_interval"]
    assert f"[95 % interval of the drop: {100 * low:.2f} to {100 * high:.2f}]" in out


def test_tune_shows_one_search_bar_and_no_warnings_of_its_own(tuned) -> None:
    result, _ = tuned
    bars = search_bars(result.stderr)
    assert len(bars) == 1 and bars[0][-1] == (4, 4), bars  # one bar over the 4 trials, to the end
    assert " ms (trial " in result.stderr  # the best feasible cost, with its unit
    assert "fine-tuning trial " in result.stderr  # which candidate is being fine-tuned
    assert "warning" not in result.stderr.lower(), result.stderr[-3000:]
    assert "Trial 0 finished" not in result.stderr  # no per-trial log lines of Optuna


def test_report_rebuilds_the_html(tuned, capsys) -> None:
    _, run_dir = tuned
    html = run_dir / "report.html"
    html.unlink()
    assert cli.main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(html)
    assert html.read_text().startswith("<!DOCTYPE html>")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_dashboard_serves_the_run_study(tuned) -> None:
    _, run_dir = tuned
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "lrsearch", "dashboard", str(run_dir), "--host", "127.0.0.1",
                                "--port", str(port)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        body = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    body = json.loads(response.read())
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        assert body is not None, f"dashboard did not answer (exit {process.poll()})"
        assert [s["study_name"] for s in body["study_summaries"]] == ["lrsearch"]
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# Bad input: exit 2, one line on stderr, no traceback, nothing written. ------------------------

MODEL = ["--model", "lrsearch.demo.lightning.Mnist1dClassifier", "--data", "lrsearch.demo.lightning.Mnist1dDataModule"]
BAD: dict[str, tuple[list[str], str]] = {
    "budget": (["tune", "--budget", "half a percent"], "budget is not a number"),
    "missing config": (["tune", "--config", "no/such/config.yaml"], "file not found"),
    "unknown class path": (["tune", "--model", "no_such_package.Model", "--data", "no_such_package.Data"],
                           "no_such_package"),
    "negative budget": (["tune", "--budget", "-1%"], "budget"),
    "not a LightningModule": (["tune", "--model", "torch.nn.Linear"], "not a LightningModule"),
    "model without data": (["tune", "--model", "lrsearch.demo.lightning.Mnist1dClassifier"], "data is not"),
    "missing checkpoint": (["tune", *MODEL, "--ckpt_path", "no/such.ckpt"], "checkpoint not found"),
    "checkpoint is /dev/null": (["tune", *MODEL, "--ckpt_path", "/dev/null"],
                                "is not a regular file but a character device"),
    "checkpoint is a folder": (["tune", *MODEL, "--ckpt_path", "{tmp}"], "is a folder, not a file"),
    "empty checkpoint": (["tune", *MODEL, "--ckpt_path", "{empty}"], "is empty (0 bytes)"),
    "unreadable checkpoint": (["tune", *MODEL, "--ckpt_path", "{unreadable}"], "permission denied"),
    "text file as checkpoint": (["tune", *MODEL, "--ckpt_path", "{text}"], "not written by torch.save"),
    "truncated checkpoint": (["tune", *MODEL, "--ckpt_path", "{truncated}"], "it is truncated or corrupted"),
    "checkpoint of a list": (["tune", *MODEL, "--ckpt_path", "{list}"], "neither a Lightning checkpoint nor"),
    "bad sampler": (["tune", "--search.sampler", "annealing"], "search.sampler"),
    "bad finetune value": (["tune", "--finetune.alpha", "2"], "alpha"),
    "unreachable storage": (["worker", "--storage", "postgresql://nobody@127.0.0.1:9/none"], "storage"),
    "unknown storage kind": (["worker", "--storage", "not-a-url"], "Cannot tell what kind of storage"),
    "worker without storage": (["worker"], "--storage"),
    "finalize without study file": (["finalize", "--storage", "journal:{tmp}/missing.log"], "no study file"),
    "report of no run": (["report", "{tmp}"], "No report"),
    "dashboard of nothing": (["dashboard", "{tmp}/nothing"], "neither a run folder"),
}
# These two run as real subprocesses (concurrently: each spends seconds importing Lightning);
# the others run in-process through cli.main, which is the same code path.
IN_SUBPROCESS = ("budget", "missing config")


def _bad_files(tmp: Path) -> dict[str, Path]:
    """Files that are no checkpoint: empty, unreadable, text, a cut-off torch.save, a saved list."""
    files = {name: tmp / f"{name}.ckpt" for name in ("empty", "unreadable", "text", "truncated", "list")}
    files["empty"].write_bytes(b"")
    torch.save({"state_dict": {"w": torch.zeros(8, 8)}}, files["unreadable"])
    files["unreadable"].chmod(0)
    files["text"].write_text("budget: 1%\n")
    torch.save({"state_dict": {"w": torch.zeros(8, 8)}}, files["truncated"])
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:200])
    torch.save([1, 2], files["list"])
    return files


def _argv(case: str, tmp: Path) -> tuple[list[str], Path]:
    files = _bad_files(tmp)
    args, _ = BAD[case]
    run_dir = tmp / case.replace(" ", "-").replace("/", "") / "run"
    argv = [a.format(tmp=tmp, **files) for a in args]
    if argv[0] in cli._JOB_COMMANDS:
        argv += ["--run_dir", str(run_dir)]
    return argv, run_dir


@pytest.fixture(scope="module")
def bad_subprocesses(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, str, Path]]:
    tmp = tmp_path_factory.mktemp("bad")
    processes = {}
    for case in IN_SUBPROCESS:
        argv, run_dir = _argv(case, tmp)
        processes[case] = (subprocess.Popen([sys.executable, "-m", "lrsearch", *argv], cwd=ROOT, env=_env(),
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), run_dir)
    results = {}
    for case, (process, run_dir) in processes.items():
        try:
            out, err = process.communicate(timeout=240)
        finally:
            process.kill()
        results[case] = (process.returncode, out, err, run_dir)
    return results


def _check_bad(case: str, status: int, out: str, err: str, run_dir: Path) -> None:
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("lrsearch "), err
    assert "error:" in lines[0] and BAD[case][1] in lines[0], lines[0]
    assert "Traceback" not in err + out
    assert not run_dir.exists(), "a failed command must not create its run folder"


@pytest.mark.parametrize("case", IN_SUBPROCESS)
def test_bad_input_subprocess(bad_subprocesses, case: str) -> None:
    _check_bad(case, *bad_subprocesses[case])


_ROOT_READS_ANYTHING = pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                                          reason="root may read a file without read permission")


@pytest.mark.parametrize("case", [pytest.param(case, marks=_ROOT_READS_ANYTHING) if case == "unreadable checkpoint"
                                  else case for case in BAD if case not in IN_SUBPROCESS])
def test_bad_input_in_process(case: str, tmp_path: Path, capsys) -> None:
    argv, run_dir = _argv(case, tmp_path)
    status = cli.main(argv)
    captured = capsys.readouterr()
    _check_bad(case, status, captured.out, captured.err, run_dir)


def test_print_config_prints_the_merged_yaml(capsys) -> None:
    with pytest.raises(SystemExit) as exited:  # jsonargparse prints the config and exits
        cli.main(["tune", "--config", str(ROOT / "configs" / "mnist1d_cnn.yaml"), "--search.n_trials", "7",
                  "--print_config"])
    assert exited.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"] == "lrsearch.demo.lightning.Mnist1dClassifier"
    assert config["model"]["init_args"]["arch"] == "cnn"
    assert config["search"]["n_trials"] == 7 and config["budget"] == "0.5%"
    assert set(config["finetune"]) >= {"epochs", "max_steps", "lr_scale", "distill", "temperature", "alpha"}


@pytest.mark.parametrize("name", sorted(p.stem for p in cli.CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_config_parses_and_builds_its_spec(name: str) -> None:
    """In-process: parse each config by name (no instantiation, so no pretraining or database)."""
    parser, _ = cli._parser("tune")
    args = parser.parse_args(cli.prepared(["tune", "--config", name]))
    assert args.tune.model.class_path.startswith("lrsearch.demo.")
    spec = cli._spec_of("tune", args.tune)
    assert spec.allowed == lrsearch.parse_budget(args.tune.budget)


def test_exit_status_1_when_no_configuration_holds(monkeypatch, tmp_path: Path, capsys) -> None:
    """The exit status follows CompressionResult.meets_budget; the summary says what was tried."""
    report = {"budget": "0.5%", "allowed_drop": 0.005, "metric": "accuracy", "meets_budget": False,
              "message": "No configuration met the budget 0.5% on test after fine-tuning (1 tried).",
              "threads": 1, "batch_size": 256, "splits": {"search": "validation", "select": "validation (held out)", "test": "test"},
              "dense": {"params": 10, "macs": 10.0, "latency_ms": 1.0, "search_metric": 0.9, "verify_metric": 0.9},
              "attempts": [{"trial": 3, "select_drop": 0.02}], "paths": {"study": "sqlite:///x.db"}}
    calls: dict[str, Any] = {}

    def fake_run_compression(module, run, **kwargs):
        calls.update(kwargs, spec=run.spec)
        return lrsearch.CompressionResult(meets_budget=False, model=None, candidate=None, report=report,
                                          paths={"report": tmp_path / "report.json"}, search=None)

    monkeypatch.setattr(_compress, "run_compression", fake_run_compression)
    status = cli.main(["tune", "--run_dir", str(tmp_path / "run"), "--search_budget", "2%", "--max_finetunes", "2",
                       "--search.objective", "macs", "--finetune.distill", "false"])
    out = capsys.readouterr().out
    assert status == 1
    assert "DOES NOT MEET THE BUDGET 0.5%" in out and "tried after fine-tuning: trial 3" in out and "HINT" in out
    spec = calls["spec"]
    assert calls["announce"] is False  # the summary says it all: no outcome line before it
    assert spec.search_budget == "2%" and spec.max_finetunes == 2 and str(spec.allowed) == "0.5%"
    assert str(spec.constraint) == "2%" and spec.run_dir == str(tmp_path / "run")
    # The Python defaults, not copies of them that could drift: threads None is torch's setting.
    assert spec.search == lrsearch.SearchConfig(objective="macs")
    assert spec.finetune == lrsearch.FinetuneConfig(distill=False)


def test_a_failed_trial_is_one_line_without_its_traceback(capfd: pytest.CaptureFixture[str]) -> None:
    import logging

    import optuna

    from lrsearch.pipeline._console import run_console

    optuna.logging.get_logger("optuna")  # the library handler exists before the command starts
    with run_console(verbose=False):
        try:
            raise RuntimeError("candidate exploded")
        except RuntimeError as error:
            logging.getLogger("optuna.study._optimize").warning("Trial 3 failed: %r", error, exc_info=error)
    err = capfd.readouterr().err
    assert "Trial 3 failed: RuntimeError('candidate exploded')" in err
    assert "Traceback" not in err
    handlers = logging.getLogger("optuna").handlers
    assert handlers and all(not handler.filters for handler in handlers)  # put back afterwards
