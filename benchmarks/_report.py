"""The goals of the benchmark issue, checked on the measured figures, and the Markdown report."""

from __future__ import annotations

from typing import Any

__all__ = ["goals", "markdown"]

REAL_SPEEDUP = 1.05  # a MiniLM speedup counts as real above this (beyond timing noise)
MINILM_TRIALS = 100
MINILM_MINUTES = 15.0


def _task(report: dict[str, Any], key: str) -> dict[str, Any] | None:
    return next((task for task in report["tasks"] if task["key"] == key), None)


def _row(task: dict[str, Any], method: str) -> dict[str, Any] | None:
    return next((row for row in task["rows"] if row["method"] == method), None)


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal with its measured value and whether it is met (None: not measured in this run)."""
    found: list[dict[str, Any]] = []

    def add(name: str, value: Any, target: str, met: bool | None) -> None:
        found.append({"goal": name, "measured": value, "target": target, "met": met})

    mlp = _task(report, "mnist1d_mlp")
    if mlp is not None and _row(mlp, "lrsearch") is not None:
        ours = _row(mlp, "lrsearch")
        large = str(mlp["large_batch"])
        speed = ours["speedup"][large]
        uniform = _row(mlp, "uniform-svd")
        if uniform is not None:
            ratio = speed / uniform["speedup"][large]
            add(f"MNIST-1D MLP: lrsearch speedup at batch {large} vs uniform plain SVD", round(ratio, 2), ">= 2x",
                ratio >= 2.0)
        others = [row for row in mlp["rows"] if row["method"] != "lrsearch"]
        holding = [row for row in others if row["within_budget"]]
        if holding:
            best = max(holding, key=lambda row: row["speedup"][large])
            ratio = speed / best["speedup"][large]
            add(f"MNIST-1D MLP: lrsearch speedup at batch {large} vs the best other method within budget "
                f"({best['method']})", round(ratio, 2), ">= 1.25x", ratio >= 1.25)
        if others:
            best = max(others, key=lambda row: row["speedup"][large])
            ratio = speed / best["speedup"][large]
            add(f"MNIST-1D MLP: same, against the fastest other method regardless of budget ({best['method']})",
                round(ratio, 2), ">= 1.25x (stricter reading)", ratio >= 1.25)
        add("MNIST-1D MLP: lrsearch held-out (test) drop", f"{100 * ours['test_drop']:.2f} pts",
            f"<= {100 * ours['allowed_test_drop']:.2f} pts", ours["within_budget"])
        ratio = ours["speedup_per_mac_reduction"]
        add(f"MNIST-1D MLP: lrsearch measured speedup / MAC reduction at batch {large}", round(ratio, 2), ">= 0.8",
            ratio >= 0.8)
    minilm = _task(report, "minilm")
    if minilm is not None and _row(minilm, "lrsearch") is not None:
        ours = _row(minilm, "lrsearch")
        large = str(minilm["large_batch"])
        speed = ours["speedup"][large]
        add(f"MiniLM: lrsearch measured speedup at batch {large}, within budget on test",
            f"{speed:.2f}x, test drop {100 * ours['test_drop']:.2f} pts",
            f"> {REAL_SPEEDUP}x and drop <= {100 * ours['allowed_test_drop']:.2f} pts",
            speed > REAL_SPEEDUP and ours["within_budget"])
        details = ours["details"]
        trials = details.get("trials") or 0
        if trials:
            minutes = (details["profiling_seconds"] + details["trial_seconds"] * MINILM_TRIALS / trials) / 60
            label = "measured" if trials == MINILM_TRIALS else f"extrapolated from {trials} trials"
            add(f"MiniLM: profiling + {MINILM_TRIALS} trials ({label}, {report['environment']['cores']} cores)",
                f"{minutes:.1f} min", f"< {MINILM_MINUTES:g} min", minutes < MINILM_MINUTES)
    return found


def _metric(value: float) -> str:
    return f"{100 * value:.2f}%"


def _count(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def _mark(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[met]


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# lrsearch benchmark",
        "",
        f"Measured {env['date']} on {env['cpu']} ({env['cores']} cores), torch {env['torch']}, lrsearch "
        f"{env['lrsearch']}; latency with {env['threads']} thread(s): median of interleaved `time_call` rounds "
        f"of whole-model forwards; evaluation and fine-tuning with {env['eval_threads']} threads. "
        f"Mode: {env['mode']}; whole run {report['seconds'] / 60:.1f} min.",
        "",
        f"Budget: test-metric drop <= {env['budget']} (absolute). Every method chooses on the validation split "
        f"under the search budget ({env['search_budget']} before fine-tuning; the final budget for tasks that are "
        "not fine-tuned), its candidates are fine-tuned cheapest first with the same distillation recipe and the "
        "first whose validation drop after fine-tuning is within the budget is kept; the test split is used once "
        "at the end. Speedup = dense latency / compressed latency; MAC red. = dense MACs / compressed MACs.",
        "",
    ]
    header = ("| Model | Method | Test metric | Drop (pts) | Within budget | Params | MACs/sample | ms @1 | "
              "Speedup @1 | ms @N | Speedup @N (N) | MAC red. | Speedup / MAC red. | Search (s) | Evals | FT tried |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for task in report["tasks"]:
        dense = task["dense"]
        large = str(task["large_batch"])
        lines.append(
            f"| {task['title']} | dense | {_metric(dense['test_metric'])} | - | - | {_count(dense['params'])} | "
            f"{_count(dense['macs'])} | {dense['latency_ms']['1']:.3f} | 1.00x | {dense['latency_ms'][large]:.2f} | "
            f"1.00x ({large}) | 1.00x | - | - | - | - |")
        for row in task["rows"]:
            fails_val = "" if row["meets_val"] else " (none held on val)"
            lines.append(
                f"| {task['title']} | {row['label']} | {_metric(row['test_metric'])} | "
                f"{100 * row['test_drop']:+.2f} | {_mark(row['within_budget'])}{fails_val} | {_count(row['params'])} | "
                f"{_count(row['macs'])} | {row['latency_ms']['1']:.3f} | {row['speedup']['1']:.2f}x | "
                f"{row['latency_ms'][large]:.2f} | {row['speedup'][large]:.2f}x ({large}) | "
                f"{row['mac_reduction']:.2f}x | {row['speedup_per_mac_reduction']:.2f} | "
                f"{row['search_seconds']:.0f} | {row['evaluations']} | {row['candidates_tried']} |")
    lines += ["", "## Goals", "", "| Goal | Measured | Target | Met |", "|---|---|---|---|"]
    for goal in report["goals"]:
        lines.append(f"| {goal['goal']} | {goal['measured']} | {goal['target']} | {_mark(goal['met'])} |")
    if not report["goals"]:
        lines.append("| (no goal measured in this run) | | | |")
    lines += ["", "## Notes", ""]
    for task in report["tasks"]:
        ft = task["finetune"]
        recipe = (f"fine-tuning {ft['epochs']} epochs, lr x{ft['lr_scale']:g}, distillation alpha {ft['alpha']:g} "
                  f"T {ft['temperature']:g}" if ft else "no fine-tuning")
        lines.append(f"- **{task['title']}** ({task['metric']}; search split {task['search_samples']} samples, "
                     f"test split {task['test_samples']}; search budget {task['search_budget']}; {recipe}; "
                     f"lrsearch {task['trials']} trials; ranks in multiples of {task['multiple']}; "
                     f"task time {task['seconds'] / 60:.1f} min; 1-min load average {task['load_average']['start']} "
                     f"at its start, {task['load_average']['end']} at its end).")
        for note in task["notes"]:
            lines.append(f"  {note}.")
        ours = _row(task, "lrsearch")
        if ours is not None:
            details = ours["details"]
            lines.append(f"  lrsearch: {details.get('profiling_seconds')} s calibration + factorization + latency "
                         f"table, {details.get('trial_seconds')} s for {details.get('trials')} trials "
                         f"({details.get('aborted')} stopped early, {details.get('duplicates')} duplicates not "
                         f"re-evaluated); predicted speedup of its cheapest candidate "
                         f"{details.get('predicted_speedup') or 0:.2f}x.")
            if details.get("skipped_layers"):
                lines.append(f"  Layers lrsearch left dense (reported by calibration): "
                             f"{', '.join(details['skipped_layers'])}.")
        aimet = _row(task, "aimet-greedy")
        if aimet is not None and aimet["details"].get("ratios"):
            ratios = aimet["details"]["ratios"]
            lines.append(f"  AIMET-style table: {len(ratios)} ratio(s) per layer "
                         f"({', '.join(f'{r:.2g}' for r in ratios)}), {aimet['details'].get('table_entries')} entries.")
        for row in task["rows"]:
            tried = "; ".join(f"{a['label']}: search {100 * a['search_drop']:.2f}, val after FT "
                              f"{100 * a['val_drop']:.2f} pts" for a in row["attempts"])
            lines.append(f"  {row['label']}: {tried}.")
    for key, reason in report.get("skipped", {}).items():
        lines.append(f"- {key} skipped: {reason}.")
    lines += [
        "",
        "Methods: uniform = one rank for every layer (clipped to its full rank), the smallest meeting the search "
        "budget, then the next ranks up; energy = every layer keeps the smallest rank holding a share e of its "
        "whitened output energy, e bisected; AIMET-style = per-layer sensitivity table at MAC ratios 1/N..(N-1)/N "
        "then bisection of one score threshold; lrsearch = `lrsearch.search` (measured per-layer latency table at "
        "the large batch, warm starts, TPE), its feasible Pareto set cheapest first. All baselines keep a layer "
        "dense when its rank would not cut MACs, and use ranks in the same multiples as lrsearch. "
        "Evals = model evaluations on the search split; Search (s) includes calibration, factorization and, for "
        "lrsearch, the latency table.",
        "",
    ]
    return "\n".join(lines)
