"""``lrsearch demo``: uniform-rank factorization of the demo MLP, then a rank search (no fine-tuning)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from lrsearch import demo
from lrsearch._checks import check_int
from lrsearch.core import Decomposition, count_macs, count_params
from lrsearch.measure import Budget, parse_budget
from lrsearch.pipeline._console import run_console
from lrsearch.study import search

__all__ = ["DemoOptions", "run_demo"]


@dataclass(frozen=True)
class DemoOptions:
    """Options of lrsearch demo.

    Attributes:
        seed: data, initialization and calibration seed.
        cache_dir: cache of the generated data and trained weights; unset: $LRSEARCH_CACHE_DIR or
            ~/.cache/lrsearch.
        exclude: keep modules matching these names or regexes dense, e.g. [layers.head].
        budget: allowed accuracy drop of the rank search: "0.5%" or 0.005.
        trials: search trials.
        threads: CPU threads for latency measurement; unset: torch's setting.
        run_dir: folder of the study database and latency table.
    """

    seed: int = 0
    cache_dir: str | None = None
    exclude: list[str] | None = None
    budget: str | float = "0.5%"
    trials: int = 60
    threads: int | None = None
    run_dir: str = "lrsearch-run/demo"
    allowed: Budget = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_int("seed", self.seed, low=0)
        check_int("trials", self.trials, low=1)
        check_int("threads", self.threads, low=1, optional=True)
        object.__setattr__(self, "allowed", parse_budget(self.budget))


def run_demo(args: DemoOptions) -> int:
    """Print the uniform-rank table, then search per-layer ranks; 0 if a configuration met the budget."""
    budget = args.allowed
    cache_dir = Path(args.cache_dir) if args.cache_dir is not None else demo.default_cache_dir()
    print(f"Loading the pretrained MNIST-1D MLP (trained once on first use, then cached in {cache_dir}) ...")
    model, splits = demo.pretrained_mlp(seed=args.seed, cache_dir=cache_dir)
    calibration = demo.calibration_batches(splits, seed=args.seed)
    example = splits.x_test[:1]

    variants: list[tuple[str, str, nn.Module]] = [("dense", "-", model)]
    for method in ("svd", "whitened"):
        decomposition = Decomposition(model, method=method, calibration=calibration,
                                               exclude_modules=args.exclude)
        for fraction in (0.125, 0.25, 0.5):
            variants.append((method, f"{fraction:g}", decomposition.build(fraction)))
    header = ("method", "rank fraction", "test acc", "params", "MACs/sample")
    rows = [(method, fraction, f"{100 * demo.evaluate_accuracy(m, splits.x_test, splits.y_test):.2f}%",
             f"{count_params(m):,}", f"{count_macs(m, example):,}")
            for method, fraction, m in variants]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    print()
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    print(f"\n{len(splits.y_test)} test samples; no fine-tuning after factorization.")

    print(f"\nSearching per-layer ranks: budget {budget} on {len(splits.y_val)} validation samples, "
          f"{args.trials} trials, latency measured on this CPU ...")
    search_data = list(zip(splits.x_val.split(256), splits.y_val.split(256)))
    with run_console(verbose=False):
        result = search(model, search_data, calibration=calibration, budget=budget.drop,
                        n_trials=args.trials, threads=args.threads, run_dir=str(args.run_dir),
                        study_name="demo", seed=args.seed, show_progress_bar=True)
    print(f"Study: {result.storage}  (view: lrsearch dashboard {args.run_dir})")
    if result.best is None:
        print(f"No configuration met the budget {budget} in {args.trials} trials.")
        return 1
    best, table = result.best, result.latency_table
    compressed = Decomposition(model, calibration=calibration).build(best.ranks, schemes=best.schemes)
    print(f"Best (trial {best.trial}): ranks {best.ranks}")
    print(f"  validation accuracy {result.baseline:.2%} -> {best.metric:.2%} (drop {best.drop:.2%})")
    print(f"  test accuracy {demo.evaluate_accuracy(model, splits.x_test, splits.y_test):.2%} -> "
          f"{demo.evaluate_accuracy(compressed, splits.x_test, splits.y_test):.2%}")
    if table is not None and best.latency:
        print(f"  params {result.dense['params']:,.0f} -> {best.params:,.0f}; "
              f"predicted latency {table.dense_model * 1e3:.3f} -> {best.latency * 1e3:.3f} ms "
              f"({table.dense_model / best.latency:.2f}x) at batch {table.batch_size}, {table.threads} thread(s)")
    print(f"\nNext: fine-tune, verify and save with `lrsearch tune --budget {budget}`.")
    return 0
