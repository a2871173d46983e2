"""Time the final architectures of ``finetuned.py`` again, in more interleaved rounds.

Latency depends on a model's shapes, not on its weights, so the hand method's and lrsearch's
final models can be rebuilt from plain-SVD factors of the trained model at their ranks and timed
without walking any ladder. ``finetuned.py`` times its models in 7 rounds; when the machine is
busy (the rounds spread by more than 20 %) this gives a second, longer look. The allocations are
those of the committed ``results/finetuned.json`` run.

Run from the repository root (about 2 min)::

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/shapes_latency.py --rounds 21
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import lrsearch
from benchmarks.finetuned import _module
from lrsearch.measure import compare_latency

RESULTS = Path(__file__).resolve().parent / "results"
ALLOCATIONS: dict[str, dict[str, dict[str, int]]] = {
    "mlp": {"uniform rank 32 (hand method)": {"net.layers.fc1": 32, "net.layers.fc2": 32, "net.layers.fc3": 32},
            "lrsearch (trial 106)": {"net.layers.fc1": 32, "net.layers.fc2": 32, "net.layers.fc3": 16}},
    "cnn": {"uniform rank 16 (hand method)": {"net.features.conv2": 16, "net.features.conv3": 16,
                                              "net.classifier.fc1": 16},
            "lrsearch (trial 101)": {"net.features.conv2": 16, "net.features.conv3": 8, "net.classifier.fc1": 16}},
}


def run(arch: str, rounds: int) -> dict[str, Any]:
    module = _module(arch)
    decomposition = lrsearch.Decomposition(module, method="svd")
    models = {"dense": module,
              **{label: decomposition.build(dict(ranks)) for label, ranks in ALLOCATIONS[arch].items()}}
    x = torch.randn(256, 40, generator=torch.Generator().manual_seed(0))
    comparison = compare_latency(models, {1: x[:1], 256: x}, device="cpu", threads=1, rounds=rounds)
    hand, ours = list(ALLOCATIONS[arch])
    return {"arch": arch, "rounds": rounds, "latency": comparison.to_dict(), "busy": comparison.busy,
            "lrsearch_over_hand": {size: round(comparison.speedup(ours, hand, size), 3) for size in (1, 256)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--out", type=Path, default=RESULTS / "shapes_latency.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [run(arch, args.rounds) for arch in ALLOCATIONS]
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    for result in results:
        print(f"{result['arch']}: lrsearch's model against the hand method's {result['lrsearch_over_hand']} "
              f"(speedup by batch size; rounds spread more than 20 %: {result['busy']})")


if __name__ == "__main__":
    main()
