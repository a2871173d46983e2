"""all-MiniLM-L6-v2 through ``lrsearch.compress`` with a feature-distillation fine-tune, at batch 32.

The model is an embedding model: it has no class scores and no labels, so its LightningModule
defines a forward and an optimizer but no ``training_step``, and the fine-tune minimizes the
cosine distance of the compressed model's sentence embeddings to the original's on unlabeled
text (lrsearch.pipeline._distill). Everything else is ``lrsearch.compress``'s defaults except
what the task sets: the metric (top-1 nearest-neighbour agreement with the original,
benchmarks/_minilm.py), the budget (0.5 points), ``distill="cosine"``, the deployment batch
(``search.batch_size=32``) and, to stay affordable on 2 cores at one thread, the number of
trials, the fine-tuning epochs and the learning rate (see ``main``'s options).

Data, all disjoint: fine-tuning text is standard-library docstrings (never pydoc sentences);
the validation batches (search and selection splits, in that order, cut by ``compress`` at a
group boundary) and the test batches are pydoc sentences in groups of 64, two batches of 32
each. The speedup is the report's: lrsearch's interleaved timing of the original and the
compressed model, in one process, on the first search batch (32 sentences near the median
length).

Run from the repository root (18 min on the shared 2-core CPU)::

    OMP_NUM_THREADS=1 python benchmarks/minilm_finetuned.py
    OMP_NUM_THREADS=1 python benchmarks/minilm_finetuned.py --probe   # time one fine-tune and one evaluation

Writes ``benchmarks/results/minilm_finetuned.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

import lrsearch
from benchmarks import _minilm
from lrsearch.pipeline import FinetuneConfig

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 32            # the deployment batch (SentenceTransformer.encode's default)
GROUP = 64            # sentences whose nearest neighbours are compared, two batches of 32
VALIDATION_GROUPS = 16  # 1,024 sentences: compress cuts 4 groups for the search, 12 for selection
TEST_GROUPS = 20      # 1,280 held-out sentences for the one verdict
TRAIN_TOKENS = 32     # fine-tuning sentences are truncated here (the evaluation keeps MAX_TOKENS = 64)
_log = logging.getLogger("benchmarks")


class MiniLMEmbedder(pl.LightningModule):
    """all-MiniLM-L6-v2 as a LightningModule: forward and optimizer, no training_step (it has no labels)."""

    def __init__(self, encoder: nn.Module, lr: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.lr = lr

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def feed(model: nn.Module, batch: Any) -> Tensor:
    """A training batch is a dict of input_ids and attention_mask; an evaluation batch is (that dict, targets)."""
    return model(**batch) if isinstance(batch, Mapping) else model(**batch[0])


def batches(prepared: list[Any]) -> DataLoader:
    """Ready batches as a loader: compress reads a plain list as a list of loaders (and its first batch as one)."""
    return DataLoader(prepared, batch_size=None)


def _first_typical(groups: list[list[Any]], median: int) -> list[Any]:
    """The batches group after group, led by the group with the batch nearest the median length, that batch first.

    ``compress`` takes its latency batch from the first search batch, and cuts the validation
    batches by count: keeping each group's batches together keeps every group whole in one split.
    """
    def distance(batch: Any) -> int:
        return abs(int(batch[0]["attention_mask"].shape[1]) - median)

    lead = min(range(len(groups)), key=lambda g: (min(map(distance, groups[g])), g))
    first = sorted(groups[lead], key=distance)
    return first + [batch for g, group in enumerate(groups) if g != lead for batch in group]


def build_data(train_sentences: int, *, dropout: bool, seed: int = 0) -> dict[str, Any]:
    data = _minilm.load_encoder(dropout=dropout)
    pool = _minilm.pydoc_sentences(seed=seed)
    wanted = GROUP * (VALIDATION_GROUPS + TEST_GROUPS)
    if wanted > len(pool):
        raise ValueError(f"the splits need {wanted} pydoc sentences but this Python has {len(pool)}")
    validation, test = pool[:GROUP * VALIDATION_GROUPS], pool[GROUP * VALIDATION_GROUPS:wanted]
    lengths = data.token_lengths(pool[:wanted])
    median = sorted(lengths.values())[len(lengths) // 2]
    val_groups = _minilm.grouped_batches(data, validation, lengths, group_size=GROUP, batch_size=BATCH, margin=0.05)
    test_groups = _minilm.grouped_batches(data, test, lengths, group_size=GROUP, batch_size=BATCH, margin=0.05)
    train = _minilm.docstring_sentences(seed=seed, exclude=pool)[:train_sentences]
    loader = DataLoader(train, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed),
                        collate_fn=lambda sentences: data.encode(sentences, max_tokens=TRAIN_TOKENS))
    scored = [sum(int(b[1][:, 3].sum()) for group in groups for b in group) for groups in (val_groups, test_groups)]
    return {"encoder": data.model, "train": loader, "val": _first_typical(val_groups, median),
            "test": [batch for group in test_groups for batch in group], "train_sentences": len(train),
            "median_tokens": median, "scored": {"validation": scored[0], "test": scored[1]}}


def probe(args: argparse.Namespace) -> None:
    """Time one fine-tune epoch and one evaluation, and show what fine-tuning recovers at a uniform rank."""
    import copy
    import itertools

    from lrsearch.measure import Evaluator, compare_latency
    from lrsearch.pipeline import finetune

    data = build_data(args.train_sentences, dropout=args.dropout)
    module = MiniLMEmbedder(data["encoder"], args.lr).eval()
    started = time.perf_counter()
    calibration = list(itertools.islice(data["train"], 1024 // BATCH))  # what compress calibrates on
    decomposition = lrsearch.Decomposition(module, calibration=calibration, forward=feed)
    _log.info("calibration and factors: %.0f s", time.perf_counter() - started)
    select = Evaluator(data["val"][8:], metric=_minilm.nn_agreement, batch_fn=_minilm.batch_fn)
    for rank in args.probe_ranks:
        ranks = {name: min(rank, int(decomposition.full_rank(name))) for name in decomposition.targets
                 if args.probe_ffn_only is False or ("attention" not in name and name.endswith("dense"))}
        student = decomposition.build(ranks)
        started = time.perf_counter()
        before = select.evaluate(student).value
        seconds = time.perf_counter() - started
        latency = compare_latency({"dense": module, "low-rank": student}, {BATCH: data["val"][0]}, device="cpu",
                                  threads=1, forward=feed, rounds=3)
        _log.info("rank %d on %d layers: speedup %.3fx at batch %d; selection agreement %.4f (evaluation %.1f s)",
                  rank, len(ranks), latency.speedup("low-rank", "dense", BATCH), BATCH, before, seconds)
        for lr in args.probe_lrs:
            config = FinetuneConfig(epochs=args.epochs, lr_scale=lr / args.lr, distill="cosine", progress=False,
                                    accelerator="cpu")
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as root:
                tuned = finetune(copy.deepcopy(student).train(), teacher=copy.deepcopy(module), root_dir=root,
                                 config=config, train_dataloaders=data["train"], forward=feed)
            _log.info("  after %d epochs at lr %g: selection agreement %.4f (%.0f s)", args.epochs, lr,
                      select.evaluate(tuned.eval()).value, time.perf_counter() - started)


def _environment(args: argparse.Namespace) -> dict[str, Any]:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": 1,
            "torch": torch.__version__, "lrsearch": lrsearch.__version__, "optuna": optuna.__version__,
            "python": platform.python_version(), "options": {k: v for k, v in vars(args).items() if k != "probe"}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = build_data(args.train_sentences, dropout=args.dropout)
    module = MiniLMEmbedder(data["encoder"], args.lr).eval()
    finetune = FinetuneConfig(epochs=args.epochs, lr_scale=args.lr_scale, distill="cosine", progress=False,
                              accelerator="cpu")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        result = lrsearch.compress(
            module, budget=args.budget, run_dir=run_dir, metric=_minilm.nn_agreement, metric_name="NN agreement",
            batch_fn=_minilm.batch_fn, forward=feed, progress=False, finetune=finetune,
            search={"n_trials": args.trials, "batch_size": BATCH, "threads": 1, "multiple": 16, "seed": 0},
            train_dataloaders=data["train"], val_dataloaders=batches(data["val"]),
            test_dataloaders=batches(data["test"]))
    seconds = time.perf_counter() - started
    report = result.report
    final = report.get("final") or {}
    dense_ms = report["dense"].get("predicted_latency_ms")
    front = [{"trial": row["number"], "search_drop": row["drop"], "predicted_latency_ms": row["cost"],
              "predicted_speedup": dense_ms / row["cost"] if dense_ms else None}
             for row in report["trials"] if row["number"] in report["pareto"]]
    return {
        "environment": _environment(args), "seconds": round(seconds, 1), "meets_budget": result.meets_budget,
        "message": report["message"], "speedup": final.get("speedup"), "goal_speedup": 1.3,
        "goal_met": bool(result.meets_budget and (final.get("speedup") or 0) >= 1.3),
        "data": {"train_sentences": data["train_sentences"], "train_tokens": TRAIN_TOKENS, "group": GROUP,
                 "batch": BATCH, "median_tokens": data["median_tokens"],
                 "latency_batch_tokens": int(data["val"][0][0]["attention_mask"].shape[1]),
                 "scored": data["scored"], "splits": report.get("splits")},
        "dense": report["dense"], "final": report.get("final"), "deployment": report.get("deployment"),
        "front": sorted(front, key=lambda row: row["predicted_latency_ms"]),
        "attempts": report["attempts"], "timing": report.get("timing"), "warnings": report.get("warnings"),
        "trial_counts": report.get("trial_counts")}


def _number(value: Any, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(scale * value, spec)


def markdown(figures: Mapping[str, Any]) -> str:
    final = figures["final"] or {}
    env, dense, data = figures["environment"], figures["dense"], figures["data"]
    lines = [
        "# all-MiniLM-L6-v2, fine-tuned by feature distillation (lrsearch.compress)", "",
        f"{env['date']}, {env['cpu']}, {env['cores']} cores, one thread, torch {env['torch']}, "
        f"Python {env['python']}; {figures['seconds'] / 60:.0f} min in all. Fine-tuning: "
        f"{data['train_sentences']} docstring sentences (at most {data['train_tokens']} tokens), "
        f"{env['options']['epochs']} epochs at lr {env['options']['lr'] * env['options']['lr_scale']:g}, "
        f"cosine distillation; {env['options']['trials']} search trials.", "",
        f"Verdict: {figures['message']}", ""]
    if final:
        interval = final.get("verify_drop_interval")
        spread = "n/a: the metric has no per-sample hits" if interval is None else \
            f"{100 * interval[0]:.2f} to {100 * interval[1]:.2f}"
        lines += [
            "| | original | compressed |", "|---|---|---|",
            f"| latency at batch {data['batch']} ({data['latency_batch_tokens']} tokens; ms, interleaved) | "
            f"{_number(dense.get('latency_ms'), '.1f')} | {_number(final.get('latency_ms'), '.1f')} |",
            f"| speedup, measured (predicted) | 1 | **{_number(final.get('speedup'), '.3f')}x** "
            f"({_number(final.get('predicted_speedup'), '.3f')}x) |",
            f"| NN agreement on test | {_number(dense.get('verify_metric'), '.2f', 100)} % | "
            f"{_number(final.get('verify_metric'), '.2f', 100)} % |",
            f"| test drop (95 % interval) | | {_number(final.get('verify_drop'), '.2f', 100)} points ({spread}) |",
            f"| parameters | {dense['params']:,} | {final['params']:,} |", ""]
    if figures.get("front"):
        lines += ["The search's front (before fine-tuning; speedups predicted by the latency table):", "",
                  "| trial | predicted speedup | search drop (points) |", "|---|---|---|"]
        lines += [f"| {row['trial']} | {_number(row['predicted_speedup'], '.3f')}x | {100 * row['search_drop']:.2f} |"
                  for row in figures["front"]]
        lines.append("")
    lines += ["Fine-tuned candidates, in the order the bisection of the search's front tried them:", "",
              "| trial | search drop (points) | selection drop after fine-tuning (points) | holds |",
              "|---|---|---|---|"]
    for attempt in figures["attempts"]:
        lines.append(f"| {attempt['trial']} | {100 * attempt['search_drop']:.2f} | {100 * attempt['select_drop']:.2f} "
                     f"| {attempt['meets_budget']} |")
    goal = "met" if figures["goal_met"] else "missed"
    lines += ["", f"Goal (speedup >= {figures['goal_speedup']}x within the 0.5-point budget on held-out sentences): "
              f"**{goal}**.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="0.5%")
    parser.add_argument("--trials", type=int, default=60, help="search trials (default 60)")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs per candidate (default 2)")
    parser.add_argument("--lr", type=float, default=1e-4, help="the module's own AdamW learning rate (default 1e-4)")
    parser.add_argument("--lr-scale", type=float, default=0.1, help="FinetuneConfig.lr_scale (default 0.1, lrsearch's)")
    parser.add_argument("--train-sentences", type=int, default=2048, help="docstring sentences to fine-tune on")
    parser.add_argument("--dropout", action=argparse.BooleanOptionalAction, default=False,
                        help="keep the encoder's dropout in the fine-tune (default: off, to match features exactly)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", type=Path, metavar="JSON", help="only rewrite the Markdown next to a results JSON")
    parser.add_argument("--probe", action="store_true", help="only time one fine-tune and one evaluation")
    parser.add_argument("--probe-ranks", type=int, nargs="+", default=[128])
    parser.add_argument("--probe-lrs", type=float, nargs="+", default=[1e-4])
    parser.add_argument("--probe-ffn-only", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    if args.render is not None:
        args.render.with_suffix(".md").write_text(markdown(json.loads(args.render.read_text())))
        return None
    if _minilm.minilm_available() is not None:
        raise SystemExit(f"MiniLM benchmark skipped: {_minilm.minilm_available()}")
    if args.probe:
        probe(args)
        return None
    figures = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "minilm_finetuned.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    (args.out / "minilm_finetuned.md").write_text(markdown(figures))
    _log.info("%s", figures["message"])
    return figures


if __name__ == "__main__":
    main()
