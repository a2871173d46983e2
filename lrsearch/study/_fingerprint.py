"""The model a study was searched on: its target layers' names, types, shapes and weights.

A resumed study must see the same model, or its trials (ranks per layer, drops measured on
that model) mean nothing. The study stores a fingerprint on first use, and a resume on another
model fails with a message that says *model*; only with the same model does a different
baseline mean different *data*.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
import torch

from lrsearch._errors import LrSearchError, format_problem
from lrsearch.core import Decomposition

__all__ = ["KEY", "check_same_model", "model_fingerprint"]

KEY = "lrsearch:model"
_TOLERANCE = 1e-8  # of a layer's weight norm; float64 sums of the same weights differ by about 1e-15
_GOLDEN = (math.sqrt(5) - 1) / 2


def _weight_figures(weight: torch.Tensor, *, chunk: int = 1 << 20) -> tuple[float, float]:
    """The weight's norm and a projection on a fixed direction: equal for equal weights on any device.

    The direction is computed, not drawn: CPU and CUDA generators give different numbers for a
    seed. In chunks, so that a large layer needs no float64 copy of itself on its device.
    """
    flat = weight.detach().flatten()
    if flat.device.type == "mps":  # no float64 there
        flat = flat.cpu()
    square = projection = 0.0
    for start in range(0, flat.numel(), chunk):
        part = flat[start:start + chunk].double()
        index = torch.arange(start, start + part.numel(), device=part.device, dtype=torch.float64)
        square += float(part @ part)
        projection += float(part @ torch.cos(index * _GOLDEN))
    return math.sqrt(square), projection


def model_fingerprint(decomposition: Decomposition) -> dict[str, dict[str, Any]]:
    """Per target layer: its type, weight shape, weight norm and weight projection."""
    fingerprint = {}
    for name in decomposition.targets:
        module = decomposition.module(name)
        weight = module.weight
        norm, projection = _weight_figures(weight)
        fingerprint[name] = {"type": type(module).__name__, "shape": list(weight.shape),
                             "norm": norm, "projection": projection}
    return fingerprint


def _layout(layer: dict[str, Any]) -> str:
    return f"{layer['type']} {layer['shape']}"


def _other_layers(stored: dict[str, Any], given: dict[str, Any]) -> str | None:
    differences = [f"{name}: {_layout(stored[name])} in the study, {_layout(given[name])} here"
                   for name in stored if name in given and _layout(stored[name]) != _layout(given[name])]
    only_stored, only_given = [n for n in stored if n not in given], [n for n in given if n not in stored]
    if only_stored:
        differences.append(f"only in the study: {', '.join(only_stored[:4])}")
    if only_given:
        differences.append(f"only here: {', '.join(only_given[:4])}")
    return "; ".join(differences[:4]) or None


def _other_weights(stored: dict[str, Any], given: dict[str, Any]) -> list[str]:
    return [name for name, layer in stored.items()
            if any(abs(layer[key] - given[name][key]) > _TOLERANCE * max(layer["norm"], 1e-12)
                   for key in ("norm", "projection"))]


def check_same_model(study: optuna.Study, decomposition: Decomposition) -> None:
    """Record the model's fingerprint in a new study; in a resumed one, refuse another model.

    Raises:
        LrSearchError: the study was searched on a model with other target layers or weights.
    """
    given = model_fingerprint(decomposition)
    stored = study.user_attrs.get(KEY)
    if stored is None:
        study.set_user_attr(KEY, given)
        return
    hint = "resume with the model (and checkpoint) the study was searched on, or use a new study_name."
    layers = _other_layers(stored, given)
    if layers is not None:
        raise LrSearchError(format_problem(
            f"Study {study.study_name!r} was searched on another model", given=f"other target layers ({layers})",
            hint=hint.replace("(and checkpoint)", "and target_modules")))
    weights = _other_weights(stored, given)
    if weights:
        raise LrSearchError(format_problem(
            f"Study {study.study_name!r} was searched on a model with other weights",
            given=f"other weights in {len(weights)} of {len(stored)} target layers ({', '.join(weights[:4])})",
            hint=hint))
