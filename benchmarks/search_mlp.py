"""Benchmark of the rank search on the MNIST-1D MLP (issue: rank search).

Prints and writes ``benchmarks/results/search_mlp.json``:

* the cost of one search trial relative to one bare forward pass over the search data
  (goal <= 1.2x);
* how many evaluations ran until the best configuration was found;
* predicted and measured speedup of the best configuration against the fastest uniform-rank
  configuration that meets the same budget on the same data (goal >= 2x), and both models'
  held-out test accuracy (no fine-tuning here). Two uniform baselines: one rank for the layers
  the search may factorize (the others dense), and one rank for every layer clipped to its full
  rank, as tutorials do.

Run: ``.venv/bin/python benchmarks/search_mlp.py [--trials 150] [--threads 1] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import optuna
import torch

import lrsearch
from lrsearch.demo import calibration_batches, evaluate_accuracy, pretrained_mlp
from lrsearch.measure import Evaluator, time_call
from lrsearch.study import SearchSpace

RESULTS = Path(__file__).parent / "results"


def _latency(model: torch.nn.Module, x: torch.Tensor, threads: int) -> float:
    with torch.inference_mode():
        return time_call(lambda: model(x), device=torch.device("cpu"), threads=threads,
                         min_run_time=0.2, repeats=7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--budget", default="0.5%")
    parser.add_argument("--quick", action="store_true", help="20 trials, for a smoke run")
    args = parser.parse_args()
    trials = 20 if args.quick else args.trials
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.manual_seed(0)

    model, splits = pretrained_mlp()
    search_data = list(zip(splits.x_val.split(args.batch_size), splits.y_val.split(args.batch_size)))
    calibration = calibration_batches(splits)
    x_deploy = splits.x_test[: args.batch_size]

    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        result = lrsearch.search(model, search_data, calibration=calibration, budget=args.budget,
                                 n_trials=trials, threads=args.threads, batch_size=args.batch_size,
                                 run_dir=run_dir, seed=0)
        search_seconds = time.perf_counter() - started
        study = optuna.load_study(study_name=result.study_name, storage=result.storage)
    table = result.latency_table
    evaluated = [t for t in study.trials if "duplicate_of" not in t.user_attrs and t.datetime_complete]
    full = [t for t in evaluated if t.user_attrs.get("aborted") is False]
    trial_seconds = statistics.median((t.datetime_complete - t.datetime_start).total_seconds() for t in full)
    with torch.inference_mode():
        bare = time_call(lambda: [model(x) for x, _ in search_data], device=torch.device("cpu"),
                         threads=torch.get_num_threads(), min_run_time=0.2)
    best = result.best
    if best is None:
        raise SystemExit(f"no configuration met the budget {args.budget} in {trials} trials")
    evaluations_until_best = sum(1 for t in evaluated if t.number <= best.trial)

    decomposition = lrsearch.Decomposition(model, calibration=calibration)
    space = SearchSpace.build(decomposition, is_faster=lambda n, s, r: r in table.faster_ranks(n, s))
    uniform = None
    for rank in sorted({r for layer in space.layers.values() for r in layer.options if isinstance(r, int)}):
        ranks = {name: rank for name, layer in space.layers.items() if rank in layer.options}
        candidate = decomposition.build(ranks)
        drop = result.baseline - Evaluator(search_data).evaluate(candidate).value
        if drop <= result.allowed_drop:
            plan = {name: ("linear", rank) for name in ranks}
            predicted = table.predict(plan)
            if uniform is None or predicted < uniform["predicted"]:
                uniform = {"rank": rank, "ranks": ranks, "predicted": predicted, "model": candidate, "drop": drop}
    tutorial = None  # one rank for every layer, clipped to each layer's full rank, as tutorials do
    for rank in range(8, 513, 8):
        ranks = {name: min(rank, decomposition.full_rank(name)) for name in decomposition.targets}
        candidate = decomposition.build(ranks)
        drop = result.baseline - Evaluator(search_data).evaluate(candidate).value
        if drop <= result.allowed_drop:
            tutorial = {"rank": rank, "model": candidate, "drop": drop}
            break
    best_model = decomposition.build(best.ranks, schemes=best.schemes)
    dense_ms = _latency(model, x_deploy, args.threads) * 1e3
    best_ms = _latency(best_model, x_deploy, args.threads) * 1e3
    figures = {
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "threads": args.threads, "batch_size": args.batch_size, "budget": args.budget, "trials": trials,
        "search_seconds": round(search_seconds, 1),
        "baseline_val_accuracy": result.baseline,
        "trial_seconds_median": trial_seconds, "bare_forward_seconds": bare,
        "trial_cost_vs_forward": trial_seconds / bare,
        "evaluations_until_best": evaluations_until_best, "best_trial": best.trial,
        "aborted_trials": sum(1 for t in evaluated if t.user_attrs.get("aborted")),
        "duplicate_trials": len(study.trials) - len(evaluated),
        "best": {"ranks": best.ranks, "val_drop": best.drop,
                 "test_accuracy": evaluate_accuracy(best_model, splits.x_test, splits.y_test),
                 "predicted_ms": best.latency * 1e3, "measured_ms": best_ms,
                 "predicted_speedup": table.dense_model / best.latency, "measured_speedup": dense_ms / best_ms},
        "dense": {"test_accuracy": evaluate_accuracy(model, splits.x_test, splits.y_test),
                  "predicted_ms": table.dense_model * 1e3, "measured_ms": dense_ms},
    }
    if uniform is not None:
        uniform_ms = _latency(uniform["model"], x_deploy, args.threads) * 1e3
        figures["uniform"] = {
            "rank": uniform["rank"], "val_drop": uniform["drop"],
            "test_accuracy": evaluate_accuracy(uniform["model"], splits.x_test, splits.y_test),
            "predicted_ms": uniform["predicted"] * 1e3, "measured_ms": uniform_ms,
            "predicted_speedup": table.dense_model / uniform["predicted"], "measured_speedup": dense_ms / uniform_ms}
        figures["best_vs_uniform"] = {"predicted": uniform["predicted"] / best.latency,
                                      "measured": uniform_ms / best_ms}
    if tutorial is not None:
        tutorial_ms = _latency(tutorial["model"], x_deploy, args.threads) * 1e3
        figures["uniform_all_layers"] = {
            "rank": tutorial["rank"], "val_drop": tutorial["drop"],
            "test_accuracy": evaluate_accuracy(tutorial["model"], splits.x_test, splits.y_test),
            "measured_ms": tutorial_ms, "measured_speedup": dense_ms / tutorial_ms,
            "best_vs_this_measured": tutorial_ms / best_ms}
    RESULTS.mkdir(exist_ok=True)
    name = "search_mlp_quick.json" if args.quick else "search_mlp.json"
    (RESULTS / name).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
