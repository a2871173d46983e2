"""Save and load compressed models as a plain state_dict plus a JSON recipe.

Nothing is pickled but tensors: ``load`` replays the recipe (which layers are low-rank, with
which scheme and rank) on a fresh instance of the original architecture, then loads the
weights strictly. The same recipe travels inside Lightning checkpoints under ``"lrsearch"``.

On disk a saved model is a folder::

    recipe.json             # format, versions, per-layer scheme and rank, weights file + sha256
    weights-<sha12>.pt      # torch.save of the state_dict (tensors only)

The weights file is named by its content and the recipe is written last, so an interrupted
save leaves the previous save loadable and never a mismatched pair.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrsearch._atomic import atomic_write_bytes, atomic_write_json
from lrsearch._errors import RecipeError, format_problem
from lrsearch._version import __version__
from lrsearch.core._kinds import HOSTS, KINDS, host_for_explicit, host_of, kind_for_low_rank, kind_of
from lrsearch.core._surgery import install

__all__ = [
    "CHECKPOINT_KEY",
    "LowRankCheckpointMixin",
    "RECIPE_FILE",
    "apply_recipe",
    "get_recipe",
    "load",
    "on_load_checkpoint",
    "on_save_checkpoint",
    "read_recipe",
    "save",
]

RECIPE_FILE = "recipe.json"
CHECKPOINT_KEY = "lrsearch"
FORMAT = "lrsearch.recipe"
FORMAT_VERSION = 1


def get_recipe(model: nn.Module) -> dict[str, Any]:
    """The JSON-serializable structure of every low-rank layer in ``model`` (primitive types only)."""
    layers: dict[str, Any] = {}
    for name, module in model.named_modules():
        kind = kind_for_low_rank(module) or host_for_explicit(module)
        if kind is not None:
            layers[name] = kind.recipe_entry(module)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "lrsearch_version": __version__,
            "layers": layers}


def _check_recipe(recipe: Any, *, source: str) -> Mapping[str, Any]:
    if not isinstance(recipe, Mapping) or recipe.get("format") != FORMAT:
        raise RecipeError(format_problem(f"{source} is not an lrsearch recipe",
                                         expected=f"a mapping with format={FORMAT!r}"))
    version = recipe.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise RecipeError(format_problem(
            f"{source} has recipe format version {version!r}", expected=f"<= {FORMAT_VERSION}",
            hint=f"it was written by lrsearch {recipe.get('lrsearch_version')}; upgrade lrsearch."))
    layers = recipe.get("layers")
    if not isinstance(layers, Mapping):
        raise RecipeError(format_problem(f"{source} has no 'layers' mapping"))
    return layers


def _plan(model: nn.Module, layers: Mapping[str, Any], *, source: str) -> dict[str, nn.Module]:
    """Validate every recipe entry against ``model`` and build (not install) the replacements.

    Entries are planned outer first: a layer inside a converted host (``attn.in_proj`` inside
    ``attn``) is put into the host's replacement, so the plan holds top-level replacements only.
    """
    modules = dict(model.named_modules())
    plan: dict[str, nn.Module] = {}
    for name in sorted(layers, key=lambda layer: layer.count(".")):
        entry = layers[name]
        if name not in modules:
            raise RecipeError(format_problem(
                f"{source} names layer {name!r}, which the model does not have",
                hint="pass a fresh instance of the architecture that was compressed."))
        dense = modules[name]
        try:
            replacement = _replacement(dense, entry)
        except (KeyError, TypeError, ValueError) as error:
            raise RecipeError(format_problem(
                f"{source} entry for layer {name!r} does not fit the model: {error}",
                given=f"{type(dense).__name__} in the model, recipe entry {entry!r}",
                hint="pass a fresh instance of the architecture that was compressed.")) from error
        owner = next((outer for outer in plan if name.startswith(outer + ".")), None)
        if owner is None:
            plan[name] = replacement
        else:
            parent, _, child = name.rpartition(".")
            setattr(plan[owner].get_submodule(parent[len(owner) + 1:]), child, replacement)
        modules.update({f"{name}.{sub}" if sub else name: module for sub, module in replacement.named_modules()})
    return plan


def _replacement(dense: nn.Module, entry: Mapping[str, Any]) -> nn.Module:
    fitting = [kind.label for kind in (*KINDS, *HOSTS) if kind.recipe_type == entry["type"]]
    if not fitting:
        raise ValueError(f"unknown layer type {entry['type']!r}")
    kind = kind_of(dense) or host_of(dense)
    if kind is None or kind.recipe_type != entry["type"]:
        raise TypeError(f"expected {' or '.join(fitting)} for a {entry['type']!r} entry, "
                        f"found {type(dense).__name__}")
    return kind.rebuild(dense, entry)


@torch.inference_mode(False)
def apply_recipe(model: nn.Module, recipe: Mapping[str, Any]) -> nn.Module:
    """Give ``model`` (a fresh, dense instance) the low-rank structure the recipe describes.

    Modifies ``model`` in place and returns it; the new layers hold untrained weights until a
    state_dict is loaded. Every entry is validated before any layer is replaced.
    """
    plan = _plan(model, _check_recipe(recipe, source="the recipe"), source="the recipe")
    return install(model, plan)


def _expected_shapes(model: nn.Module, plan: Mapping[str, nn.Module]) -> dict[str, tuple[int, ...]]:
    replaced = tuple(name + "." for name in plan)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()
              if not key.startswith(replaced)}
    for name, module in plan.items():
        shapes.update({f"{name}.{key}": tuple(value.shape) for key, value in module.state_dict().items()})
    return shapes


def save(model: nn.Module, path: str | os.PathLike[str], *,
         metadata: Mapping[str, Any] | None = None) -> Path:
    """Save ``model`` into the folder ``path`` (created if needed) as recipe + state_dict.

    ``metadata`` (JSON-serializable) is stored in the recipe, e.g. accuracy figures. Returns
    the folder. Writes are atomic; an existing save in the folder stays loadable until the new
    recipe replaces it.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise RecipeError(format_problem(f"Cannot save into {folder}: it is a file",
                                         expected="a folder path (created if missing)"))
    recipe: dict[str, Any] = get_recipe(model)
    recipe["metadata"] = json.loads(json.dumps(dict(metadata or {})))
    state = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    weights_name = f"weights-{digest[:12]}.pt"
    recipe["weights"] = {"file": weights_name, "sha256": digest, "bytes": len(data)}
    atomic_write_bytes(folder / weights_name, data)
    atomic_write_json(folder / RECIPE_FILE, recipe)
    for stale in folder.glob("weights-*.pt"):
        if stale.name != weights_name:
            stale.unlink(missing_ok=True)
    return folder


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``recipe.json`` of a saved model folder."""
    recipe_path = Path(path) / RECIPE_FILE
    if not recipe_path.is_file():
        raise RecipeError(format_problem(
            f"No lrsearch model at {Path(path)}: {RECIPE_FILE} is missing",
            expected="a folder written by lrsearch.save", hint="check the path."))
    try:
        recipe = json.loads(recipe_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecipeError(format_problem(f"{recipe_path} is corrupted or truncated: {error}",
                                         hint="save the model again.")) from error
    _check_recipe(recipe, source=str(recipe_path))
    return recipe


@torch.inference_mode(False)
def load(path: str | os.PathLike[str], model: nn.Module, *,
         map_location: str | torch.device | None = None) -> nn.Module:
    """Rebuild a saved compressed model on ``model``, a fresh instance of the original architecture.

    ``model`` is modified in place and returned only once the recipe and every tensor shape
    have been checked; on any mismatch it is left untouched and a :class:`RecipeError` names
    what does not fit.
    """
    folder = Path(path)
    recipe = read_recipe(folder)
    weights = recipe.get("weights") or {}
    weights_path = folder / str(weights.get("file", ""))
    if not weights.get("file") or not weights_path.is_file():
        raise RecipeError(format_problem(f"The weights file of {folder} is missing",
                                         expected=f"{weights_path.name} beside {RECIPE_FILE}"))
    data = weights_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != weights.get("sha256"):
        raise RecipeError(format_problem(
            f"{weights_path} is corrupted or truncated: its sha256 does not match {RECIPE_FILE}",
            given=f"{len(data)} bytes, recipe says {weights.get('bytes')}", hint="save the model again."))
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location or "cpu", weights_only=True)
    except Exception as error:
        raise RecipeError(format_problem(f"Cannot read {weights_path}: {error}")) from error
    plan = _plan(model, recipe["layers"], source=str(folder / RECIPE_FILE))
    _check_state(state, _expected_shapes(model, plan), source=str(weights_path))
    install(model, plan)
    model.load_state_dict(state, strict=True)
    return model


def _check_state(state: Any, expected: Mapping[str, tuple[int, ...]], *, source: str) -> None:
    if not isinstance(state, Mapping):
        raise RecipeError(format_problem(f"{source} does not hold a state_dict"))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(key for key in set(expected) & set(state)
                   if tuple(state[key].shape) != expected[key])
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing keys {missing[:5]}")
        if unexpected:
            details.append(f"unexpected keys {unexpected[:5]}")
        if wrong:
            details.append("shape mismatches " + ", ".join(
                f"{key}: file {tuple(state[key].shape)} vs model {expected[key]}" for key in wrong[:5]))
        raise RecipeError(format_problem(
            f"The weights in {source} do not fit the model", given="; ".join(details),
            hint="pass a fresh instance of the architecture (same constructor arguments) that was compressed."))


def on_save_checkpoint(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Call from ``LightningModule.on_save_checkpoint`` to store the low-rank structure."""
    recipe = get_recipe(module)
    if recipe["layers"]:
        checkpoint[CHECKPOINT_KEY] = recipe


@torch.inference_mode(False)
def on_load_checkpoint(module: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """Call from ``LightningModule.on_load_checkpoint`` so ``load_from_checkpoint`` works.

    Lightning calls the module's hook before it loads the state_dict, so re-creating the
    low-rank layers here lets the strict load that follows succeed. A checkpoint without
    lrsearch data is left alone.
    """
    if CHECKPOINT_KEY not in checkpoint:
        return
    recipe = checkpoint[CHECKPOINT_KEY]
    plan = _plan(module, _check_recipe(recipe, source="the checkpoint's lrsearch recipe"),
                 source="the checkpoint's lrsearch recipe")
    if "state_dict" in checkpoint:
        _check_state(checkpoint["state_dict"], _expected_shapes(module, plan), source="the checkpoint")
    install(module, plan)


class LowRankCheckpointMixin:
    """Mix into a LightningModule (before ``LightningModule``) so its checkpoints keep low-rank layers.

    ``class Model(lrsearch.LowRankCheckpointMixin, pl.LightningModule)`` makes
    ``trainer.save_checkpoint`` store the recipe and ``Model.load_from_checkpoint`` rebuild
    the factorized layers before the strict state_dict load. Dense checkpoints load as before.
    """

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        on_save_checkpoint(self, checkpoint)  # type: ignore[arg-type]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        on_load_checkpoint(self, checkpoint)  # type: ignore[arg-type]
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
