"""Run report: ``report.json`` for machines and ``report.html`` for people.

The report is written from one plain dict, so it needs neither Optuna nor Lightning and can be
re-rendered later from ``report.json`` alone (``lrsearch report RUN_DIR``). The HTML page is
self-contained (inline CSS, plots as inline base64 PNG), so it opens offline, from an archive
or an e-mail attachment. Plots are drawn with ``matplotlib.figure.Figure`` on an explicit Agg
canvas, never through ``pyplot``, so writing a report changes no global backend state.

Schema (every key optional except those marked ``*``; drops and metrics are fractions,
``0.005`` is half an accuracy point)::

    {
      "lrsearch_version": str, "created": ISO time str,
      "budget"*: "0.5%", "allowed_drop"*: float, "metric"*: "accuracy",
      "objective"*: "latency" | "macs" | "params",
      "meets_budget"*: bool,          # False when no candidate held after fine-tuning
      "message": str,                 # plain statement of the outcome
      "device": "cpu", "threads": int, "batch_size": int,
      "dense": {"params": int, "macs": float, "latency_ms": float,
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
      "trials": [{"number": int, "cost": float, "drop": float, "feasible": bool}],
      "paths": {"model": str, "checkpoint": str, "study": str, ...},
      "splits": {"search": str, "verify": str}
    }

``trials`` holds every finished search trial (cost in the objective's unit) for the Pareto
plot. A layer in ``full_ranks`` but not in ``ranks`` (or ranked ``"dense"``) stayed dense.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrsearch._atomic import atomic_write_json, atomic_write_text
from lrsearch._errors import LrSearchError, format_problem

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["REPORT_HTML", "REPORT_JSON", "ReportError", "load_report", "rebuild_report",
           "render_html", "write_report"]

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"

_REQUIRED = ("budget", "allowed_drop", "metric", "objective", "meets_budget")
_COST_LABELS = {"latency": "latency (ms)", "macs": "MACs", "params": "parameters"}
_MISSING = "—"
_FEASIBLE, _INFEASIBLE, _FINAL, _DENSE_COLOR = "#1f77b4", "#d62728", "#ff9f1c", "#9e9e9e"


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


# --------------------------------------------------------------------------- formatting

def _e(value: object) -> str:
    return html.escape(str(value))


def _number(value: object) -> float | None:
    """A finite float, or None for anything missing, non-numeric or NaN (shown as a dash)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _metric(value: object) -> str:
    number = _number(value)
    return _MISSING if number is None else f"{number * 100:.2f}%"


def _points(value: object) -> str:
    number = _number(value)
    return _MISSING if number is None else f"{number * 100:.2f} pts"


def _si(value: object) -> str:
    number = _number(value)
    if number is None:
        return _MISSING
    for scale, suffix in ((1e12, " T"), (1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(number) >= scale:
            return f"{number / scale:.3g}{suffix}"
    return f"{number:g}"


def _ms(value: object) -> str:
    number = _number(value)
    if number is None:
        return _MISSING
    return f"{number:.2f} ms" if abs(number) >= 0.1 else f"{number:.3g} ms"


def _times(value: object) -> str:
    number = _number(value)
    return _MISSING if number is None else f"{number:.2f}×"


def _ratio(final: object, dense: object) -> str:
    a, b = _number(final), _number(dense)
    return _MISSING if a is None or not b else f"{a / b * 100:.1f}% of dense"


def _rank_text(value: object) -> str:
    return "(" + ", ".join(map(str, value)) + ")" if isinstance(value, (list, tuple)) else str(value)


def _ranks_text(ranks: object, order: object) -> str:
    if not isinstance(ranks, Mapping) or not ranks:
        return _MISSING
    return ", ".join(f"{name}={_rank_text(ranks[name])}" for name in _layer_names(ranks, {}, order))


def _drop(value: object, allowed: object) -> str:
    """A drop in points, flagged red when it exceeds the allowed drop."""
    text, number, limit = _points(value), _number(value), _number(allowed)
    over = number is not None and limit is not None and number > limit
    return f'<span class="over">{text}</span>' if over else text


def _interval(value: object) -> str:
    """``"-0.20 to 0.90 pts"`` for a 95 % drop interval; empty when the metric has none."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return ""
    low, high = (_number(bound) for bound in value)
    return "" if low is None or high is None else f"{low * 100:.2f} to {high * 100:.2f} pts"


def _section(report: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = report.get(key)
    return value if isinstance(value, Mapping) else {}


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], *, css: str = "") -> str:
    """Rows arrive already escaped/formatted; head cells are escaped here."""
    cls = f' class="{css}"' if css else ""
    parts = [f"<table{cls}><thead><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr></thead><tbody>"]
    parts += ["<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows]
    return "".join(parts) + "</tbody></table>"


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


# --------------------------------------------------------------------------- page

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;
max-width:64rem;padding:0 1rem;color:#222;line-height:1.45}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
.headline{padding:1rem 1.2rem;border-radius:6px;margin:1rem 0;border-left:6px solid}
.headline strong{font-size:1.3rem;display:block}
.ok{background:#eaf7ee;border-color:#2e7d32}.bad{background:#fdecea;border-color:#c62828}
table{border-collapse:collapse;margin:.5rem 0;font-size:.92rem}
th,td{border:1px solid #ddd;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f5f5f5}
.compare td:not(:first-child){text-align:right;font-variant-numeric:tabular-nums}
.over{color:#c62828;font-weight:600}.note{color:#666;font-style:italic}
code{font-size:.85rem;word-break:break-all}img{max-width:100%;height:auto}
.muted{color:#666;font-size:.9rem}
"""


def render_html(report: Mapping[str, Any]) -> str:
    """The whole report page as one self-contained HTML string."""
    met = report["meets_budget"] is True
    status = "budget met" if met else "budget NOT met"
    body = [
        f"<h1>lrsearch report: {_e(status)}</h1>",
        _headline(report, met),
        "<h2>Before and after</h2>", _comparison(report),
        "<h2>Search: cost vs accuracy drop</h2>", _pareto_section(report),
        "<h2>Chosen rank per layer</h2>", _ranks_section(report),
        "<h2>Fine-tune attempts</h2>", _attempts_section(report),
        "<h2>Run</h2>", _run_section(report),
        "<h2>Files</h2>", _paths_section(report),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>lrsearch report: {_e(status)}</title><style>{_CSS}</style></head>"
            "<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _headline(report: Mapping[str, Any], met: bool) -> str:
    final, splits = _section(report, "final"), _section(report, "splits")
    verify = _e(splits.get("verify", "held-out data"))
    budget = _e(report["budget"])
    allowed = _points(report["allowed_drop"])
    if met:
        title = "Budget met"
        interval = _interval(final.get("verify_drop_interval"))
        detail = (f"The compressed model loses {_points(final.get('verify_drop'))} of "
                  f"{_e(report['metric'])} on the verify split ({verify})"
                  + (f" (95 % interval {interval})" if interval else "")
                  + f"; the budget is {budget} (at most {allowed}). "
                  f"Measured speedup: {_times(final.get('speedup'))}.")
    else:
        title = "Budget NOT met"
        detail = (f"No compressed configuration stayed within the budget of {budget} "
                  f"(at most {allowed} of {_e(report['metric'])}) after fine-tuning.")
        if final:
            detail += (f" The configuration shown below loses {_points(final.get('verify_drop'))} on "
                       f"the verify split ({verify}).")
    message = report.get("message")
    extra = f"<p>{_e(message)}</p>" if message else ""
    css = "ok" if met else "bad"
    return f'<div class="headline {css}"><strong>{title}</strong><p>{detail}</p>{extra}</div>'


def _comparison(report: Mapping[str, Any]) -> str:
    dense, final = _section(report, "dense"), _section(report, "final")
    if not dense and not final:
        return _note("This report holds no measurements of the dense or the final model.")
    splits, metric = _section(report, "splits"), str(report["metric"])
    metric = metric[:1].upper() + metric[1:]
    search = f" ({splits['search']})" if "search" in splits else ""
    verify = f" ({splits['verify']})" if "verify" in splits else ""
    allowed = report["allowed_drop"]
    rows = [
        (f"{metric} on the search split{search}", _metric(dense.get("search_metric")),
         _metric(final.get("search_metric")), ""),
        (f"{metric} on the verify split{verify}", _metric(dense.get("verify_metric")),
         _metric(final.get("verify_metric")), ""),
        ("Drop on the search split", _MISSING, _drop(final.get("search_drop"), allowed), f"budget {report['budget']}"),
        ("Drop on the verify split", _MISSING, _drop(final.get("verify_drop"), allowed),
         f"budget {report['budget']}" + (f"; 95 % interval {interval}"
                                         if (interval := _interval(final.get("verify_drop_interval"))) else "")),
        ("Parameters", _si(dense.get("params")), _si(final.get("params")),
         _ratio(final.get("params"), dense.get("params"))),
        ("MACs", _si(dense.get("macs")), _si(final.get("macs")), _ratio(final.get("macs"), dense.get("macs"))),
        ("Latency (measured)", _ms(dense.get("latency_ms")), _ms(final.get("latency_ms")),
         _ratio(final.get("latency_ms"), dense.get("latency_ms"))),
        ("Speedup (measured)", _times(1.0) if dense else _MISSING, _times(final.get("speedup")), ""),
        ("Latency (predicted by the latency table)", _MISSING, _ms(final.get("predicted_latency_ms")), ""),
        ("Speedup (predicted)", _MISSING, _times(final.get("predicted_speedup")), ""),
    ]
    final_head = f"Final (trial {final['trial']})" if "trial" in final else "Final"
    if report["meets_budget"] is not True:
        final_head += ", not within budget"
    return _table(["", "Dense", final_head, "Note"],
                  [(_e(label), a, b, _e(note)) for label, a, b, note in rows], css="compare")


def _pareto_section(report: Mapping[str, Any]) -> str:
    trials = report.get("trials")
    trials = trials if isinstance(trials, list) else []
    points = []
    for trial in trials:
        cost = _number(trial.get("cost")) if isinstance(trial, Mapping) else None
        drop = _number(trial.get("drop")) if isinstance(trial, Mapping) else None
        if cost is not None and drop is not None:
            points.append((cost, drop, trial))
    if not points:
        return _note("No finished search trials were recorded, so there is no Pareto plot.")
    feasible = sum(1 for _, _, t in points if t.get("feasible") is True)
    caption = (f"{len(points)} finished trials, {feasible} within the budget on the search split. "
               f"Cost is the objective ({report['objective']}); the dashed line is the budget.")
    if len(points) < len(trials):
        caption += f" Not shown (no finite cost or drop): {len(trials) - len(points)}."
    image = _image(lambda: _pareto_figure(report, points), alt="Pareto plot of the search trials")
    return image + f'<p class="muted">{_e(caption)}</p>'


def _ranks_section(report: Mapping[str, Any]) -> str:
    final = _section(report, "final")
    ranks, full = _section(final, "ranks"), _section(final, "full_ranks")
    rows = list(_rank_rows(ranks, full, report.get("layer_order")))
    if not rows:
        return _note("No per-layer ranks were recorded.")
    table = _table(["Layer", "Chosen rank", "Full rank"],
                   [(_e(name), _e(_rank_text(ranks.get(name, "dense"))), _e(_rank_text(full.get(name, _MISSING))))
                    for name in _layer_names(ranks, full, report.get("layer_order"))])
    image = _image(lambda: _ranks_figure(rows), alt="Chosen rank per layer as a share of its full rank")
    return image + f"<details><summary>Ranks as numbers</summary>{table}</details>"


def _attempts_section(report: Mapping[str, Any]) -> str:
    attempts = report.get("attempts")
    if not isinstance(attempts, list) or not attempts:
        return _note("No fine-tune attempts were recorded.")
    rows = []
    for index, attempt in enumerate(a for a in attempts if isinstance(a, Mapping)):
        within = {True: "yes", False: "no"}.get(attempt.get("meets_budget"), _MISSING)
        ranks = _ranks_text(attempt.get("ranks"), report.get("layer_order"))
        rows.append((str(index + 1), _e(attempt.get("trial", _MISSING)),
                     _drop(attempt.get("search_drop"), report["allowed_drop"]),
                     _drop(attempt.get("verify_drop"), report["allowed_drop"]),
                     _interval(attempt.get("verify_drop_interval")) or _MISSING, within, f"<code>{_e(ranks)}</code>"))
    return _table(["#", "Trial", "Drop (search)", "Drop (verify)", "95 % interval (verify)", "Within budget",
                   "Ranks"], rows)


def _run_section(report: Mapping[str, Any]) -> str:
    splits = _section(report, "splits")
    items = [("Budget", f"{report['budget']} (allowed drop {_points(report['allowed_drop'])})"),
             ("Metric", report["metric"]), ("Objective", report["objective"]),
             ("Search split", splits.get("search")), ("Verify split", splits.get("verify")),
             ("Device", report.get("device")), ("Threads", report.get("threads")),
             ("Batch size", report.get("batch_size")), ("Created", report.get("created")),
             ("lrsearch version", report.get("lrsearch_version"))]
    return _table(["Setting", "Value"], [(_e(k), _e(v)) for k, v in items if v is not None])


def _paths_section(report: Mapping[str, Any]) -> str:
    paths = _section(report, "paths")
    if not paths:
        return _note("No file paths were recorded.")
    return _table(["What", "Path"], [(_e(k), f"<code>{_e(v)}</code>") for k, v in paths.items()])


# --------------------------------------------------------------------------- plots

def _image(draw: Callable[[], Figure], *, alt: str) -> str:
    """Render ``draw()``'s figure as an inline PNG; a note instead if matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        return _note("Plots need matplotlib (pip install matplotlib); rerun `lrsearch report` after installing it.")
    figure: Figure = draw()
    FigureCanvasAgg(figure)  # binds an Agg canvas to this figure only; pyplot's backend is untouched
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _pareto_figure(report: Mapping[str, Any],
                   points: Sequence[tuple[float, float, Mapping[str, Any]]]) -> Figure:
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    figure = Figure(figsize=(7.5, 4.4), layout="constrained")
    ax = figure.add_subplot()
    for flag, color, marker, label in ((True, _FEASIBLE, "o", "within budget"),
                                       (False, _INFEASIBLE, "x", "over budget")):
        chosen = [(x, y * 100) for x, y, t in points if (t.get("feasible") is True) == flag]
        if chosen:
            ax.scatter(*zip(*chosen), c=color, marker=marker, s=28, alpha=0.75, label=label, zorder=2)
    front, best = [], math.inf
    for x, y, _ in sorted(points, key=lambda p: (p[0], p[1])):
        if y < best:
            front.append((x, y * 100))
            best = y
    ax.step(*zip(*front), where="post", color="#555", lw=1, alpha=0.6, label="Pareto front", zorder=1)
    allowed = _number(report["allowed_drop"])
    if allowed is not None:
        ax.axhline(allowed * 100, color="#333", ls="--", lw=1.2, label=f"budget {report['budget']}")
    final_trial = _section(report, "final").get("trial")
    final = [(x, y * 100) for x, y, t in points if final_trial is not None and t.get("number") == final_trial]
    if final:
        ax.scatter(*zip(*final), marker="*", s=260, c=_FINAL, edgecolors="black", linewidths=0.8,
                   label=f"final (trial {final_trial})", zorder=3)
    objective = str(report["objective"])
    if objective in ("macs", "params"):
        ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_xlabel(f"cost: {_COST_LABELS.get(objective, objective)}")
    ax.set_ylabel(f"{report['metric']} drop on the search split (points)")
    ax.grid(alpha=0.3)
    figure.legend(loc="outside upper center", ncol=3, fontsize=8, frameon=False)  # never hides a point
    return figure


_RankRow = tuple[str, int | None, int | None, bool]  # label, chosen, full, stayed dense


def _layer_names(ranks: Mapping[str, Any], full: Mapping[str, Any], order: object) -> list[str]:
    """Model order if the report kept it, else the dicts' own order (sorted after a JSON round trip)."""
    names = [n for n in order if isinstance(n, str)] if isinstance(order, list) else []
    for name in (*full, *ranks):
        if name not in names:
            names.append(name)
    return [n for n in names if n in full or n in ranks]


def _rank_rows(ranks: Mapping[str, Any], full: Mapping[str, Any], order: object) -> Iterator[_RankRow]:
    """One bar per layer, two (``in``/``out``) for a Tucker-2 pair; dense layers at full rank."""

    def as_int(value: object) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    for name in _layer_names(ranks, full, order):
        chosen, top = ranks.get(name, "dense"), full.get(name)
        dense = chosen == "dense"
        if isinstance(chosen, (list, tuple)) or isinstance(top, (list, tuple)):
            tops = list(top) if isinstance(top, (list, tuple)) else [top, top]
            picks = tops if dense else list(chosen) if isinstance(chosen, (list, tuple)) else [chosen, chosen]
            for side, pick, limit in zip(("in", "out"), picks, tops):
                pick, limit = as_int(pick), as_int(limit)
                pick = min(pick, limit) if pick is not None and limit is not None else pick
                yield f"{name} ({side})", pick, limit, dense
        else:
            limit = as_int(top)
            yield name, limit if dense else as_int(chosen), limit, dense


def _ranks_figure(rows: Sequence[_RankRow]) -> Figure:
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    figure = Figure(figsize=(7.5, max(2.2, 0.3 * len(rows) + 1.3)), layout="constrained")
    ax = figure.add_subplot()
    positions = range(len(rows))
    kept = [100.0 * pick / limit if pick is not None and limit else 0.0 for _, pick, limit, _ in rows]
    ax.barh(positions, [100.0 if limit else 0.0 for _, _, limit, _ in rows], color="#eeeeee",
            edgecolor="#bbbbbb", height=0.7)
    ax.barh(positions, kept, color=[_DENSE_COLOR if dense else _FEASIBLE for *_, dense in rows], height=0.7)
    for y, (_, pick, limit, dense), share in zip(positions, rows, kept):
        shown = [_MISSING if value is None else str(value) for value in (pick, limit)]
        text = f"dense ({shown[1]})" if dense else " / ".join(shown)
        ax.text(min(share, 100.0) + 1.5, y, text, va="center", fontsize=8, parse_math=False)
    ax.set_yticks(list(positions), [name for name, *_ in rows], fontsize=8, parse_math=False)
    ax.invert_yaxis()  # first layer on top
    ax.set_xlim(0, 118)
    ax.set_xticks([0, 25, 50, 75, 100])
    ax.set_xlabel("chosen rank, % of the layer's full rank (labels: chosen / full)")
    figure.legend(handles=[Patch(color=_FEASIBLE, label="factorized"), Patch(color=_DENSE_COLOR, label="dense"),
                           Patch(facecolor="#eeeeee", edgecolor="#bbbbbb", label="full rank")],
                  loc="outside upper center", ncol=3, fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return figure
