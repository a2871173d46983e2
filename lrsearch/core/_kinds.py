"""The registry of layer kinds: the one place that lists what lrsearch can factorize.

Adding a kind is adding one :class:`~lrsearch.core._kind.LayerKind` entry to ``KINDS``;
targets, calibration, decomposition, the cost model, serialization and the latency table
all dispatch through :func:`kind_of` / :func:`kind_named`. The first matching entry wins.
"""

from __future__ import annotations

from collections import Counter

from torch import nn

from lrsearch.core._kind import HostKind, LayerKind
from lrsearch.core._kind_attention import ATTENTION
from lrsearch.core._kind_conv import CONV1D, CONV2D
from lrsearch.core._kind_linear import HF_CONV1D, LINEAR

__all__ = ["HOSTS", "KINDS", "describe_contents", "host_for_explicit", "host_of", "kind_for_low_rank",
           "kind_named", "kind_of", "supported_labels"]

KINDS: tuple[LayerKind, ...] = (LINEAR, HF_CONV1D, CONV1D, CONV2D)
HOSTS: tuple[HostKind, ...] = (ATTENTION,)
_BY_NAME = {kind.name: kind for kind in KINDS}


def kind_of(module: nn.Module) -> LayerKind | None:
    """The kind ``module`` belongs to, or None if lrsearch cannot factorize modules of its type."""
    return next((kind for kind in KINDS if kind.matches(module)), None)


def kind_named(name: str) -> LayerKind:
    """The kind with this ``name`` (as stored in a geometry)."""
    if name not in _BY_NAME:
        raise TypeError(f"no layer kind {name!r}; expected one of {sorted(_BY_NAME)}")
    return _BY_NAME[name]


def kind_for_low_rank(module: nn.Module) -> LayerKind | None:
    """The kind that writes the recipe entry of a low-rank replacement module, or None."""
    return next((kind for kind in KINDS if type(module) is kind.low_rank_type), None)


def host_of(module: nn.Module) -> HostKind | None:
    """The host kind ``module`` belongs to (its sublayers become targets once converted), or None."""
    return next((host for host in HOSTS if host.matches(module)), None)


def host_for_explicit(module: nn.Module) -> HostKind | None:
    """The host kind whose converted form ``module`` is, or None."""
    return next((host for host in HOSTS if type(module) is host.explicit_type), None)


def supported_labels() -> str:
    """``"Linear, transformers Conv1D, Conv1d, Conv2d, MultiheadAttention projections"``: for messages."""
    return ", ".join([*(kind.label for kind in KINDS), *(f"{host.label} projections" for host in HOSTS)])


def describe_contents(model: nn.Module) -> str:
    """What holds the model's parameters, by type, most frequent first: ``"2 LayerNorm, 1 LSTM"``."""
    counts = Counter(type(module).__name__ for module in model.modules()
                     if next(module.parameters(recurse=False), None) is not None)
    return ", ".join(f"{count} {name}" for name, count in counts.most_common()) or "no parameters"
