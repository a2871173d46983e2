"""Lightning helpers that work for both ``pytorch_lightning`` and ``lightning.pytorch``.

The two packages are separate copies: a ``lightning.pytorch`` module is not a
``pytorch_lightning.LightningModule`` and a Trainer rejects a module of the other package, so
everything here asks the object which package it came from instead of guessing by import.
Neither package is imported here: an object can only be a LightningModule of a package that is
already in ``sys.modules``.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import torch
from torch import nn

from lrsearch._errors import LrSearchError, RecipeError, format_problem
from lrsearch.core import CHECKPOINT_KEY, on_load_checkpoint

__all__ = ["NAMESPACES", "NotALightningModuleError", "clone_module", "is_lightning_module", "load_weights",
           "namespace_of"]

NAMESPACES: tuple[str, ...] = ("pytorch_lightning", "lightning.pytorch")

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class NotALightningModuleError(LrSearchError, TypeError):
    """An object that is not a LightningModule was given where Lightning must train it."""


def _namespace_or_none(obj: object) -> ModuleType | None:
    for name in NAMESPACES:
        namespace = sys.modules.get(name)
        if namespace is not None and isinstance(obj, namespace.LightningModule):
            return namespace
    return None


def is_lightning_module(obj: object) -> bool:
    """Whether ``obj`` is a LightningModule of either package; never imports one."""
    return _namespace_or_none(obj) is not None


def namespace_of(module: object) -> ModuleType:
    """The Lightning package (``pytorch_lightning`` or ``lightning.pytorch``) ``module`` belongs to.

    Use its ``Trainer`` and ``Callback``: a Trainer of the other package refuses the module.
    """
    namespace = _namespace_or_none(module)
    if namespace is None:
        raise NotALightningModuleError(format_problem(
            "Fine-tuning needs a LightningModule", expected="an instance of pytorch_lightning.LightningModule "
            "or lightning.pytorch.LightningModule", given=f"an object of type {type(module).__qualname__}",
            hint="wrap the model in a LightningModule with training_step and configure_optimizers, "
                 "or fine-tune a plain nn.Module with your own loop."))
    return namespace


def clone_module(module: ModuleT) -> ModuleT:
    """A deep copy of ``module`` that a fresh Trainer can fit, even if taken during a fit.

    Lightning's ``__getstate__`` already drops ``_trainer`` from a copy; any other reference to
    the attached Trainer (a user attribute, say) becomes ``None`` instead of a copy of the whole
    Trainer with its data. Every LightningModule in the copy also forgets the per-fit state that
    Lightning only clears at teardown: ``_metric_attributes`` is keyed by ``id()`` of the
    original's torchmetrics objects, so a copy taken before teardown (``on_fit_end``) would fail
    ``self.log(name, metric)`` with "Could not find the LightningModule attribute".
    """
    if not isinstance(module, nn.Module):
        raise TypeError(format_problem("clone_module copies a torch module", expected="an nn.Module",
                                       given=f"an object of type {type(module).__qualname__}"))
    memo: dict[int, Any] = {}
    for submodule in module.modules():
        trainer = submodule.__dict__.get("_trainer") if is_lightning_module(submodule) else None
        if trainer is not None:
            memo[id(trainer)] = None
    clone = copy.deepcopy(module, memo)
    lightning_modules: list[Any] = [submodule for submodule in clone.modules() if is_lightning_module(submodule)]
    for submodule in lightning_modules:
        submodule._metric_attributes = None
        submodule._current_fx_name = None
    return clone


def load_weights(module: nn.Module, path: str | os.PathLike[str]) -> None:
    """Weights of a Lightning checkpoint (``state_dict`` key) or a plain state_dict file, loaded strictly.

    A checkpoint lrsearch wrote for a compressed module restructures ``module`` first. Every
    way the file can be unusable is a :class:`~lrsearch.RecipeError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"checkpoint {path} is a folder, not a file" if path.is_dir()
                          else f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for unreadable files; all mean "cannot read"
        first_line = str(error).splitlines()[0] if str(error) else repr(error)
        raise RecipeError(f"cannot read the checkpoint {path}: it is truncated, corrupted or not written by "
                          f"torch.save ({first_line})") from error
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RecipeError(f"{path} is neither a Lightning checkpoint nor a state_dict.")
    if CHECKPOINT_KEY in checkpoint:
        on_load_checkpoint(module, checkpoint)  # an already-compressed checkpoint: restructure first
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:400]
        raise RecipeError(f"the checkpoint {path} does not fit {type(module).__qualname__}: {detail}") from error
    module.eval()
