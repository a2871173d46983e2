"""Batch plumbing shared by calibration and evaluation: devices, modes, forward calls."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["LABELS", "ForwardFn", "batch_size_of", "default_forward", "describe", "evaluating", "model_device",
           "move_to_device", "output_field", "split_labels"]

ForwardFn = Callable[[nn.Module, Any], Any]

LABELS = "labels"
"""The key of a dict batch that holds the targets (the Hugging Face convention)."""


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless model)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside nested tuples, lists and dicts to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(value, device) for value in batch)
    return batch


def split_labels(batch: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """``(inputs, labels)`` of a dict batch: every entry but ``labels``, and ``labels`` (or None)."""
    inputs = {key: value for key, value in batch.items() if key != LABELS}
    return inputs, batch.get(LABELS)


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(batch)`` for a tensor, ``model(**inputs)`` for a dict, else ``model(batch[0])``.

    This matches the common ``(inputs, targets)`` DataLoader convention and the Hugging Face
    one (a dict or ``BatchEncoding`` whose ``labels`` are the targets). ``labels`` is left out
    of a dict's inputs: given labels, a Hugging Face model also computes its loss, which
    calibration, cost counting and timing must not pay for. Pass your own function for
    anything else.
    """
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**split_labels(batch)[0])
    if isinstance(batch, (list, tuple)) and batch:
        return model(batch[0])
    raise TypeError(f"cannot feed a batch of type {type(batch).__name__} to the model; "
                    "pass forward=lambda model, batch: ... to say how")


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore every submodule's own train/eval flag afterwards."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


def output_field(output: Any, name: str) -> Any:
    """``output[name]`` of a dict or ``ModelOutput``, ``output.name`` of another object, else None."""
    if isinstance(output, Mapping):
        return output.get(name)
    return getattr(output, name, None)


def describe(value: Any) -> str:
    """A short account of a batch or an output for error messages: types, keys and tensor shapes."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        kind = "dict" if type(value) is dict else type(value).__name__
        return f"a {kind} with " + (", ".join(f"{key}: {describe(item)}" for key, item in value.items())
                                    or "no entries")
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of [" + ", ".join(describe(item) for item in value) + "]"
    return f"a {type(value).__name__}"


def batch_size_of(batch: Any) -> int:
    """Number of samples in a batch laid out like :func:`default_forward` expects."""
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    if isinstance(first, Mapping):
        first = next(iter(first.values()))
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")
    return int(first.shape[0])
