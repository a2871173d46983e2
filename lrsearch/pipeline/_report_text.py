"""The terminal summary of a run (what ``lrsearch tune`` prints), from the typed report."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lrsearch.pipeline._report_model import (
    MISSING,
    ModelFigures,
    Report,
    drop_note,
    interval_text,
    ms,
    percent,
    plain,
    points,
    rank_text,
    ratio,
    times,
)

__all__ = ["outcome_line", "render_text"]

PROG = "lrsearch"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"


def outcome_line(report: Mapping[str, Any]) -> str:
    """The run's outcome in one line: whether the budget held on the test split, and by how much."""
    r = Report.from_dict(report)
    return f"{'MEETS THE BUDGET' if r.meets_budget else 'DOES NOT MEET THE BUDGET'} {r.budget}: {r.headline()}"


def render_text(report: Mapping[str, Any], *, run_dir: str | os.PathLike[str] | None = None) -> str:
    """The terminal summary of a run: outcome, warnings, trials, before/after table, ranks, files.

    ``run_dir`` adds the report files written there and how to open the dashboard.
    """
    r = Report.from_dict(report)
    dense, final = r.dense or ModelFigures(), r.final
    figures = final.figures if final else ModelFigures()
    lines = [outcome_line(report)]
    lines += [f"WARNING: {warning}" for warning in r.warnings]
    lines += ["", *([f"  {r.search_sentence()}", ""] if r.search_sentence() else [])]
    verify_note = f"allowed drop {points(r.allowed_drop)}"
    if final:
        attempt = final.attempt
        interval = (f" [95 % interval of the drop: {interval_text(attempt.interval).removesuffix(' points')}]"
                    if attempt.interval else "")
        verify_note = f"{drop_note(attempt.verify_drop)}{interval} (allowed {points(r.allowed_drop)})"
    batch = f"batch {plain(r.batch_size)}" + (f", {r.threads} thread{'s' if r.threads != 1 else ''}"
                                               if r.threads else "")
    rows = [
        ("", "original", "compressed", ""),
        (r.on(r.verify_split or "verify"), percent(dense.verify_metric), percent(figures.verify_metric), verify_note),
        (r.on(r.select_split or "select"), percent(dense.select_metric), percent(figures.select_metric),
         "compressed after fine-tuning"),
        (r.on(r.search_split or "search"), percent(dense.search_metric), percent(figures.search_metric),
         "compressed before fine-tuning"),
        ("parameters", _count(dense.params), _count(figures.params), ratio(dense.params, figures.params, "fewer")),
        ("MACs per sample", _count(dense.macs), _count(figures.macs), ratio(dense.macs, figures.macs, "fewer")),
        (f"latency ({batch}, measured)", ms(dense.latency_ms), ms(figures.latency_ms),
         times(final.speedup, "faster") if final and final.speedup else ""),
        ("latency (predicted by the latency table)", ms(dense.predicted_latency_ms),
         ms(figures.predicted_latency_ms),
         times(final.predicted_speedup, "faster") if final and final.predicted_speedup else ""),
    ]
    if dense.predicted_latency_ms is None and figures.predicted_latency_ms is None:
        rows.pop()  # no latency table (objective macs or params)
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines += [f"  {a.ljust(widths[0])}  {b.rjust(widths[1])}  {c.rjust(widths[2])}  {d}".rstrip()
              for a, b, c, d in rows]
    if final and final.attempt.ranks:
        lines += ["", f"  ranks (trial {plain(final.attempt.trial)}): " + ", ".join(
            f"{name} {rank_text(final.attempt.ranks[name])}/{rank_text(final.full_ranks.get(name, '?'))}"
            for name in r.layers if name in final.attempt.ranks)]
    if r.attempts and not r.meets_budget:
        lines += ["", "  tried after fine-tuning: " + "; ".join(
            f"trial {plain(a.trial)} {drop_note(a.verify_drop)}" for a in r.attempts),
            "  HINT: widen --budget, search more (--search.n_trials), fine-tune longer "
            "(--finetune.epochs), or set a looser --search_budget."]
    lines += ["", "Files", *_files(r, run_dir)]
    return "\n".join(lines)


def _count(value: float | None) -> str:
    return MISSING if value is None else f"{value:,.0f}"


def _files(r: Report, run_dir: str | os.PathLike[str] | None) -> list[str]:
    entries = [(label, r.paths[key]) for key, label in (("model", "compressed model (lrsearch.load)"),
                                                        ("checkpoint", "checkpoint (Model.load_from_checkpoint)"))
               if key in r.paths]
    if run_dir is not None:
        entries += [("report", str(Path(run_dir) / REPORT_HTML)), ("report data", str(Path(run_dir) / REPORT_JSON))]
    if "study" in r.paths:
        entries.append(("study", r.paths["study"]))
    width = max((len(label) for label, _ in entries), default=0)
    lines = [f"  {label:<{width}}  {where}" for label, where in entries]
    if "study" in r.paths and run_dir is not None:
        lines.append(f"  (view the study: {PROG} dashboard {run_dir})")
    return lines
