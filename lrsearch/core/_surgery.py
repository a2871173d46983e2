"""Putting replacement modules into a model, either in place or into a fresh copy.

Both paths go through :func:`_install`, which also disables fused fast paths that read a
replaced layer's ``.weight`` directly (``nn.TransformerEncoderLayer`` in eval mode does).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lrsearch.core._kind import HostKind
from lrsearch.core._kinds import host_of

__all__ = ["Explicit", "clone_with", "explicit_model", "install"]

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
    """A ``TransformerEncoder`` holding the layer must not take its nested-tensor fast path either.

    That path returns zeros at padded positions; the hook below keeps doing so, so a factorized
    encoder's output equals the dense one's everywhere, padded positions included.
    """
    parts = layer_name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        ancestor = model.get_submodule(".".join(parts[:depth])) if depth else model
        if isinstance(ancestor, nn.TransformerEncoder) and ancestor.use_nested_tensor:
            ancestor.use_nested_tensor = False
            ancestor.register_forward_hook(_zero_padded_positions, with_kwargs=True)


def _would_nest(encoder: nn.TransformerEncoder, src: torch.Tensor, mask: torch.Tensor | None,
                padding: torch.Tensor | None) -> bool:
    """Whether the dense encoder (``use_nested_tensor=True``) would have run on nested tensors.

    Mirrors the conditions of ``nn.TransformerEncoder.forward`` (torch 2.x) that depend on the
    call rather than on the layers, which ``enable_nested_tensor`` already vetted.
    """
    first = encoder.layers[0]
    if (padding is None or mask is not None or src.dim() != 3 or src.is_nested or first.training
            or not torch.backends.mha.get_fastpath_enabled() or torch.is_autocast_enabled()
            or src.device.type not in ("cpu", "cuda", "xpu")):
        return False
    if torch.is_grad_enabled() and (src.requires_grad or any(p.requires_grad for p in first.parameters())):
        return False
    if getattr(encoder, "mask_check", True):
        keep = padding.logical_not()
        if torch.compiler.is_compiling() or bool((keep[:, 1:] & ~keep[:, :-1]).any()):
            return False  # a mask that is not left-aligned keeps the dense encoder off its fast path
    return True


def _zero_padded_positions(encoder: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                           output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook: the padded positions a nested-tensor run would have left at zero (then normed)."""
    src = args[0] if args else kwargs["src"]
    mask = args[1] if len(args) > 1 else kwargs.get("mask")
    padding = args[2] if len(args) > 2 else kwargs.get("src_key_padding_mask")
    if not _would_nest(encoder, src, mask, padding):  # type: ignore[arg-type]
        return None
    padded = padding.bool()  # batch first: an encoder that nests has a batch_first self-attention
    fill = torch.zeros_like(output) if encoder.norm is None else encoder.norm(torch.zeros_like(output))
    return torch.where(padded.unsqueeze(-1), fill, output)


def install(model: nn.Module, replacements: Mapping[str, nn.Module]) -> nn.Module:
    """Replace modules of ``model`` in place; the caller has validated every name beforehand."""
    for name, module in replacements.items():
        _install(model, name, module)
    return model


def clone_with(model: nn.Module, replacements: Mapping[str, nn.Module], *,
               share_tensors: bool = False) -> nn.Module:
    """A deep copy of ``model`` with ``replacements`` in place of the named modules.

    The replaced modules are never copied (the deepcopy memo maps them straight to their
    replacements), so building a compressed model does not duplicate dense weights. With
    ``share_tensors`` the copy's modules hold the very parameters and buffers of ``model``
    (a new structure over the same tensors, for reading only).
    """
    memo: dict[int, Any] = {}
    if share_tensors:
        memo.update((id(tensor), tensor) for tensor in (*model.parameters(), *model.buffers()))
    for name, new in replacements.items():
        original = model.get_submodule(name)
        new.train(original.training)
        memo[id(original)] = new
    clone = copy.deepcopy(model, memo)
    for name, module in replacements.items():
        _install(clone, name, module)
    return clone


@dataclass(frozen=True)
class Explicit:
    """A model with its hosts (``nn.MultiheadAttention``) converted, sharing every tensor with the original.

    ``hosts`` maps each converted host's name to its kind; ``skipped`` names the hosts that
    could not be converted exactly, with the reason. Without any host, ``model`` is the
    original model itself.
    """

    model: nn.Module
    hosts: dict[str, HostKind] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def explicit_model(model: nn.Module) -> Explicit:
    """The model as lrsearch decomposes it: each host converted so that its sublayers are modules."""
    hosts: dict[str, HostKind] = {}
    skipped: dict[str, str] = {}
    replacements: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        host = host_of(module)
        if host is None or not name or any(name.startswith(outer + ".") for outer in hosts):
            continue
        reason = host.unsupported_reason(module)
        if reason is not None:
            skipped[name] = reason
            continue
        hosts[name] = host
        replacements[name] = host.convert(module, share=True)
    if not replacements:
        return Explicit(model, skipped=skipped)
    return Explicit(clone_with(model, replacements, share_tensors=True), hosts, skipped)
