"""Which factors should a fine-tune start from? Whitened and plain SVD, same ranks, same fine-tune.

Whitened SVD gives the best approximation before fine-tuning, so the search scores candidates
with it; this measures which starting point fine-tuning recovers best from. For each allocation
(layer=rank, on the MNIST-1D MLP), both decompositions build the model, and
``lrsearch.pipeline.finetune`` with the default ``FinetuneConfig()`` fine-tunes it; the drop is
scored on lrsearch's selection split (the last 75 % of validation), before and after.
On the MLP plain SVD won, which made it the start of ``RunSpec.finetune_from="auto"`` (the default),
until a fine-tune from it loses ground (as on all-MiniLM-L6-v2).

    OMP_NUM_THREADS=1 python benchmarks/finetune_init.py            # about 5 min on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import lrsearch
from benchmarks.finetuned import _loaders, _module
from lrsearch.measure import Evaluator
from lrsearch.pipeline import FinetuneConfig, RunSpec, finetune
from lrsearch.pipeline._data import calibration_batches

RESULTS = Path(__file__).resolve().parent / "results"
ALLOCATIONS = ("fc2=32,fc3=32", "fc1=32,fc2=32,fc3=32", "fc2=48,fc3=48", "fc1=24,fc2=48,fc3=32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allocations", nargs="+", default=list(ALLOCATIONS))
    parser.add_argument("--out", type=Path, default=RESULTS / "finetune_init.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    module, loaders = _module("mlp"), _loaders("mlp")
    with tempfile.TemporaryDirectory() as run_dir:
        data = RunSpec(run_dir=run_dir).resolve().data(train_dataloaders=loaders["train"],
                                                       val_dataloaders=loaders["val"],
                                                       test_dataloaders=loaders["test"])
    select = Evaluator(data.select)
    base = select.evaluate(module).value
    calibration = calibration_batches(data.train, data.search)
    rows = []
    for method in ("whitened", "svd"):
        decomposition = lrsearch.Decomposition(module, method=method, calibration=calibration)
        for allocation in args.allocations:
            ranks = {f"net.layers.{name}": int(rank) for name, rank in
                     (entry.split("=") for entry in allocation.split(","))}
            built = decomposition.build(ranks)
            before = base - select.evaluate(built).value
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as root:
                tuned = finetune(built.train(), teacher=copy.deepcopy(module), root_dir=root,
                                 config=FinetuneConfig(progress=False, accelerator="cpu"),
                                 train_dataloaders=data.train)
            after = base - select.evaluate(tuned).value
            rows.append({"method": method, "allocation": allocation, "drop_before": before, "drop_after": after,
                         "finetune_seconds": round(time.perf_counter() - started, 1)})
            print(f"{method:9s} {allocation:22s} drop before {100 * before:6.2f}  after {100 * after:6.2f} points",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "selection_samples": sum(len(b[1]) for b in data.select),
                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
