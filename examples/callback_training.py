"""A normal Lightning training script; ``lrsearch.RankSearch`` compresses the model when it ends.

    python examples/callback_training.py            # 20 epochs, 60 trials: about 2 minutes on 2 cores
    python examples/callback_training.py --small    # or LRSEARCH_SMALL=1: a quick check

The callback runs after ``trainer.fit`` has written every checkpoint of the dense model: it
searches per-layer ranks, fine-tunes the best candidates with distillation, verifies the drop on
the test split (never seen by the search) and saves the compressed model into ``--run-dir``.
"""

from __future__ import annotations

import argparse
import os

import pytorch_lightning as pl

import lrsearch
from lrsearch.demo.lightning import Mnist1dClassifier, Mnist1dDataModule


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", default=os.environ.get("LRSEARCH_SMALL") == "1",
                        help="2 epochs, 6 trials scored by MACs (no latency table), 1 fine-tuning epoch "
                             "(also LRSEARCH_SMALL=1)")
    parser.add_argument("--run-dir", default="lrsearch-runs/callback-example")
    args = parser.parse_args()
    epochs, trials, finetune_epochs = (2, 6, 1) if args.small else (20, 60, 2)
    objective = "macs" if args.small else "latency"     # latency: a per-layer table measured on this CPU

    pl.seed_everything(0)
    model, data = Mnist1dClassifier(), Mnist1dDataModule(batch_size=128)
    rank_search = lrsearch.RankSearch(
        "0.5%", run_dir=args.run_dir,
        search={"n_trials": trials, "objective": objective, "threads": 1},  # lrsearch.SearchConfig fields
        finetune={"epochs": finetune_epochs, "progress": False})            # lrsearch.FinetuneConfig fields
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[rank_search], default_root_dir=args.run_dir,
                         logger=False, enable_progress_bar=not args.small, accelerator="cpu")
    trainer.fit(model, datamodule=data)

    result = rank_search.result                 # a lrsearch.CompressionResult
    print(result.report["message"])
    if result.meets_budget:
        final = result.report["final"]
        print(f"ranks {result.ranks}; {final['speedup']:.2f}x faster (measured), "
              f"{result.report['dense']['params'] / final['params']:.2f}x fewer parameters")
    for name, path in result.paths.items():
        print(f"{name:12} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
