"""Command-line interface: ``lrsearch demo``.

Only argument parsing and printing live here; the work is done by :mod:`lrsearch.demo` and the
public ``lrsearch`` API.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import optuna
import torch
from torch import nn

import lrsearch
from lrsearch import demo
from lrsearch._version import __version__

_DEMO_METHODS = ("svd", "whitened")
_DEMO_FRACTIONS = (0.125, 0.25, 0.5)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lrsearch`` command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    args = _build_parser().parse_args(argv)
    return args.handler(args)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrsearch", description="Compress trained PyTorch models by low-rank factorization."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo_parser = commands.add_parser(
        "demo",
        help="compress a pretrained MNIST-1D MLP: uniform ranks, then a per-layer rank search",
        description=(
            "Factorize every layer (but --exclude ones) of a pretrained MNIST-1D MLP at uniform rank "
            "fractions with plain and activation-whitened SVD and print a table; then search per-layer "
            "ranks for the lowest measured latency within an accuracy-drop budget (no fine-tuning yet)."
        ),
    )
    demo_parser.add_argument(
        "--seed", type=_seed, default=0, help="data, initialization and calibration seed (default: 0)"
    )
    demo_parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache for the generated data and trained weights "
        "(default: $LRSEARCH_CACHE_DIR or ~/.cache/lrsearch)",
    )
    demo_parser.add_argument(
        "--exclude",
        action="append",
        default=None,
        metavar="PATTERN",
        help="keep modules matching PATTERN dense (repeatable), e.g. --exclude layers.head",
    )
    demo_parser.add_argument("--budget", default="0.5%", help="allowed accuracy drop of the rank search (default: 0.5%%)")
    demo_parser.add_argument("--trials", type=_positive, default=60, help="search trials (default: 60)")
    demo_parser.add_argument("--threads", type=_positive, default=None,
                             help="CPU threads for latency measurement (default: torch's setting)")
    demo_parser.add_argument("--run-dir", type=Path, default=Path("lrsearch-run/demo"),
                             help="folder of the study database and latency table (default: lrsearch-run/demo)")
    demo_parser.set_defaults(handler=_run_demo)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 but got {value}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32) but got {value}")
    return value


def _run_demo(args: argparse.Namespace) -> int:
    try:
        budget = lrsearch.parse_budget(args.budget)
    except lrsearch.BudgetError as error:
        print(f"lrsearch demo: {error}", file=sys.stderr)
        return 2
    cache_dir = args.cache_dir if args.cache_dir is not None else demo.default_cache_dir()
    print(f"Loading the pretrained MNIST-1D MLP (trained once on first use, then cached in {cache_dir}) ...")
    model, splits = demo.pretrained_mlp(seed=args.seed, cache_dir=cache_dir)
    calibration = demo.calibration_batches(splits, seed=args.seed)
    example = splits.x_test[:1]

    variants: list[tuple[str, str, nn.Module]] = [("dense", "-", model)]
    for method in _DEMO_METHODS:
        decomposition = lrsearch.Decomposition(
            model, method=method, calibration=calibration, exclude_modules=args.exclude
        )
        for fraction in _DEMO_FRACTIONS:
            variants.append((method, f"{fraction:g}", decomposition.build(fraction)))

    header = ("method", "rank fraction", "test acc", "params", "MACs/sample")
    rows = [
        (
            method,
            fraction,
            f"{100 * demo.evaluate_accuracy(m, splits.x_test, splits.y_test):.2f}%",
            f"{lrsearch.count_params(m):,}",
            f"{lrsearch.count_macs(m, example):,}",
        )
        for method, fraction, m in variants
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    print()
    for row in (header, *rows):
        cells = (cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        print("  ".join(cells))
    print(f"\n{len(splits.y_test)} test samples; no fine-tuning after factorization.")
    return _run_demo_search(args, budget, model, splits, calibration)


def _run_demo_search(args: argparse.Namespace, budget: lrsearch.Budget, model: nn.Module,
                     splits: demo.Mnist1dSplits, calibration: list[torch.Tensor]) -> int:
    print(f"\nSearching per-layer ranks: budget {budget} on {len(splits.y_val)} validation samples, "
          f"{args.trials} trials, latency measured on this CPU ...")
    search_data = list(zip(splits.x_val.split(256), splits.y_val.split(256)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    result = lrsearch.search(model, search_data, calibration=calibration, budget=budget.drop,
                             n_trials=args.trials, threads=args.threads, run_dir=str(args.run_dir),
                             study_name="demo", seed=args.seed, show_progress_bar=True)
    print(f"Study: {result.storage}  (view: optuna-dashboard {result.storage})")
    if result.best is None:
        print(f"No configuration met the budget {budget} in {args.trials} trials.")
        return 1
    best, table = result.best, result.latency_table
    compressed = lrsearch.Decomposition(model, calibration=calibration).build(best.ranks, schemes=best.schemes)
    print(f"Best (trial {best.trial}): ranks {best.ranks}")
    print(f"  validation accuracy {result.baseline:.2%} -> {best.metric:.2%} (drop {best.drop:.2%})")
    print(f"  test accuracy {demo.evaluate_accuracy(model, splits.x_test, splits.y_test):.2%} -> "
          f"{demo.evaluate_accuracy(compressed, splits.x_test, splits.y_test):.2%}")
    print(f"  params {result.dense['params']:,.0f} -> {best.params:,.0f}; "
          f"predicted latency {table.dense_model * 1e3:.3f} -> {best.latency * 1e3:.3f} ms "
          f"({table.dense_model / best.latency:.2f}x) at batch {table.batch_size}, {table.threads} thread(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
