"""Time to first trial: calibration, decomposition and the latency table on ResNet-18 and BERT-base shapes.

Before the first Optuna trial, a search calibrates (one pass collecting each layer's input
statistics), decomposes every target layer once (SVD, or whitened SVD), and measures the
latency table. This script times the three steps for both methods on random-weight models
with real architectures: a torchvision-shaped ResNet-18 (BasicBlocks, 3×64×64 inputs) and a
BERT-base (transformers ``BertConfig`` defaults, sequence length 128). Nothing is downloaded.

``--input-route MODEL ...`` also times those models' whitened decomposition through the
input-side square root that lrsearch used for every layer before the output-side route for
wide layers existed (the "before" figure of the whitening speed-up).

Run: ``OMP_NUM_THREADS=2 python benchmarks/first_trial.py [--models resnet18 bert_base] [--input-route resnet18]``.
Writes ``benchmarks/results/first_trial.json`` (``first_trial_<models>.json`` for a subset).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

import lrsearch
from lrsearch.core import _factors
from lrsearch.measure import build_latency_table

RESULTS = Path(__file__).parent / "results"
TABLE = {"min_run_time": 0.005, "repeats": 1, "multiple": 8}


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3×3 convs, a 1×1 strided projection when the shape changes."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                         nn.BatchNorm2d(channels))
                           if stride != 1 or in_channels != channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """torchvision's ``resnet18`` layout (module names included), random weights."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, stages, in_channels = (64, 128, 256, 512), [], 64
        for index, channels in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(in_channels, channels, 1 if index == 0 else 2),
                                        BasicBlock(channels, channels, 1)))
            in_channels = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def _resnet18() -> tuple[nn.Module, list[Any], str]:
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 3, 64, 64, generator=generator) for _ in range(3)]
    return ResNet18().eval(), batches, "3 batches of 16 images, 3×64×64"


def _bert_base() -> tuple[nn.Module, list[Any], str]:
    import transformers

    model = transformers.BertModel(transformers.BertConfig()).eval()
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 30522, (4, 128), generator=generator)} for _ in range(2)]
    return model, batches, "2 batches of 4 sequences, 128 tokens"


MODELS: dict[str, Callable[[], tuple[nn.Module, list[Any], str]]] = {"resnet18": _resnet18, "bert_base": _bert_base}


@contextmanager
def _input_route_only() -> Iterator[None]:
    """Every whitened layer through the input-side square root (lrsearch's only route before)."""
    with mock.patch.object(_factors, "whitening_route", lambda out_features, in_features: "input"):
        yield


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def _decompose(decomposition: lrsearch.Decomposition) -> tuple[float, dict[str, float]]:
    per_layer = {}
    for name in decomposition.targets:
        _, per_layer[name] = _timed(lambda name=name: decomposition.factors(name))
    return sum(per_layer.values()), per_layer


def _slowest(per_layer: dict[str, float], count: int = 4) -> dict[str, float]:
    return {name: round(seconds, 2) for name, seconds in sorted(per_layer.items(), key=lambda kv: -kv[1])[:count]}


def run_model(key: str, *, input_route: bool, threads: int) -> dict[str, Any]:
    model, batches, data = MODELS[key]()
    figures: dict[str, Any] = {"data": data, "targets": None, "load_before": os.getloadavg()[0]}
    routes = [("svd", False), ("whitened", False)] + ([("whitened", True)] if input_route else [])
    whitened = None
    for method, forced in routes:
        label = "whitened_input_route" if forced else method
        with _input_route_only() if forced else nullcontext():
            decomposition, calibration = _timed(lambda: lrsearch.Decomposition(model, method=method,
                                                                                 calibration=batches))
            seconds, per_layer = _decompose(decomposition)
        figures["targets"] = len(decomposition.targets)
        figures[label] = {"calibration_s": round(calibration, 2), "decomposition_s": round(seconds, 2),
                          "slowest_layers_s": _slowest(per_layer)}
        print(f"{key} {label}: calibration {calibration:.1f} s, decomposition {seconds:.1f} s", flush=True)
        if label == "whitened":
            whitened = decomposition
    assert whitened is not None
    table, seconds = _timed(lambda: build_latency_table(whitened, batches[0], threads=threads, **TABLE))
    measured = sum(1 + sum(len(r) for r in layer.factorized.values()) for layer in table.layers.values())
    figures["latency_table"] = {"seconds": round(seconds, 1), "measurements": measured, **TABLE,
                                "batch_size": table.batch_size}
    print(f"{key} latency table: {seconds:.1f} s for {measured} layer timings", flush=True)
    figures["coverage"] = {"param_share": whitened.coverage().param_share}
    for method in ("svd", "whitened"):
        figures[method]["first_trial_s"] = round(figures[method]["calibration_s"] + figures[method]["decomposition_s"]
                                                 + seconds, 1)
    figures["whitened_over_svd_decomposition"] = round(
        figures["whitened"]["decomposition_s"] / figures["svd"]["decomposition_s"], 2)
    figures["load_after"] = os.getloadavg()[0]
    return figures


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--input-route", nargs="*", choices=sorted(MODELS), default=[],
                        help="models whose whitened decomposition is also timed through the input-side route")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(),
                    "threads": args.threads, "torch": torch.__version__, "lrsearch": lrsearch.__version__,
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "latency_table_settings": TABLE,
        "models": {key: run_model(key, input_route=key in args.input_route, threads=args.threads)
                   for key in args.models},
    }
    RESULTS.mkdir(exist_ok=True)
    name = "first_trial.json" if set(args.models) == set(MODELS) else f"first_trial_{'_'.join(args.models)}.json"
    (RESULTS / name).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
