"""``report.html``: the whole report as one self-contained page, from the typed report.

Inline CSS; the figures of :mod:`lrsearch.study._figures` drawn by plotly.js, inlined once, so
the page opens offline and fetches nothing. Without plotly installed it says so instead.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lrsearch.pipeline._report_model import (
    MISSING,
    ModelFigures,
    Report,
    change,
    drop_cell,
    interval_text,
    ms,
    percent,
    plain,
    rank_text,
    ranks_text,
    times,
)
from lrsearch.study._figures import cost_axis, stopped_note

if TYPE_CHECKING:
    import plotly.graph_objects as go

__all__ = ["render_html"]

PROG = "lrsearch"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;
max-width:64rem;padding:0 1rem;color:#222;line-height:1.45}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
.headline{padding:1rem 1.2rem;border-radius:6px;margin:1rem 0;border-left:6px solid}
.headline strong{font-size:1.3rem;display:block}
.ok{background:#eaf7ee;border-color:#2e7d32}.bad{background:#fdecea;border-color:#c62828}
.warnings{background:#fff8e1;border-left:6px solid #f9a825;padding:.6rem 1.2rem;border-radius:6px}
table{border-collapse:collapse;margin:.5rem 0;font-size:.92rem}
th,td{border:1px solid #ddd;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f5f5f5}
.compare td:not(:first-child){text-align:right;font-variant-numeric:tabular-nums}
.over{color:#c62828;font-weight:600}.note{color:#666;font-style:italic}
code{font-size:.85rem;word-break:break-all}.muted{color:#666;font-size:.9rem}
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], *, css: str = "") -> str:
    """Rows arrive already escaped/formatted; head cells are escaped here."""
    cls = f' class="{css}"' if css else ""
    parts = [f"<table{cls}><thead><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr></thead><tbody>"]
    parts += ["<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows]
    return "".join(parts) + "</tbody></table>"


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _flagged(drop: float | None, allowed: float | None) -> str:
    """A drop cell, red when it exceeds the allowed drop."""
    text = _e(drop_cell(drop))
    over = drop is not None and allowed is not None and drop > allowed
    return f'<span class="over">{text}</span>' if over else text


def render_html(report: Mapping[str, Any]) -> str:
    """The whole report page as one self-contained HTML string (plotly.js inlined once, if installed)."""
    r = Report.from_dict(report)
    status = "budget met" if r.meets_budget else "budget NOT met"
    figures = _Figures()
    body = [
        f"<h1>lrsearch report: {_e(status)}</h1>", _headline(r),
        "<h2>Before and after</h2>", _comparison(r),
        "<h2>Search: cost against accuracy drop</h2>", _search_section(r, figures),
        "<h2>Chosen rank per layer</h2>", _ranks_section(r, figures),
        "<h2>Fine-tune attempts</h2>", _attempts_section(r),
        "<h2>Run</h2>", _table(["Setting", "Value"], [(_e(k), _e(v)) for k, v in r.settings]),
        "<h2>Files</h2>", _paths_section(r),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>lrsearch report: {_e(status)}</title><style>{_CSS}</style></head>"
            "<body>\n" + figures.library() + "\n".join(body) + "\n</body></html>\n")


def _headline(r: Report) -> str:
    css, title = ("ok", "Budget met") if r.meets_budget else ("bad", "Budget NOT met")
    detail = r.headline()
    if r.final and r.final.attempt.interval and r.meets_budget:
        detail += f" The drop's 95 % interval is {interval_text(r.final.attempt.interval)}."
    if r.final and r.final.speedup and r.meets_budget:
        detail += f" Measured speedup: {times(r.final.speedup)}."
    if r.final and not r.meets_budget:
        detail += f" The configuration shown below {change(r.final.attempt.verify_drop)}."
    warnings = "".join(f"<li>{_e(w)}</li>" for w in r.warnings)
    box = f'<div class="warnings"><strong>Warnings</strong><ul>{warnings}</ul></div>' if warnings else ""
    return f'<div class="headline {css}"><strong>{title}</strong><p>{_e(detail)}</p></div>{box}'


def _comparison(r: Report) -> str:
    if r.dense is None and r.final is None:
        return _note("This report holds no measurements of the dense or the final model.")
    dense, final = r.dense or ModelFigures(), r.final
    figures = final.figures if final else ModelFigures()
    attempt = final.attempt if final else None
    budget = _e(f"budget {r.budget}")
    interval = interval_text(attempt.interval) if attempt else ""
    rows = [
        (r.on(r.search_split or "search"), percent(dense.search_metric), percent(figures.search_metric),
         "compressed before fine-tuning"),
        (r.on(r.select_split or "select"), percent(dense.select_metric), percent(figures.select_metric),
         "compressed after fine-tuning"),
        (r.on(r.verify_split or "verify"), percent(dense.verify_metric), percent(figures.verify_metric), ""),
        ("Parameters", _si(dense.params), _si(figures.params), _share(figures.params, dense.params)),
        ("MACs per sample", _si(dense.macs), _si(figures.macs), _share(figures.macs, dense.macs)),
        ("Latency (measured)", ms(dense.latency_ms), ms(figures.latency_ms),
         _share(figures.latency_ms, dense.latency_ms)),
        ("Speedup (measured)", times(1.0) if r.dense else MISSING, times(final.speedup if final else None), ""),
        ("Latency (predicted by the latency table)", ms(dense.predicted_latency_ms),
         ms(figures.predicted_latency_ms), "the search's cost"),
        ("Speedup (predicted)", times(1.0) if dense.predicted_latency_ms else MISSING,
         times(final.predicted_speedup if final else None), ""),
    ]
    cells = [tuple(_e(cell) for cell in row) for row in rows]
    constraint, constraint_drop = r.constraint()
    cells[2:2] = [  # the drops, each flagged when over what it is held to
        ("Drop on the search split, before fine-tuning", MISSING,
         _flagged(attempt.search_drop if attempt else None, constraint_drop), _e(f"the search's constraint {constraint}")),
        ("Drop on the verify split", MISSING, _flagged(attempt.verify_drop if attempt else None, r.allowed_drop),
         budget + (_e(f"; 95 % interval {interval}") if interval else ""))]
    head = f"Final (trial {attempt.trial})" if attempt and attempt.trial is not None else "Final"
    if not r.meets_budget:
        head += ", not within budget"
    return _table(["", "Dense", head, "Note"], cells, css="compare")


def _si(value: float | None) -> str:
    if value is None:
        return MISSING
    for scale, suffix in ((1e12, " T"), (1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:g}"


def _share(final: float | None, dense: float | None) -> str:
    return MISSING if final is None or not dense else f"{final / dense * 100:.1f}% of dense"


class _Figures:
    """Figures as HTML divs; plotly.js goes into the page once, and only if a figure was drawn."""

    def __init__(self) -> None:
        self.drawn = 0

    def div(self, build: Callable[[], go.Figure], *, name: str) -> str:
        try:
            import plotly.io as pio
        except ImportError:
            return _note(f"Plots need plotly (pip install plotly); rerun `{PROG} report RUN_DIR` after installing it.")
        self.drawn += 1
        return pio.to_html(build(), full_html=False, include_plotlyjs=False, div_id=f"lrsearch-{name}",
                           config={"displaylogo": False, "responsive": True})

    def library(self) -> str:
        if not self.drawn:
            return ""
        from plotly.offline import get_plotlyjs

        return f"<script>{get_plotlyjs()}</script>\n"


def _search_section(r: Report, figures: _Figures) -> str:
    sentence = f"<p>{_e(r.search_sentence())}</p>" if r.search_sentence() else ""
    if not r.trials:
        return sentence + _note("No complete search trials were recorded, so there is no Pareto plot.")
    title, _ = cost_axis(r.objective)
    feasible = sum(1 for t in r.trials if t.feasible)
    constraint, _ = r.constraint()
    caption = (f"Drawn: {len(r.trials)} complete trials, {feasible} within the search's constraint {constraint} on "
               f"the search split, before fine-tuning; the green line is their front. The budget {r.budget} is what "
               f"a fine-tuned candidate must hold on the selection and test splits. Cost: {title}")
    caption += ", the latency table's prediction for trials and dense model alike." if r.objective == "latency" else "."
    if r.counts and r.counts.pruned:
        caption += f" {stopped_note(r.counts.pruned)}."
    if r.unplotted:
        caption += f" Not shown (no finite cost or drop): {r.unplotted}."
    return sentence + figures.div(r.pareto_figure, name="pareto") + f'<p class="muted">{_e(caption)}</p>'


def _ranks_section(r: Report, figures: _Figures) -> str:
    if r.final is None or not r.layers:
        return _note("No per-layer ranks were recorded.")
    ranks, full = r.final.attempt.ranks, r.final.full_ranks
    table = _table(["Layer", "Chosen rank", "Full rank"],
                   [(_e(name), _e(rank_text(ranks.get(name, "dense"))), _e(rank_text(full.get(name, MISSING))))
                    for name in r.layers])
    return figures.div(r.ranks_figure, name="ranks") + f"<details><summary>Ranks as numbers</summary>{table}</details>"


def _attempts_section(r: Report) -> str:
    if not r.attempts:
        return _note("No fine-tune attempts were recorded.")
    families = {"uniform": "uniform-rank ladder", "descent": "descent from the ladder's winner",
                "front": "search's front"}
    starts = {"svd": "plain SVD", "search": "the search's factors"}
    rows = [(str(index + 1), _e(plain(a.trial)), _e(families.get(a.family or "", MISSING)),
             _flagged(a.search_drop, r.constraint()[1]),
             _e(f"{starts.get(a.start or '', a.start or MISSING)}"
                + (f", {drop_cell(a.start_drop)}" if a.start_drop is not None else "")),
             _flagged(a.verify_drop, r.allowed_drop), _e(interval_text(a.interval) or MISSING),
             {True: "yes", False: "no"}.get(a.meets_budget, MISSING),
             f"<code>{_e(ranks_text(a.ranks, r.layers))}</code>")
            for index, a in enumerate(r.attempts)]
    return _table(["#", "Trial", "From", "Drop (search, before fine-tuning)", "Fine-tune started from",
                   "Drop (selection split)",
                   "95 % interval (selection split)", "Held", "Ranks"], rows)


def _paths_section(r: Report) -> str:
    if not r.paths:
        return _note("No file paths were recorded.")
    return _table(["What", "Path"], [(_e(k), f"<code>{_e(v)}</code>") for k, v in r.paths.items()])
