"""Fine-tune chosen allocations of the demo MLP and report each one's validation drop after fine-tuning.

What a per-layer allocation can gain over one uniform rank once both are fine-tuned, measured
directly: every allocation is built from plain-SVD factors (as lrsearch's fine-tunes start),
fine-tuned with ``FinetuneConfig()`` defaults and the same ``finetune`` code as
``finetuned.py``, and scored on all 8,000 validation samples, as the hand method chooses. Each
row also holds the drop *before* fine-tuning from plain-SVD and from whitened factors (the
search's), the proxies the descent can order its cuts by. No test split is used and nothing is
timed (MAC reductions only). This is the measurement behind ``lrsearch.study._descent`` and the
README's note on the 1.25x goal.

Run from the repository root (about 15 s per allocation on one thread)::

    OMP_NUM_THREADS=1 python benchmarks/allocations.py
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
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.utils.data import DataLoader, TensorDataset

import lrsearch
from benchmarks.finetuned import _loaders, _module
from lrsearch.measure import Evaluator
from lrsearch.pipeline import FinetuneConfig, finetune

RESULTS = Path(__file__).resolve().parent / "results"
PREFIX = "net.layers."
# fc1 is 40->512, fc2 and fc3 512->512; the head (512->10) stays dense. Uniform 32 is the hand
# method's model; the rest cut one layer further at a time, or two.
ALLOCATIONS: tuple[dict[str, int], ...] = (
    {"fc1": 32, "fc2": 32, "fc3": 32},
    {"fc1": 24, "fc2": 32, "fc3": 32},
    {"fc1": 16, "fc2": 32, "fc3": 32},
    {"fc1": 32, "fc2": 24, "fc3": 32},
    {"fc1": 32, "fc2": 32, "fc3": 24},
    {"fc1": 32, "fc2": 32, "fc3": 16},
    {"fc1": 32, "fc2": 32, "fc3": 8},
    {"fc1": 24, "fc2": 32, "fc3": 24},
    {"fc1": 24, "fc2": 32, "fc3": 16},
    {"fc1": 32, "fc2": 24, "fc3": 24},
    {"fc1": 32, "fc2": 24, "fc3": 16},
    {"fc1": 32, "fc2": 16, "fc3": 24},
    {"fc2": 32, "fc3": 16},
    {"fc2": 24, "fc3": 24},
    {"fc1": 24, "fc2": 24, "fc3": 24},
    {"fc1": 32, "fc2": 48, "fc3": 16},
    {"fc1": 32, "fc2": 48, "fc3": 8},
)


def run(allocations: tuple[dict[str, int], ...] = ALLOCATIONS) -> dict[str, Any]:
    module = _module("mlp")
    loaders = _loaders("mlp")
    splits, train = loaders["splits"], loaders["train"]
    val = Evaluator(DataLoader(TensorDataset(splits.x_val, splits.y_val), batch_size=512))
    base = val.evaluate(module).value
    decomposition = lrsearch.Decomposition(module, method="svd")
    calibration = [splits.x_train[i:i + 256] for i in range(0, 1024, 256)]
    whitened = lrsearch.Decomposition(module, method="whitened", calibration=calibration)
    sample = splits.x_val[:1]
    dense_macs = lrsearch.core.macs_per_sample(module, sample)
    rows = []
    for allocation in allocations:
        ranks = {PREFIX + name: rank for name, rank in allocation.items()}
        model = decomposition.build(dict(ranks))
        before = {"svd": round(100 * (base - val.evaluate(model).value), 3),
                  "whitened": round(100 * (base - val.evaluate(whitened.build(dict(ranks))).value), 3)}
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as root:
            tuned = finetune(model.train(), teacher=copy.deepcopy(module), root_dir=root,
                             config=FinetuneConfig(progress=False, accelerator="cpu"), train_dataloaders=train)
        drop = base - val.evaluate(tuned).value
        rows.append({"ranks": allocation, "val_drop_points": round(100 * drop, 3), "before_finetuning": before,
                     "mac_reduction": round(dense_macs / lrsearch.core.macs_per_sample(model, sample), 2),
                     "seconds": round(time.perf_counter() - started, 1)})
        logging.getLogger("benchmarks").info("%s: %+.2f points, %.2fx fewer MACs", allocation,
                                             rows[-1]["val_drop_points"], rows[-1]["mac_reduction"])
    return {"dense_val_accuracy": base, "finetune": FinetuneConfig().to_dict(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "allocations": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "allocations.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    result = run()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for row in result["allocations"]:
        print(f"{json.dumps(row['ranks']):40s} {row['val_drop_points']:+6.2f} points after fine-tuning, before: "
              f"svd {row['before_finetuning']['svd']:+6.2f}, whitened {row['before_finetuning']['whitened']:+6.2f}; "
              f"{row['mac_reduction']:5.2f}x fewer MACs")


if __name__ == "__main__":
    main()
