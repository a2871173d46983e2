"""The callback path as a user sees it: one search bar, no warnings of lrsearch's own Optuna calls,
the budget read once, each candidate's fine-tune logged to the user's own logger under its trial,
and no fine-tune progress bar when the user's Trainer shows none.

One real ``Trainer.fit`` with ``RankSearch`` (tiny module, MACs objective), shared by the tests.
"""

from __future__ import annotations

import csv
import io
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from optuna.exceptions import ExperimentalWarning
from pytorch_lightning.loggers import CSVLogger

import lrsearch
from tests.cli._bars import search_bars
from tests.reliability._lit import TinyClassifier, TinyData

pytestmark = pytest.mark.slow


class Lines(logging.Handler):
    """lrsearch's lines as they are logged (under pytest they go to logging, not to stderr)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class BarProbe(pl.Callback):
    """Records whether each fit it joins shows a progress bar."""

    def __init__(self) -> None:
        self.shown: list[bool] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.shown.append(trainer.progress_bar_callback is not None)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("output")
    capture = pytest.MonkeyPatch()
    torch.manual_seed(0)
    logger = CSVLogger(root / "logs", name="fit")
    err, probe, lines = io.StringIO(), BarProbe(), Lines()
    own = logging.getLogger("lrsearch")
    level = own.level
    own.addHandler(lines)
    own.setLevel(logging.INFO)
    capture.setattr(sys, "stderr", err)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # 0.2 is a plain fraction above 0.1: parse_budget warns about it, once per parse.
            callback = lrsearch.RankSearch(0.2, run_dir=root / "lrs", search={"n_trials": 6, "objective": "macs"},
                                           finetune={"epochs": 1, "trainer": {"callbacks": [probe]}},
                                           max_finetunes=2)
            trainer = pl.Trainer(max_epochs=2, logger=logger, enable_progress_bar=False, enable_model_summary=False,
                                 enable_checkpointing=False, default_root_dir=root, accelerator="cpu",
                                 callbacks=[callback])
            trainer.fit(TinyClassifier(), datamodule=TinyData())
    finally:
        capture.undo()
        own.removeHandler(lines)
        own.setLevel(level)
    return {"callback": callback, "stderr": err.getvalue(), "warnings": caught, "logger": logger, "bars": probe.shown,
            "lines": lines.messages}


def test_one_search_bar_with_the_best_cost_and_its_unit(fitted) -> None:
    bars = search_bars(fitted["stderr"])
    assert len(bars) == 1 and bars[0][-1] == (6, 6), bars
    assert " MACs (trial " in fitted["stderr"]


def test_no_warning_from_lrsearchs_own_optuna_calls_and_the_budget_read_once(fitted) -> None:
    caught = fitted["warnings"]
    assert not [w for w in caught if issubclass(w.category, ExperimentalWarning)]
    assert not [w for w in caught if "optuna" in w.filename.replace("\\", "/").split("/")]
    assert len([w for w in caught if "budget 0.2 is a fraction" in str(w.message)]) == 1


def test_each_fine_tune_logs_to_the_trainers_logger_under_its_trial(fitted) -> None:
    result = fitted["callback"].result
    trials = {attempt["trial"] for attempt in result.report["attempts"]}
    assert trials
    metrics = Path(fitted["logger"].log_dir) / "metrics.csv"
    with metrics.open() as handle:
        columns = set(next(csv.reader(handle)))
    assert {f"trial{trial}/val_acc" for trial in trials} <= columns, columns
    assert "val_acc" in columns  # the user's own run is still there


def test_the_fine_tunes_show_no_progress_bar_when_the_users_trainer_shows_none(fitted) -> None:
    assert fitted["bars"] == [False] * len(fitted["callback"].result.report["attempts"]), fitted["bars"]
    assert fitted["bars"]


def test_the_run_ends_with_its_outcome_and_where_the_report_is(fitted) -> None:
    """The callback prints no summary, so its last line says how the run ended; before the verdict, what runs."""
    lines = fitted["lines"]
    result = fitted["callback"].result
    status = "MEETS THE BUDGET" if result.meets_budget else "DOES NOT MEET THE BUDGET"
    assert lines[-1].startswith(f"{status} 20%: "), lines[-1]
    assert lines[-1].endswith(f"The report: {result.paths['report_html']}"), lines[-1]
    if result.report["final"]:
        assert lines[-2].startswith(f"verifying trial {result.report['final']['trial']} on the test split"), lines


def test_the_dashboard_figures_are_redrawn_with_the_outcome(fitted) -> None:
    """After the selection the study's figures show every trial (the descent's too), the budget after
    fine-tuning beside the search's constraint, and the kept trial's ranks, not the search's cheapest."""
    import json

    import optuna
    from optuna.trial import TrialState

    from lrsearch.study._dashboard import PARETO_ID, RANKS_ID, dashboard_app
    from lrsearch.study._storage import open_storage
    from tests.study.test_dashboard import study_answer

    result = fitted["callback"].result
    storage = open_storage(result.search.storage, heartbeat_interval=None)
    answer = study_answer(dashboard_app(storage), storage, result.search.study_name)
    figures = {item["id"]: json.loads(item["graph_object"]) for item in answer["plotly_graph_objects"]}
    pareto = {trace["name"]: trace for trace in figures[PARETO_ID]["data"]}
    study = optuna.load_study(study_name=result.search.study_name, storage=storage)
    complete = {t.number for t in study.get_trials(states=(TrialState.COMPLETE,))}
    drawn = {n for name, trace in pareto.items() if "customdata" in trace and not name.startswith("kept")
             for n in trace["customdata"]}
    assert drawn == complete
    assert any(name.startswith("budget 20% after fine-tuning") for name in pareto), list(pareto)
    assert any(name.startswith("search constraint ") for name in pareto), list(pareto)
    assert study.user_attrs["lrsearch:outcome"].startswith("MEETS THE BUDGET 20%" if result.meets_budget
                                                           else "DOES NOT MEET THE BUDGET 20%")
    assert study.user_attrs["lrsearch:kept_trial"] == (result.candidate.trial if result.meets_budget else None)
    ranks_title = figures[RANKS_ID]["layout"]["title"]["text"]
    if result.meets_budget:
        assert pareto[f"kept (trial {result.candidate.trial})"]["customdata"] == [result.candidate.trial]
        assert ranks_title.startswith(f"Ranks of trial {result.candidate.trial}") and "kept" in ranks_title
    else:
        assert "before fine-tuning" in ranks_title


def test_a_run_without_progress_shows_no_fine_tune_bar(tmp_path: Path) -> None:
    """``progress=False`` (``--progress false``: a log file, CI) reaches the fine-tunes' Trainers too."""
    probe = BarProbe()
    torch.manual_seed(0)
    lrsearch.compress(TinyClassifier(), budget=0.2, run_dir=tmp_path / "run", datamodule=TinyData(), progress=False,
                      search={"n_trials": 4, "objective": "macs"}, max_finetunes=1,
                      finetune={"epochs": 1, "accelerator": "cpu", "trainer": {"callbacks": [probe]}})
    assert probe.shown == [False]
