"""Putting replacement modules into a model, either in place or into a fresh copy.

Both paths go through :func:`_install`, which also disables fused fast paths that read a
replaced layer's ``.weight`` directly (``nn.TransformerEncoderLayer`` in eval mode does).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["clone_with", "install"]

_FUSED_PARENTS: tuple[type[nn.Module], ...] = (nn.TransformerEncoderLayer,)


def _keep_module_path(_module: nn.Module, _args: tuple[Any, ...]) -> None:
    """A no-op pre-hook. Its presence makes ``TransformerEncoderLayer`` skip its fused kernel,
    which would read ``linear1.weight``/``linear2.weight`` that a low-rank layer no longer has."""
    return None


def _install(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    module.train(getattr(parent, child).training)
    setattr(parent, child, module)
    if isinstance(parent, _FUSED_PARENTS):
        module.register_forward_pre_hook(_keep_module_path)
        _disable_nested_tensor(model, parent_name)


def _disable_nested_tensor(model: nn.Module, layer_name: str) -> None:
    """A ``TransformerEncoder`` holding the layer must not take its nested-tensor fast path either."""
    parts = layer_name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        ancestor = model.get_submodule(".".join(parts[:depth])) if depth else model
        if isinstance(ancestor, nn.TransformerEncoder):
            ancestor.use_nested_tensor = False


def install(model: nn.Module, replacements: Mapping[str, nn.Module]) -> nn.Module:
    """Replace modules of ``model`` in place; the caller has validated every name beforehand."""
    for name, module in replacements.items():
        _install(model, name, module)
    return model


def clone_with(model: nn.Module, replacements: Mapping[str, nn.Module]) -> nn.Module:
    """A deep copy of ``model`` with ``replacements`` in place of the named modules.

    The replaced modules are never copied (the deepcopy memo maps them straight to their
    replacements), so building a compressed model does not duplicate dense weights.
    """
    memo: dict[int, Any] = {}
    for name, new in replacements.items():
        original = model.get_submodule(name)
        new.train(original.training)
        memo[id(original)] = new
    clone = copy.deepcopy(model, memo)
    for name, module in replacements.items():
        _install(clone, name, module)
    return clone
