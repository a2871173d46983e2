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
import stat
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


def defines_training_step(module: object) -> bool:
    """Whether ``module``'s class writes its own ``training_step`` (an embedding model may have none)."""
    return type(module).training_step is not namespace_of(module).LightningModule.training_step


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


_NOT_REGULAR = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"))
# torch.save's zip archive; the pickle (protocol 2 or later) of torch before 1.6 and of _use_new_zipfile_serialization=False
_ZIP_MAGIC, _PICKLE_MAGIC = b"PK\x03\x04", b"\x80"
_EXPECTED_CHECKPOINT = "a file written by Lightning (trainer.save_checkpoint, ModelCheckpoint) or torch.save"


def _check_checkpoint_file(path: Path) -> None:
    """Say what ``path`` is when it is no checkpoint file: missing, a folder, a device, empty."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise RecipeError(format_problem(
            f"checkpoint not found: {path}", expected=_EXPECTED_CHECKPOINT,
            hint=f"check the path (a relative one starts in {Path.cwd()}).")) from None
    except OSError as error:  # a parent that is not a folder, no search permission, a name too long
        raise RecipeError(format_problem(f"cannot reach the checkpoint {path}: {error.strerror or error}",
                                         expected=_EXPECTED_CHECKPOINT)) from error
    if stat.S_ISDIR(mode):
        inside = sorted(str(child) for child in path.glob("*.ckpt"))[:3]
        raise RecipeError(format_problem(
            f"checkpoint {path} is a folder, not a file", expected=_EXPECTED_CHECKPOINT,
            hint=f"pass one of the checkpoints in it: {', '.join(inside)}." if inside else
            "pass the checkpoint file itself, not the folder that holds it."))
    kind = next((what for test, what in _NOT_REGULAR if test(mode)), None)
    if kind is not None:
        raise RecipeError(format_problem(f"checkpoint {path} is not a regular file but {kind}",
                                         expected=_EXPECTED_CHECKPOINT, hint="pass the checkpoint file itself."))
    if path.stat().st_size == 0:
        raise RecipeError(format_problem(f"checkpoint {path} is empty (0 bytes)", expected=_EXPECTED_CHECKPOINT,
                                         hint="a write that failed or was cut short leaves an empty file; "
                                              "pass the checkpoint again from where it was saved."))


def _check_torch_save_format(path: Path, head: bytes) -> None:
    """torch.save writes a zip archive (a pickle before torch 1.6): anything else is some other file."""
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)):
        raise RecipeError(format_problem(
            f"{path} is not a checkpoint: it was not written by torch.save", expected=_EXPECTED_CHECKPOINT,
            given=f"a file that begins with {head!r}",
            hint="pass the .ckpt file Lightning saved; a config or log file is no checkpoint."))


def load_weights(module: nn.Module, path: str | os.PathLike[str]) -> None:
    """Weights of a Lightning checkpoint (``state_dict`` key) or a plain state_dict file, loaded strictly.

    A checkpoint lrsearch wrote for a compressed module restructures ``module`` first. Every
    way the file can be unusable is a :class:`~lrsearch.RecipeError` naming the file.
    """
    path = Path(path)
    _check_checkpoint_file(path)
    try:
        with path.open("rb") as handle:
            _check_torch_save_format(path, handle.read(16))
            handle.seek(0)
            checkpoint = torch.load(handle, map_location="cpu", weights_only=True)
    except PermissionError as error:
        raise RecipeError(format_problem(
            f"cannot read the checkpoint {path}: permission denied",
            hint="make the file readable by this user (chmod u+r), or pass a copy you can read.")) from error
    except RecipeError:
        raise
    except Exception as error:  # torch raises many types for unreadable files; all mean "cannot read"
        first_line = str(error).splitlines()[0] if str(error) else repr(error)
        raise RecipeError(f"cannot read the checkpoint {path}: it is truncated or corrupted ({first_line})") \
            from error
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RecipeError(format_problem(
            f"{path} is neither a Lightning checkpoint nor a state_dict",
            expected="a dict of tensors, or a dict whose 'state_dict' holds them",
            given=f"a {type(checkpoint).__qualname__}" if state is None else "a dict whose values are not all tensors",
            hint="pass the checkpoint Lightning saved (a .ckpt file), or torch.save(model.state_dict(), path)."))
    if CHECKPOINT_KEY in checkpoint:
        on_load_checkpoint(module, checkpoint)  # an already-compressed checkpoint: restructure first
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:400]
        raise RecipeError(f"the checkpoint {path} does not fit {type(module).__qualname__}: {detail}") from error
    module.eval()
