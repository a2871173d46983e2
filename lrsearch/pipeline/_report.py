"""Run report: ``report.json`` for machines, ``report.html`` and the terminal summary for people.

The report is one plain dict, so it can be re-rendered later from ``report.json`` alone
(``lrsearch report RUN_DIR``). Both renderings, :func:`render_html` and :func:`render_text`,
read it through one typed structure, :class:`Report`, and share their sentences, so the page
and the summary cannot tell different stories. The page is self-contained: inline CSS, and the
figures of :mod:`lrsearch.study._figures` drawn by plotly.js, inlined once, so it opens offline
(from an archive or an e-mail attachment) and fetches nothing.

Schema (every key optional except those marked ``*``; drops and metrics are fractions,
``0.005`` is half an accuracy point, and every rendering shows them in points)::

    {
      "lrsearch_version": str, "created": ISO time str,
      "budget"*: "0.5%", "allowed_drop"*: float, "metric"*: "accuracy" (the name the user gave),
      "objective"*: "latency" | "macs" | "params",
      "meets_budget"*: bool,          # False when no candidate held after fine-tuning
      "message": str,                 # kept for machines; the renderings state the outcome themselves
      "warnings": [str],              # complete sentences, shown in the summary and on the page
      "device": "cpu", "threads": int, "batch_size": int,
      "dense": {"params": int, "macs": float, "latency_ms": float (measured),
                "predicted_latency_ms": float (the latency table's prediction),
                "search_metric": float, "verify_metric": float},
      "final": {"trial": int, "params": int, "macs": float,
                "latency_ms": float (measured), "predicted_latency_ms": float | None,
                "search_metric": float, "verify_metric": float,
                "search_drop": float, "verify_drop": float,
                "verify_drop_interval": [low, high] | None,  # 95 %, paired; accuracy only
                "ranks": {layer: int | [int, int] | "dense"},
                "full_ranks": {layer: int | [int, int]},
                "speedup": float, "predicted_speedup": float | None},
      "layer_order": [str],           # model order of the layers (report.json sorts dict keys,
                                      # so without it layers are listed alphabetically)
      "attempts": [{"trial": int, "ranks": {...}, "search_drop": float, "verify_drop": float,
                    "verify_drop_interval": [low, high] | None, "meets_budget": bool}],
      "trial_counts": {"complete": int, "pruned": int, "failed": int, "duplicates": int},
      "trials": [{"number": int, "cost": float, "drop": float, "feasible": bool}],
      "pareto": [int],                # trial numbers of SearchResult.pareto, cheapest first
      "paths": {"model": str, "checkpoint": str, "study": str, ...},
      "splits": {"search": str, "verify": str}
    }

``trials`` holds every complete search trial (cost in the objective's unit; latency in ms, as
the latency table predicts it) for the Pareto figure. ``trial_counts`` counts trials by how they
ended: ``pruned`` ones stopped early, certain to exceed the budget; ``duplicates`` (among the
complete and pruned ones) repeated an earlier configuration and reused its result. Without
``pareto``, the front is recomputed from ``trials`` by the same definition. A layer in
``full_ranks`` but not in ``ranks`` (or ranked ``"dense"``) stayed dense.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lrsearch._atomic import atomic_write_json, atomic_write_text
from lrsearch._errors import LrSearchError, format_problem
from lrsearch.pipeline._report_html import render_html
from lrsearch.pipeline._report_model import Report, undecided_warning
from lrsearch.pipeline._report_text import REPORT_HTML, REPORT_JSON, render_text

__all__ = ["REPORT_HTML", "REPORT_JSON", "Report", "ReportError", "load_report", "rebuild_report",
           "render_html", "render_text", "undecided_warning", "write_report"]

_REQUIRED = ("budget", "allowed_drop", "metric", "objective", "meets_budget")


class ReportError(LrSearchError, ValueError):
    """A report dict or a saved ``report.json`` is missing, corrupted or incomplete."""


def write_report(run_dir: str | os.PathLike[str], report: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``run_dir``; return their paths.

    Everything is rendered and serialized before the first byte is written, so a bad report
    (missing keys, a value JSON cannot hold) raises :class:`ReportError` and leaves no file.
    The page is rendered from the JSON round trip, so :func:`rebuild_report` reproduces it.
    """
    run_dir = Path(run_dir)
    _check(report, source="The report")
    json_path = run_dir / REPORT_JSON
    try:
        saved = json.loads(json.dumps(dict(report), sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ReportError(format_problem(
            f"The report cannot be saved as JSON ({json_path})", expected="only str, int, float, "
            "bool, None, lists and dicts with str keys", given=str(exc),
            hint="convert tensors and numpy scalars with .item() / float() first.")) from exc
    page = render_html(saved)
    atomic_write_json(json_path, saved)
    return json_path, atomic_write_text(run_dir / REPORT_HTML, page)


def load_report(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``report.json`` from ``run_dir``; raise :class:`ReportError` naming the file if unusable."""
    path = Path(run_dir) / REPORT_JSON
    if not path.is_file():
        raise ReportError(format_problem(f"No report at {path}",
                                         hint="pass the run directory that lrsearch wrote."))
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(format_problem(f"The report {path} is corrupted or truncated",
                                         given=str(exc))) from exc
    if not isinstance(report, dict):
        raise ReportError(format_problem(f"The report {path} is not a report", expected="a JSON object",
                                         given=type(report).__name__))
    _check(report, source=f"The report {path}")
    return report


def rebuild_report(run_dir: str | os.PathLike[str]) -> Path:
    """Re-render ``report.html`` from ``report.json``, e.g. after upgrading lrsearch."""
    return atomic_write_text(Path(run_dir) / REPORT_HTML, render_html(load_report(run_dir)))


def _check(report: Mapping[str, Any], *, source: str) -> None:
    missing = [key for key in _REQUIRED if key not in report]
    if missing:
        raise ReportError(format_problem(f"{source} lacks required keys", expected=", ".join(_REQUIRED),
                                         given=f"missing {', '.join(missing)}"))
    # A truthy non-bool ("false") would make the headline claim success.
    if not isinstance(report["meets_budget"], bool):
        raise ReportError(format_problem(f"{source} has a non-boolean meets_budget", expected="true or false",
                                         given=repr(report["meets_budget"])))
