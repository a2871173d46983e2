"""The run folder: where a run of lrsearch puts each of its files, known here only.

::

    RUN_DIR/
      search/                 the search (SearchConfig.run_dir): study.db, latency-table.json,
                              search-result.json
      finetune-trial12/       the fine-tune of trial 12's candidate (Lightning's root_dir)
      model/                  the compressed model, lrsearch.save format
      compressed.ckpt         the same, for Model.load_from_checkpoint
      report.json, report.html

A run folder can also be found again from a storage URL or a study file
(``lrsearch dashboard RUN_DIR``): :func:`storage_of`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lrsearch.pipeline._report import REPORT_HTML, REPORT_JSON, load_report
from lrsearch.study._config import STUDY_FILE
from lrsearch.study._storage import JOURNAL_SUFFIXES, StorageError, sqlite_url
from lrsearch.study._study import TABLE_FILE

__all__ = ["DEFAULT_RUN_DIR", "RunLayout", "storage_of"]

DEFAULT_RUN_DIR = "lrsearch-runs/tune"
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder."""

    root: Path

    @classmethod
    def of(cls, run_dir: str | os.PathLike[str] | None) -> RunLayout:
        return cls(Path(DEFAULT_RUN_DIR if run_dir is None else run_dir))

    @property
    def search(self) -> Path:
        return self.root / "search"

    @property
    def study(self) -> Path:
        return self.search / STUDY_FILE

    @property
    def latency_table(self) -> Path:
        return self.search / TABLE_FILE

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def checkpoint(self) -> Path:
        return self.root / "compressed.ckpt"

    @property
    def report_json(self) -> Path:
        return self.root / REPORT_JSON

    @property
    def report_html(self) -> Path:
        return self.root / REPORT_HTML

    def finetune(self, trial: int) -> Path:
        return self.root / f"finetune-trial{trial}"


def storage_of(target: str) -> str:
    """A storage URL from a run folder, a study file or a URL (a run folder's report names its study)."""
    if "://" in target or target.startswith("journal:"):
        return target
    path = Path(target)
    if path.is_dir():
        layout = RunLayout(path)
        study = load_report(path).get("paths", {}).get("study") if layout.report_json.is_file() else None
        if study:
            return str(study)
        for candidate in (layout.study, path / STUDY_FILE):
            if candidate.is_file():
                return sqlite_url(candidate)
        raise StorageError(f"no study in {path}: expected {layout.study} (a run of lrsearch tune) "
                           f"or {path / STUDY_FILE}.")
    if path.is_file():
        if path.name.endswith(JOURNAL_SUFFIXES):
            return f"journal:{path}"
        if path.suffix in SQLITE_SUFFIXES:
            return sqlite_url(path)
        raise StorageError(f"cannot tell what kind of study file {path} is: expected .db (SQLite) or .log (journal).")
    raise StorageError(f"{target} is neither a run folder, a study file nor a storage URL.")
