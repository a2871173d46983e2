"""Benchmark of the whole pipeline on the MNIST-1D MLP (issue: fine-tune, verify, save).

Search (budget on the search split before fine-tuning: ``--search-budget``), fine-tune with
distillation, verify on the test split the search never saw, and measure the whole-model CPU
latency at batch 256 against the dense model. Goals: held-out drop <= 0.5 points after
fine-tuning, measured speedup >= 6x.

Run: ``.venv/bin/python benchmarks/pipeline_mlp.py [--search-budget 2%] [--trials 150] [--epochs 3]``.
Writes ``benchmarks/results/pipeline_mlp.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import optuna

import lrsearch
from lrsearch.demo.lightning import pretrained_classifier
from lrsearch.pipeline import FinetuneConfig
from lrsearch.study import SearchConfig

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="0.5%")
    parser.add_argument("--search-budget", default="0.5%")
    parser.add_argument("--trials", type=int, default=150)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--lr-scale", type=float, default=0.1)
    parser.add_argument("--quick", action="store_true", help="20 trials, 1 epoch")
    args = parser.parse_args()
    trials, epochs = (20, 1) if args.quick else (args.trials, args.epochs)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    module, datamodule = pretrained_classifier()
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        result = lrsearch.compress(
            module, budget=args.budget, search_budget=args.search_budget, run_dir=run_dir, datamodule=datamodule,
            search=SearchConfig(n_trials=trials, threads=args.threads, batch_size=256, seed=0),
            finetune=FinetuneConfig(epochs=epochs, lr_scale=args.lr_scale, progress=False, accelerator="cpu"),
            max_candidates=args.candidates)
        seconds = time.perf_counter() - started
    report = result.report
    figures = {"budget": args.budget, "search_budget": args.search_budget, "trials": trials, "epochs": epochs,
               "lr_scale": args.lr_scale, "candidates": args.candidates,
               "threads": args.threads, "seconds": round(seconds, 1), "meets_budget": result.meets_budget,
               "message": report["message"], "dense": report["dense"], "final": report.get("final"),
               "attempts": report["attempts"]}
    RESULTS.mkdir(exist_ok=True)
    name = "pipeline_mlp_quick.json" if args.quick else (
        f"pipeline_mlp_search{args.search_budget.rstrip('%')}_e{epochs}_lr{args.lr_scale:g}.json")
    (RESULTS / name).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
