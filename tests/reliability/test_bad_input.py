"""Bad input, table-driven, through the Python API and the ``lrsearch`` command line.

Every case fails with a typed error (API) or exit status 2 and one line on stderr (CLI), the
message names the problem, and nothing is left behind: the folder a case runs in (its inputs and
its run folder) is listed before and after and must not change. CLI cases run in-process through
``lrsearch.cli.main``, the console script's function (tests/cli runs two bad-input cases as real
subprocesses); here one runs as a subprocess against a server that accepts connections and never
answers: it must fail within the subprocess timeout instead of hanging.

A candidate that raises or produces NaN during the search is not bad input: its trial fails (or is
infeasible) and the study finishes the other trials.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import pytorch_lightning as pl
import torch
from optuna.trial import TrialState
from torch import nn

import lrsearch
from lrsearch import cli
from lrsearch._errors import LrSearchError, RecipeError
from lrsearch.core import Decomposition
from lrsearch.measure import EvaluationError, LoggedMetricError
from lrsearch.pipeline._data import DataError
from lrsearch.study import StorageError
from tests.reliability._lit import NoLinearClassifier, NoValidationData, TinyClassifier, TinyData

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ROOT = Path(__file__).resolve().parents[2]
LIT = "tests.reliability._lit"
MODEL = ["--model", f"{LIT}.TinyClassifier", "--data", f"{LIT}.TinyData"]
# If a case wrongly got as far as searching, it would still end in seconds.
TINY = ["--search.n_trials", "3", "--search.objective", "macs", "--finetune.epochs", "1",
        "--finetune.progress", "false"]
REFUSED = "postgresql://nobody@127.0.0.1:1/none"  # nothing listens on port 1


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and modification time."""
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*"))}


def _saved(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _inputs(folder: Path, checkpoint: Path) -> dict[str, str]:
    """Write every file a CLI case may name into ``folder``; the placeholders of the argv templates."""
    good = checkpoint.read_bytes()
    other = lrsearch.factorize(TinyClassifier(hidden=32), 0.25, method="svd")
    files: dict[str, bytes | str] = {
        "ckpt": good,
        "truncated_ckpt": good[: len(good) // 2],
        "empty_ckpt": b"",
        "wrong_arch_ckpt": _saved({"state_dict": TinyClassifier(hidden=32).state_dict()}),
        "compressed_wrong_arch_ckpt": _saved({"state_dict": other.state_dict(),
                                              lrsearch.CHECKPOINT_KEY: lrsearch.get_recipe(other)}),
        "not_a_state_dict_ckpt": _saved([torch.ones(3)]),
        "unknown_key_yaml": "budget: 1%\nbogus: 3\n",
        "unknown_search_key_yaml": "search:\n  n_trialz: 5\n",
        "unknown_module_yaml": f"model:\n  class_path: no_such_module.Model\ndata:\n  class_path: {LIT}.TinyData\n",
        "unknown_class_yaml": f"model:\n  class_path: {LIT}.NoSuchModel\ndata:\n  class_path: {LIT}.TinyData\n",
        "unknown_init_arg_yaml": (f"model:\n  class_path: {LIT}.TinyClassifier\n  init_args: {{hiddn: 8}}\n"
                                  f"data:\n  class_path: {LIT}.TinyData\n"),
        "broken_yaml": "model: [unclosed\n",
        "bad_budget_yaml": "budget: abc\n",
        # TINY's flags come after the config and win, so the bad value is one they do not set
        "bad_repeats_yaml": "search:\n  latency_repeats: 0\n",
    }
    paths = {"tmp": str(folder), "run": str(folder / "run")}
    for name, content in files.items():
        path = folder / name.replace("_ckpt", ".ckpt").replace("_yaml", ".yaml")
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        paths[name] = str(path)
    return paths


# Every case exits with status 2 and one line on stderr that contains the fragment.
CLI_CASES: list[Any] = [
    # budgets
    pytest.param(["--budget", "-1%"], "budget: The budget is negative", id="budget negative percent"),
    pytest.param(["--budget", "-0.01"], "budget: The budget is negative", id="budget negative fraction"),
    pytest.param(["--budget", "nan"], "budget: The budget is not finite", id="budget NaN"),
    pytest.param(["--budget", "100%"], "budget: The budget is 100% or more", id="budget 100%"),
    pytest.param(["--budget", "abc"], "budget: The budget is not a number", id="budget abc"),
    pytest.param(["--budget", ""], "budget: The budget is empty", id="budget empty"),
    pytest.param(["--search_budget", "-2%"], "search_budget: The budget is negative", id="search budget negative"),
    pytest.param(["--config", "{bad_budget_yaml}"], "budget: The budget is not a number", id="budget abc in config"),
    # checkpoints
    pytest.param([*MODEL, "--ckpt_path", "{tmp}/missing.ckpt"], "checkpoint not found", id="checkpoint missing"),
    pytest.param([*MODEL, "--ckpt_path", "{tmp}"], "is a folder", id="checkpoint is a folder"),
    pytest.param([*MODEL, "--ckpt_path", "{truncated_ckpt}"], "truncated", id="checkpoint truncated"),
    pytest.param([*MODEL, "--ckpt_path", "{empty_ckpt}"], "is empty (0 bytes)", id="checkpoint empty"),
    pytest.param([*MODEL, "--ckpt_path", "{wrong_arch_ckpt}"], "does not fit TinyClassifier",
                 id="checkpoint of another architecture"),
    pytest.param([*MODEL, "--ckpt_path", "{compressed_wrong_arch_ckpt}"], "does not fit the model",
                 id="compressed checkpoint of another architecture"),
    pytest.param([*MODEL, "--ckpt_path", "{not_a_state_dict_ckpt}"], "neither a Lightning checkpoint nor a state_dict",
                 id="checkpoint holds no state_dict"),
    # configs
    pytest.param(["--config", "{tmp}/missing.yaml"], "file not found", id="config missing"),
    pytest.param(["--config", "{unknown_key_yaml}"], "'bogus' is not an option", id="config unknown key"),
    pytest.param(["--config", "{unknown_search_key_yaml}"], ("search.n_trialz", "did you mean 'search.n_trials'"), id="config unknown search key"),
    pytest.param(["--config", "{unknown_module_yaml}"], "No module named 'no_such_module'",
                 id="config unknown module"),
    pytest.param(["--config", "{unknown_class_yaml}"], "has no attribute 'NoSuchModel'", id="config unknown class"),
    pytest.param(["--config", "{unknown_init_arg_yaml}"], "'hiddn' is not accepted", id="config unknown init arg"),
    pytest.param(["--config", "{broken_yaml}"], ("not valid YAML", "broken.yaml, line 2"), id="config not YAML"),
    pytest.param(["--config", "{bad_repeats_yaml}"], "search.latency_repeats must be an integer of at least 1",
                 id="config latency_repeats 0"),
    pytest.param(["--bogus", "1"], "unrecognized arguments: --bogus", id="unknown flag"),
    pytest.param(["--search.n_trails", "3"], "did you mean '--search.n_trials'", id="flag typo"),
    # model and data
    pytest.param(["--model", f"{LIT}.NoLinearClassifier", "--data", f"{LIT}.TinyData"],
                 "has no layer lrsearch can factorize", id="no factorizable layer"),
    pytest.param(["--model", f"{LIT}.TinyClassifier", "--data", f"{LIT}.NoValidationData"],
                 "needs validation data", id="no validation data"),
    pytest.param([*MODEL, "--data.empty_val", "true"], "validation dataloader is empty", id="empty validation data"),
    # storage
    pytest.param(["--storage", REFUSED], "Cannot open the study storage", id="storage refused"),
    pytest.param(["--storage", "not-a-url"], "Cannot tell what kind of storage", id="storage of no known kind"),
    pytest.param(["--storage", "journal:{tmp}"], "is a folder, not a file", id="journal storage is a folder"),
    pytest.param(["--storage", "sqlite:///{ckpt}/study.db"], "cannot be created", id="sqlite storage under a file"),
    pytest.param(["--storage", "sqlite:///{ckpt}"], "is not a SQLite database", id="sqlite storage not SQLite"),
    pytest.param(["--storage", "journal:{ckpt}"], "is not an Optuna journal file", id="journal storage not a journal"),
    # a metric name the module never logs: the message lists the names it does log
    pytest.param([*MODEL, "--ckpt_path", "{ckpt}", "--monitor", "val_accuracy"],
                 ("never logs 'val_accuracy'", "'val_acc', 'val_loss'"), id="monitor a name never logged"),
]


def _check_cli(status: int, out: str, err: str, fragment: str | tuple[str, ...]) -> None:
    lines = err.strip().splitlines()
    assert status == cli.EXIT_USAGE, err
    assert len(lines) == 1 and lines[0].startswith("lrsearch tune: error: "), err
    for part in (fragment,) if isinstance(fragment, str) else fragment:
        assert part in lines[0], lines[0]
    assert "Traceback" not in out + err


@pytest.mark.parametrize(("argv", "fragment"), CLI_CASES)
def test_cli_bad_input(argv: list[str], fragment: str | tuple[str, ...], tiny_checkpoint: Path, tmp_path: Path,
                       capsys) -> None:
    paths = _inputs(tmp_path, tiny_checkpoint)
    before = _listing(tmp_path)
    status = cli.main(["tune", *(word.format(**paths) for word in argv), "--run_dir", paths["run"], *TINY])
    captured = capsys.readouterr()
    _check_cli(status, captured.out, captured.err, fragment)
    assert _listing(tmp_path) == before, "the command wrote, changed or removed files"


# Subprocesses: the console entry point as users run it. ---------------------------------------

@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections and never answers (a hung database server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


@pytest.mark.slow
def test_cli_silent_server_fails_without_hanging(silent_server: int, tiny_checkpoint: Path, tmp_path: Path) -> None:
    paths = _inputs(tmp_path, tiny_checkpoint)
    before = _listing(tmp_path)
    # PGSSLMODE=disable: one connection attempt (libpq tries SSL, then plain), so one connect timeout.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PGSSLMODE": "disable",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "lrsearch", "tune", *MODEL, "--ckpt_path", paths["ckpt"], "--storage",
               f"postgresql://nobody@127.0.0.1:{silent_server}/none", "--run_dir", paths["run"], *TINY]
    # The connect timeout (10 s) must end the command; this timeout only keeps a hang from hanging pytest.
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False)
    _check_cli(result.returncode, result.stdout, result.stderr, "connection timeout")
    assert _listing(tmp_path) == before


# The Python API. ------------------------------------------------------------------------------

@dataclass
class Api:
    """What an API case needs: a trained module, its data, and a run folder inside the listed folder."""

    folder: Path
    module: TinyClassifier

    @property
    def run(self) -> str:
        return str(self.folder / "run")

    @staticmethod
    def val() -> list[Any]:
        return list(TinyData().val_dataloader())


BUDGETS = {"negative": (-0.01, "The budget is negative"), "NaN": (math.nan, "The budget is not finite"),
           "100%": ("100%", "The budget is 100% or more"), "abc": ("abc", "The budget is not a number"),
           "empty": ("", "The budget is empty")}
ENTRY_POINTS: dict[str, Callable[[Api, Any], Any]] = {
    "parse_budget": lambda api, budget: lrsearch.parse_budget(budget),
    "search": lambda api, budget: lrsearch.search(api.module, api.val(), budget=budget, run_dir=api.run,
                                                  objective="macs", n_trials=3),
    "compress": lambda api, budget: lrsearch.compress(api.module, budget=budget, run_dir=api.run,
                                                      datamodule=TinyData()),
    "compress search_budget": lambda api, budget: lrsearch.compress(api.module, budget="1%", search_budget=budget,
                                                                    run_dir=api.run, datamodule=TinyData()),
    "RankSearch": lambda api, budget: lrsearch.RankSearch(budget=budget),
}
API_CASES: list[Any] = [
    *(pytest.param((lambda api, e=entry, b=value: ENTRY_POINTS[e](api, b)), lrsearch.BudgetError, fragment,
                   id=f"{entry} budget {name}")
      for entry in ENTRY_POINTS for name, (value, fragment) in BUDGETS.items()),
    pytest.param(lambda api: lrsearch.search(NoLinearClassifier(), api.val(), run_dir=api.run, objective="macs"),
                 lrsearch.NoMatchingModuleError, "has no layer lrsearch can factorize", id="search no factorizable layer"),
    pytest.param(lambda api: lrsearch.compress(NoLinearClassifier(), budget="1%", run_dir=api.run,
                                               datamodule=TinyData()),
                 lrsearch.NoMatchingModuleError, "has no layer lrsearch can factorize", id="compress no factorizable layer"),
    pytest.param(lambda api: lrsearch.compress(api.module, budget="1%", run_dir=api.run, datamodule=NoValidationData()),
                 DataError, "needs validation data", id="compress no validation data"),
    pytest.param(lambda api: lrsearch.compress(api.module, budget="1%", run_dir=api.run,
                                               datamodule=TinyData(empty_val=True)),
                 DataError, "validation dataloader is empty", id="compress empty validation data"),
    pytest.param(lambda api: lrsearch.search(api.module, [], run_dir=api.run, objective="macs"),
                 EvaluationError, "evaluation data is empty", id="search no data"),
    pytest.param(lambda api: lrsearch.search(api.module, api.val(), run_dir=api.run, storage=REFUSED),
                 StorageError, "Cannot open the study storage", id="search storage refused"),
    pytest.param(lambda api: lrsearch.search(api.module, api.val(), run_dir=api.run, storage="not-a-url"),
                 StorageError, "Cannot tell what kind of storage", id="search storage of no known kind"),
    pytest.param(lambda api: lrsearch.search(api.module, api.val(), run_dir=api.run,
                                             storage=f"journal:{api.folder}"),
                 StorageError, "is a folder, not a file", id="search journal storage is a folder"),
    # a metric name the module never logs: the message lists the names it does log
    pytest.param(lambda api: lrsearch.compress(api.module, budget="1%", run_dir=api.run, datamodule=TinyData(),
                                               monitor="val_accuracy"),
                 LoggedMetricError, "never logs 'val_accuracy'", id="compress monitor a name never logged"),
    pytest.param(lambda api: _fit_with(api, lrsearch.RankSearch(budget="1%", run_dir=api.run, monitor="val_accuracy")),
                 LoggedMetricError, "never logs 'val_accuracy'", id="RankSearch monitor a name never logged"),
]


def _fit_with(api: Api, callback: Any) -> None:
    """A fit that trains nothing (the module stays as it is) and ends in the callback's on_fit_end."""
    trainer = pl.Trainer(limit_train_batches=0, max_epochs=1, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=api.folder / "trainer", callbacks=[callback])
    trainer.fit(api.module, datamodule=TinyData())


@pytest.mark.parametrize(("call", "error", "fragment"), API_CASES)
def test_api_bad_input(call: Callable[[Api], Any], error: type[Exception], fragment: str, tiny_checkpoint: Path,
                       tmp_path: Path) -> None:
    module = TinyClassifier()
    module.load_state_dict(torch.load(tiny_checkpoint, weights_only=True)["state_dict"])
    state = {key: value.clone() for key, value in module.state_dict().items()}
    before = _listing(tmp_path)
    with pytest.raises(error) as raised:
        call(Api(tmp_path, module))
    assert isinstance(raised.value, LrSearchError)
    assert fragment in str(raised.value), str(raised.value)
    assert _listing(tmp_path) == before, "the call wrote files"
    assert module.state_dict().keys() == state.keys()
    assert all(torch.equal(module.state_dict()[key], value) for key, value in state.items())


def _recipe(folder: Path) -> Path:
    return folder / "recipe.json"


def _weights(folder: Path) -> Path:
    return next(folder.glob("weights-*.pt"))


LOAD_CASES: dict[str, tuple[Callable[[Path], None], int, str]] = {
    # damage done to the saved folder, hidden size of the model it is loaded into, message fragment
    "folder missing": (shutil.rmtree, 64, "recipe.json is missing"),
    "recipe.json missing": (lambda d: _recipe(d).unlink(), 64, "recipe.json is missing"),
    "recipe.json truncated": (lambda d: _recipe(d).write_text(_recipe(d).read_text()[:40]), 64,
                              "corrupted or truncated"),
    "recipe.json not JSON": (lambda d: _recipe(d).write_bytes(b"\x00\xff\xfe"), 64, "corrupted or truncated"),
    "recipe.json of another format": (lambda d: _recipe(d).write_text(json.dumps({"format": "other"})), 64,
                                      "is not an lrsearch recipe"),
    "weights missing": (lambda d: _weights(d).unlink(), 64, "weights file"),
    "weights truncated": (lambda d: _weights(d).write_bytes(_weights(d).read_bytes()[:100]), 64,
                          "corrupted or truncated"),
    "another architecture": (lambda d: None, 32, "does not fit"),
}


@pytest.mark.parametrize("case", LOAD_CASES)
def test_load_bad_saved_model(case: str, tmp_path: Path) -> None:
    damage, hidden, fragment = LOAD_CASES[case]
    torch.manual_seed(0)
    folder = lrsearch.save(lrsearch.factorize(TinyClassifier(), 0.25, method="svd"), tmp_path / "saved")
    damage(folder)
    model = TinyClassifier(hidden=hidden)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    before = _listing(tmp_path)
    with pytest.raises(RecipeError) as raised:
        lrsearch.load(folder, model)
    assert fragment in str(raised.value), str(raised.value)
    assert _listing(tmp_path) == before
    assert not lrsearch.get_recipe(model)["layers"], "the model was restructured"
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())


# A candidate that raises or gives NaN: its trial fails, the study goes on. ---------------------

class _Broken(nn.Module):
    """A candidate whose forward raises, or whose logits are all NaN."""

    def __init__(self, inner: nn.Module, fault: str) -> None:
        super().__init__()
        self.inner, self.fault = inner, fault

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fault == "raises":
            raise RuntimeError("the candidate blew up")
        return self.inner(x) * math.nan


def _accuracy_propagating_nan(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(-1) == targets).float().mean() + outputs.sum() * 0


@pytest.mark.parametrize(("fault", "metric"), [
    pytest.param("raises", None, id="forward raises"),
    pytest.param("nan", None, id="NaN logits, default accuracy"),
    pytest.param("nan", _accuracy_propagating_nan, id="NaN logits, NaN metric"),
])
def test_a_broken_candidate_fails_its_trial_and_the_study_finishes(fault: str, metric: Any, trained,
                                                                    tmp_path: Path, monkeypatch) -> None:
    model, val = trained
    original = Decomposition.build
    built: list[nn.Module] = []

    def build(self: Decomposition, *args: Any, **kwargs: Any) -> nn.Module:
        candidate = original(self, *args, **kwargs)
        built.append(candidate)
        return _Broken(candidate, fault) if len(built) == 2 else candidate

    broken: list[int] = []

    def note_broken(_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if len(built) >= 2 and not broken:
            broken.append(trial.number)  # the trial during which the second candidate was built

    monkeypatch.setattr(Decomposition, "build", build)
    n_trials = 6
    result = lrsearch.search(model, val, budget="5%", objective="macs", n_trials=n_trials, metric=metric,
                             run_dir=str(tmp_path), callbacks=[note_broken])
    trials = optuna.load_study(study_name=result.study_name, storage=result.storage).get_trials()
    states = {t.number: t.state for t in trials}
    assert len([s for s in states.values() if s.is_finished()]) == n_trials
    assert TrialState.RUNNING not in states.values()
    assert broken and result.best is not None and result.best.trial != broken[0]
    assert all(t.state != TrialState.FAIL for t in trials if t.number != broken[0])
    failed = trials[broken[0]]
    if fault == "nan" and metric is None:  # NaN rows count as wrong: an infeasible candidate, not an error
        assert failed.user_attrs["feasible"] is False
    else:
        assert failed.state == TrialState.FAIL
    if metric is not None:
        assert failed.user_attrs["error"] == "the candidate's metric is not finite"
