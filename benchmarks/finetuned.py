"""lrsearch's defaults against the hand method and AIMET-style greedy, all fine-tuned, in one process.

What a careful person does by hand: one uniform rank (plain SVD) for every layer, fine-tuned,
stepping down a ladder of ranks until the budget breaks on the validation split, keeping the
cheapest model that held. AIMET-style greedy (per-layer sensitivity table on whitened factors,
a shared score threshold) walks its ladder of allocations the same way. lrsearch runs
``lrsearch.compress`` with its defaults, as ``lrsearch tune`` would. Every method uses the same
trained model, the same ``FinetuneConfig()`` (defaults) and the same ``finetune`` code, and
chooses on training and validation data only; each reported model is scored once on the test
split (drop with its paired 95 % interval), and all final models are timed together in
interleaved rounds (``lrsearch.measure.compare_latency``).

Run from the repository root (about 20 min on 2 cores)::

    python benchmarks/finetuned.py                      # MLP and CNN at 0.5 %
    python benchmarks/finetuned.py --models mlp --quick # minutes, for a smoke test
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lrsearch
from benchmarks import _methods
from benchmarks._tasks import QUICK, Scale, _classification_task
from lrsearch.core import break_even_rank
from lrsearch.measure import Evaluator, compare_latency, paired_drop_interval, parse_budget
from lrsearch.pipeline import FinetuneConfig, finetune

RESULTS = Path(__file__).resolve().parent / "results"
UNIFORM_LADDER = (256, 192, 128, 96, 64, 48, 32, 24, 16, 8)
_log = logging.getLogger("benchmarks")


def _module(arch: str) -> nn.Module:
    from lrsearch.demo.lightning import Mnist1dClassifier

    return Mnist1dClassifier(arch=arch, pretrained=True).eval()


def _loaders(arch: str) -> dict[str, Any]:
    from lrsearch.demo import load_mnist1d

    data = load_mnist1d()

    def loader(x: torch.Tensor, y: torch.Tensor, shuffle: bool = False) -> DataLoader:
        return DataLoader(TensorDataset(x, y), batch_size=256, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(0) if shuffle else None)

    return {"train": loader(data.x_train, data.y_train, shuffle=True), "val": loader(data.x_val, data.y_val),
            "test": loader(data.x_test, data.y_test), "splits": data}


def _step_down(ladder: list[tuple[str, Callable[[], nn.Module]]], *, module: nn.Module, train: Any,
               val: Evaluator, allowed: float, base: float, config: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune each step, dearest first, until one breaks the budget on validation; keep the last that held."""
    kept: dict[str, Any] | None = None
    attempts = []
    started = time.perf_counter()
    for label, build in ladder:
        with tempfile.TemporaryDirectory() as root:
            tuned = finetune(build().train(), teacher=copy.deepcopy(module), root_dir=root, config=config,
                             train_dataloaders=train)
        drop = base - val.evaluate(tuned).value
        attempts.append({"label": label, "val_drop": drop, "holds": drop <= allowed})
        _log.info("  %s: val drop %.2f points", label, 100 * drop)
        if drop > allowed:
            break
        kept = {"label": label, "model": tuned.eval(), "val_drop": drop}
    return {"kept": kept, "attempts": attempts, "seconds": time.perf_counter() - started}


def _uniform_ladder(module: nn.Module, calibration: list[Any]) -> tuple[list[tuple[str, Callable[[], nn.Module]]], float]:
    started = time.perf_counter()
    decomposition = lrsearch.Decomposition(module, method="svd", calibration=calibration)
    ladder = []
    previous: dict[str, int] | None = None
    for rank in UNIFORM_LADDER:
        ranks = {name: min(rank, int(decomposition.full_rank(name))) for name in decomposition.targets}
        ranks = {name: r for name, r in ranks.items()
                 if r <= break_even_rank(decomposition.geometry(name), decomposition.scheme(name))}
        if not ranks or ranks == previous:
            continue
        previous = ranks
        ladder.append((f"r={rank}", lambda ranks=ranks: decomposition.build(dict(ranks))))
    return ladder, time.perf_counter() - started


def _aimet_ladder(task: Any) -> tuple[list[tuple[str, Callable[[], nn.Module]]], float, int]:
    """AIMET's sensitivity table, then every distinct threshold allocation, dearest first."""
    started = time.perf_counter()
    scorer = _methods._Scorer(task, "99%")  # no constraint before fine-tuning: the ladder is walked
    decomposition = _methods._decomposition(task, scorer, "whitened")
    ratios = [i / task.ratios for i in range(1, task.ratios)]
    table: dict[str, dict[float, tuple[int, float]]] = {}
    for name in decomposition.targets:
        table[name] = {}
        for ratio in ratios:
            rank = _methods._rank_for_ratio(decomposition, name, ratio, task.multiple)
            if rank is None or any(r == rank for r, _ in table[name].values()):
                continue
            table[name][ratio] = (rank, scorer.baseline - scorer.drop(decomposition, {name: rank}))
    allocations: dict[tuple[tuple[str, int], ...], dict[str, int]] = {}
    for threshold in sorted({score for entries in table.values() for _, score in entries.values()}, reverse=True):
        ranks = {}
        for name, entries in table.items():
            fitting = [(ratio, rank) for ratio, (rank, score) in entries.items() if score >= threshold]
            if fitting:
                ranks[name] = min(fitting)[1]
        if ranks:
            allocations.setdefault(tuple(sorted(ranks.items())), ranks)
    ordered = sorted(allocations.values(), key=lambda ranks: -_methods._macs(decomposition, ranks))
    dense = _methods._macs(decomposition, {})
    ladder = [(f"{len(ranks)} layers, {_methods._macs(decomposition, ranks) / dense:.0%} of the MACs",
               lambda ranks=ranks: decomposition.build(dict(ranks))) for ranks in ordered]
    return ladder, time.perf_counter() - started, scorer.evaluations


def _cached(cache: Path | None, key: str, walk: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A baseline's outcome (kept model included) from ``cache`` when an earlier run left it, else walked and stored.

    A baseline's ladder takes most of the benchmark's time and does not change when lrsearch
    does; its kept model is timed again with the others, in the same interleaved rounds.
    """
    path = cache / f"{key}.pt" if cache is not None else None
    if path is not None and path.exists():
        _log.info("  from %s", path)
        return torch.load(path, weights_only=False)
    outcome = walk()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(outcome, path)
    return outcome


def run_model(arch: str, *, budget: str, threads: int, quick: bool, epochs: int | None,
              cache: Path | None = None, methods: tuple[str, ...] = ("uniform", "aimet", "lrsearch")) -> dict[str, Any]:
    module = _module(arch)
    data = _loaders(arch)
    splits = data["splits"]
    scale = QUICK if quick else Scale()
    task = _classification_task(f"mnist1d_{arch}", arch, module, {
        "train": (splits.x_train, splits.y_train), "val": (splits.x_val, splits.y_val),
        "test": (splits.x_test, splits.y_test)}, 256, scale, epochs=1, trials=scale.trials)
    config = FinetuneConfig(epochs=epochs, progress=False, accelerator="cpu")
    val = Evaluator(task.search)
    base_val = val.evaluate(module).value
    allowed = parse_budget(budget).allowed_drop(base_val)
    outcomes: dict[str, dict[str, Any]] = {}

    def uniform() -> dict[str, Any]:
        ladder, build_seconds = _uniform_ladder(module, task.calibration)
        walk = _step_down(ladder, module=module, train=data["train"], val=val, allowed=allowed, base=base_val,
                          config=config)
        return {**walk, "seconds": walk["seconds"] + build_seconds}

    def aimet() -> dict[str, Any]:
        ladder, table_seconds, evaluations = _aimet_ladder(task)
        walk = _step_down(ladder, module=module, train=data["train"], val=val, allowed=allowed, base=base_val,
                          config=config)
        return {**walk, "seconds": walk["seconds"] + table_seconds, "evaluations": evaluations}

    suffix = f"{arch}-{budget}-e{epochs}{'-quick' if quick else ''}"
    if "uniform" in methods:
        _log.info("%s: uniform rank, plain SVD, fine-tuned ladder", arch)
        outcomes["uniform rank, plain SVD (fine-tuned ladder)"] = _cached(cache, f"uniform-{suffix}", uniform)
    if "aimet" in methods:
        _log.info("%s: AIMET-style greedy, fine-tuned ladder", arch)
        outcomes["AIMET-style greedy (fine-tuned ladder)"] = _cached(cache, f"aimet-{suffix}", aimet)
    if "lrsearch" not in methods:
        return {"arch": arch, "methods": {label: {k: v for k, v in o.items() if k != "kept"} for label, o in outcomes.items()}}
    _log.info("%s: lrsearch with its defaults", arch)
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        result = lrsearch.compress(module, budget=budget, run_dir=run_dir, train_dataloaders=data["train"],
                                   val_dataloaders=data["val"], test_dataloaders=data["test"],
                                   search=lrsearch.SearchConfig(threads=threads, seed=0,
                                                                       n_trials=30 if quick else 100),
                                   finetune=config)
        seconds = time.perf_counter() - started
    selected = next((a for a in result.report["attempts"] if a["trial"] == (result.report.get("final") or {})
                     .get("trial")), None)
    outcomes["lrsearch (defaults)"] = {
        "kept": {"label": f"trial {result.report['final']['trial']}", "model": result.model,
                 "val_drop": selected["select_drop"] if selected else None} if result.report.get("final") else None,
        "attempts": result.report["attempts"], "seconds": seconds, "timing": result.report.get("timing"),
        "compress_test": result.report.get("final")}

    test = Evaluator(task.test)
    base_test = test.evaluate(module)
    rows: dict[str, dict[str, Any]] = {}
    models = {"dense": module}
    for label, outcome in outcomes.items():
        kept = outcome["kept"]
        row: dict[str, Any] = {"seconds": round(outcome["seconds"], 1), "finetunes": len(outcome["attempts"]),
                               "attempts": [{k: v for k, v in a.items() if k != "ranks"} for a in outcome["attempts"]]}
        if kept is None:
            row["kept"] = None
        elif label.startswith("lrsearch"):
            final = outcome["compress_test"]
            row.update(kept=kept["label"], val_drop=kept["val_drop"], test_drop=final["verify_drop"],
                       test_drop_interval=final["verify_drop_interval"], params=final["params"],
                       macs=final["macs"], within_budget=bool(result.meets_budget))
            if kept["model"] is not None:
                models[label] = kept["model"]
        else:
            evaluation = test.evaluate(kept["model"])  # the test split, once for this model
            drop = base_test.value - evaluation.value
            row.update(kept=kept["label"], val_drop=kept["val_drop"], test_drop=drop,
                       test_drop_interval=list(paired_drop_interval(base_test.correct, evaluation.correct)),
                       params=lrsearch.count_params(kept["model"]),
                       macs=lrsearch.core.macs_per_sample(kept["model"], task.test[0]),
                       within_budget=drop <= parse_budget(budget).allowed_drop(base_test.value))
            models[label] = kept["model"]
        rows[label] = row
    x = splits.x_test
    comparison = compare_latency(models, {1: x[:1], 256: x[:256]}, device="cpu", threads=threads,
                                 rounds=3 if quick else 7)
    dense_macs = lrsearch.core.macs_per_sample(module, task.test[0])
    for label, row in rows.items():
        if label in models:
            row["speedup"] = {size: round(comparison.speedup(label, "dense", size), 3) for size in (1, 256)}
            row["mac_reduction"] = round(dense_macs / row["macs"], 2)
    return {"arch": arch, "dense_test_accuracy": base_test.value, "dense_val_accuracy": base_val,
            "budget": budget, "methods": rows, "latency": comparison.to_dict(), "busy": comparison.busy}


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| Model | Method | Test drop (95 % interval), points | Within budget | MAC red. | Speedup @256 | "
             "Speedup @1 | Fine-tunes | Wall time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for label, row in result["methods"].items():
            if row.get("kept") is None:
                lines.append(f"| MNIST-1D {result['arch'].upper()} | {label} | nothing held | - | - | - | - | "
                             f"{row['finetunes']} | {row['seconds']:.0f} |")
                continue
            low, high = row["test_drop_interval"] or (float("nan"), float("nan"))
            speed = row.get("speedup", {})
            lines.append(
                f"| MNIST-1D {result['arch'].upper()} | {label} | {100 * row['test_drop']:+.2f} "
                f"({100 * low:+.2f}, {100 * high:+.2f}) | {'yes' if row['within_budget'] else '**no**'} | "
                f"{row.get('mac_reduction', '-')}x | {speed.get(256, '-')}x | {speed.get(1, '-')}x | "
                f"{row['finetunes']} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--budget", default="0.5%")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of every latency measurement")
    parser.add_argument("--train_threads", type=int, default=1,
                        help="CPU threads of evaluation and fine-tuning (1 is fastest on a shared machine)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=None,
                        help="fine-tuning epochs of every method (default: FinetuneConfig's own, from the data size)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep each baseline's outcome here and reuse it in later runs (lrsearch always runs)")
    parser.add_argument("--methods", nargs="+", default=["uniform", "aimet", "lrsearch"],
                        choices=["uniform", "aimet", "lrsearch"],
                        help="without lrsearch, only the baselines run (to fill --cache); nothing is timed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    torch.set_num_threads(args.train_threads)
    started = time.perf_counter()
    results = [run_model(arch, budget=args.budget, threads=args.threads, quick=args.quick, epochs=args.epochs,
                         cache=args.cache, methods=tuple(args.methods)) for arch in args.models]
    if "lrsearch" not in args.methods:
        print(json.dumps(results, indent=1, default=str))
        return
    env = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(), "torch": torch.__version__,
           "lrsearch": lrsearch.__version__, "machine": platform.processor() or platform.machine(),
           "threads": args.threads, "wall_seconds": round(time.perf_counter() - started),
           "finetune": FinetuneConfig(epochs=args.epochs).to_dict()}
    name = "finetuned-quick" if args.quick else "finetuned"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"env": env, "results": results}, indent=1, default=str))
    table = markdown(results)
    (args.out / f"{name}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
