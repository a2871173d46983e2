"""Every script in examples/ runs at its small size (LRSEARCH_SMALL=1) and does what it says."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def _run(command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    # One torch thread per process (see tests/cli/test_cli.py); the examples' own sizes stay small.
    environment = {**os.environ, "LRSEARCH_SMALL": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **env}
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600,
                            check=False)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def callback_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    run_dir = tmp_path_factory.mktemp("examples") / "callback"
    return _run([sys.executable, str(EXAMPLES / "callback_training.py"), "--run-dir", str(run_dir)]), run_dir


def test_callback_training(callback_run) -> None:
    result, run_dir = callback_run
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["message"] in result.stdout
    assert report["meets_budget"], report["message"]   # the 2-epoch model gains from fine-tuning
    assert (run_dir / "model" / "recipe.json").is_file() and (run_dir / "compressed.ckpt").is_file()


def test_load_compressed(callback_run) -> None:
    _, run_dir = callback_run
    result = _run([sys.executable, str(EXAMPLES / "load_compressed.py"), str(run_dir)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "both loaders give the same outputs: True" in result.stdout
    assert "factorized layers: net.layers." in result.stdout


def test_cli_own_module(tmp_path: Path) -> None:
    result = _run([sys.executable, str(EXAMPLES / "cli_own_module.py"), "--run-dir", str(tmp_path / "own")])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "own" / "compressed" / "report.json").read_text())
    assert report["meets_budget"], report["message"]
    assert "reloaded with OwnClassifier.load_from_checkpoint" in result.stdout
    assert "PYTHONPATH=examples lrsearch tune --config" in result.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_distributed_search(tmp_path: Path) -> None:
    run_dir = tmp_path / "distributed"
    result = _run(["bash", str(EXAMPLES / "distributed_search.sh")], RUN_DIR=str(run_dir),
                  LRSEARCH=f"{sys.executable} -m lrsearch")
    assert result.returncode in (0, 1), result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert result.returncode == (0 if report["meets_budget"] else 1)
    found = re.search(r"(\d+) trials found by the workers, no new ones", result.stdout)
    assert found and 8 <= int(found.group(1)) <= 8 + 2, result.stdout[-2000:]  # workers may overshoot by one each
    assert report["paths"]["study"] == f"journal:{run_dir}/study.log"
    assert len(report["trials"]) <= int(found.group(1))
    for index in (0, 1):
        log = (run_dir / f"worker{index}.log").read_text()
        assert f"Worker {index} on study 'mnist1d-mlp'" in log and "Traceback" not in log
