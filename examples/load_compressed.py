"""Load a compressed model for inference, two ways, from the run folder `lrsearch tune` wrote.

    lrsearch tune --budget 0.5%                        # writes lrsearch-runs/tune
    python examples/load_compressed.py lrsearch-runs/tune
    python examples/load_compressed.py RUN --small      # or LRSEARCH_SMALL=1: 512 test samples, quick timing

1. ``lrsearch.load(RUN/model, Model())``: replays the saved recipe (which layers are factorized, at
   which rank) on a fresh instance of the original architecture, then loads the weights strictly.
   Works for any ``nn.Module``; nothing is unpickled but tensors.
2. ``Model.load_from_checkpoint(RUN/compressed.ckpt)``: Lightning's own loader, for modules that
   mix in ``lrsearch.LowRankCheckpointMixin``.

This script loads runs of the built-in default model (``Mnist1dClassifier``); for your own model,
use your own class in the same two calls.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

import lrsearch
from lrsearch.demo.lightning import Mnist1dClassifier, Mnist1dDataModule


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="folder written by `lrsearch tune`")
    parser.add_argument("--small", action="store_true", default=os.environ.get("LRSEARCH_SMALL") == "1",
                        help="evaluate on 512 test samples and time briefly (also LRSEARCH_SMALL=1)")
    args = parser.parse_args()
    if not (args.run_dir / "model").is_dir():
        print(f"{args.run_dir} holds no compressed model (did the run meet its budget? see its report.html). "
              "Make one with: lrsearch tune --budget 0.5%", file=sys.stderr)
        return 1

    # 1. Plain PyTorch: recipe + weights onto a fresh, uncompressed instance of the architecture.
    recipe = lrsearch.read_recipe(args.run_dir / "model")      # the recipe alone, e.g. to inspect ranks
    model = lrsearch.load(args.run_dir / "model", Mnist1dClassifier()).eval()
    # 2. Lightning: the checkpoint carries the recipe and the hyperparameters.
    from_ckpt = Mnist1dClassifier.load_from_checkpoint(args.run_dir / "compressed.ckpt").eval()

    data = Mnist1dDataModule()
    data.setup()
    x, y = data.splits.x_test, data.splits.y_test
    if args.small:
        x, y = x[:512], y[:512]
    dense = Mnist1dClassifier(pretrained=True).eval()
    with torch.inference_mode():
        outputs = {name: m(x) for name, m in (("original", dense), ("lrsearch.load", model),
                                              ("load_from_checkpoint", from_ckpt))}
    same = torch.allclose(outputs["lrsearch.load"], outputs["load_from_checkpoint"])
    print("factorized layers: " + ", ".join(f"{name} rank {entry['rank']}" for name, entry in recipe["layers"].items()))
    print(f"both loaders give the same outputs: {same}")
    for name, logits in outputs.items():
        module = {"original": dense, "lrsearch.load": model, "load_from_checkpoint": from_ckpt}[name]
        accuracy = (logits.argmax(-1) == y).float().mean().item()
        print(f"{name:22} test accuracy {accuracy:.2%}  parameters {lrsearch.count_params(module):>9,}")

    from torch.utils import benchmark

    batch = x[:256]
    for name, module in (("original", dense), ("compressed", model)):
        timer = benchmark.Timer("m(b)", globals={"m": module, "b": batch}, num_threads=1)
        with torch.inference_mode():
            seconds = timer.blocked_autorange(min_run_time=0.05 if args.small else 0.5).median
        print(f"{name:22} {seconds * 1e3:.3f} ms per batch of {len(batch)} (1 thread)")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
