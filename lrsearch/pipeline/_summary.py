"""The text summary ``lrsearch tune`` prints: one call, :func:`summary_text`, on the report dict.

It renders the dict that ``report.html`` renders (``CompressionResult.report``), so the two
cannot disagree on figures; the pipeline's report module will offer the same as
``render_text(report)``, and this module then goes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lrsearch.study._storage import redacted

__all__ = ["summary_text", "threads_text"]


def threads_text(count: int | None) -> str:
    return "" if not count else f", {count} thread{'s' if count != 1 else ''}"


def _interval_text(interval: Any) -> str:
    """`` [95 %: -0.20 to 0.90]`` after a drop in points, or nothing for a metric without one."""
    if not isinstance(interval, list) or len(interval) != 2:
        return ""
    return f" [95 %: {100 * interval[0]:.2f} to {100 * interval[1]:.2f}]"


def _percent(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _count(value: Any) -> str:
    return "-" if value is None else f"{value:,.0f}"


def summary_text(report: Mapping[str, Any], paths: Mapping[str, str], run_dir: Path) -> str:
    """The table the CLI prints after a run: the same report dict that report.html renders."""
    dense, final = report.get("dense", {}), report.get("final")
    splits = report.get("splits", {})
    metric = report.get("metric", "accuracy")
    verify, selected = splits.get("test", "test"), splits.get("select", "select")
    threads, batch = report.get("threads"), report.get("batch_size")
    latency_label = f"latency (batch {batch}{threads_text(threads)}, measured)"
    final = final or {}

    def ratio(key: str, word: str) -> str:
        if not final or not dense.get(key) or not final.get(key):
            return ""
        return f"{dense[key] / final[key]:.2f}x {word}"

    rows = [
        ("", "original", "compressed", ""),
        (f"{metric} on {verify}", _percent(dense.get("verify_metric")), _percent(final.get("verify_metric")),
         f"drop {100 * final['verify_drop']:.2f} points{_interval_text(final.get('verify_drop_interval'))} "
         f"(allowed {100 * report['allowed_drop']:.2f})"
         if final else f"allowed drop {100 * report['allowed_drop']:.2f} points"),
        (f"{metric} on {selected}", _percent(dense.get("select_metric")), _percent(final.get("select_metric")),
         f"drop {100 * final['select_drop']:.2f} points" if final else ""),
        ("parameters", _count(dense.get("params")), _count(final.get("params")), ratio("params", "fewer")),
        ("MACs per sample", _count(dense.get("macs")), _count(final.get("macs")), ratio("macs", "fewer")),
        (latency_label, f"{dense['latency_ms']:.3f} ms" if dense.get("latency_ms") else "-",
         f"{final['latency_ms']:.3f} ms" if final.get("latency_ms") else "-",
         f"{final['speedup']:.2f}x faster" if final.get("speedup") else ""),
    ]
    for entry in report.get("deployment", [])[1:]:
        predicted = entry.get("predicted_speedup")
        rows.append((f"latency (batch {entry['batch_size']}{threads_text(threads)}, measured)",
                     f"{entry['dense_ms']:.3f} ms", f"{entry['compressed_ms']:.3f} ms",
                     f"{entry['speedup']:.2f}x faster"
                     + (f" (predicted {predicted:.2f}x)" if predicted else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [("MEETS THE BUDGET" if report.get("meets_budget") else "DOES NOT MEET THE BUDGET")
             + f" {report.get('budget')}: {report.get('message', '')}", ""]
    for row in rows:
        lines.append(f"  {row[0].ljust(widths[0])}  {row[1].rjust(widths[1])}  {row[2].rjust(widths[2])}  {row[3]}"
                     .rstrip())
    if final.get("ranks"):
        full = final.get("full_ranks", {})
        lines.append("")
        lines.append(f"  ranks (trial {final.get('trial')}): " + ", ".join(
            f"{name} {rank}/{full.get(name, '?')}" for name, rank in final["ranks"].items()))
    attempts = report.get("attempts", [])
    if attempts and not report.get("meets_budget"):
        lines.append("")
        lines.append("  tried after fine-tuning: " + "; ".join(
            f"trial {a['trial']} drop {100 * a['select_drop']:.2f} points" for a in attempts))
        lines.append("  HINT: widen --budget, search more (--search.n_trials), fine-tune longer "
                     "(--finetune.epochs), or allow more fine-tunes (--max_finetunes).")
    for warning in report.get("warnings", []):
        lines.extend(["", f"  WARNING: {warning}"])
    lines.append("")
    lines.append("Files")
    labels = {"model": "compressed model (lrsearch.load)", "checkpoint": "checkpoint (Model.load_from_checkpoint)",
              "report_html": "report", "report": "report data"}
    entries = [(label, paths[key]) for key, label in labels.items() if key in paths]
    study = report.get("paths", {}).get("study")
    if study:
        entries.append(("study", redacted(study)))
    width = max(len(label) for label, _ in entries) if entries else 0
    lines.extend(f"  {label:<{width}}  {where}" for label, where in entries)
    if study:
        lines.append(f"  (view the study: lrsearch dashboard {run_dir})")
    return "\n".join(lines)
