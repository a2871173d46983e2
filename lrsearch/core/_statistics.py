"""What one calibration pass records per layer, and the im2col view convs are whitened on.

The layer kinds (:mod:`lrsearch.core._kinds`) fill :class:`LayerStatistics` from their
inputs; :func:`lrsearch.core.collect_statistics` runs the pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerStatistics", "add_gram", "conv_patches", "spatial_gram"]


@dataclass
class LayerStatistics:
    """What one calibration pass saw at one layer.

    ``gram`` is the un-normalized ``Σ x xᵀ`` over ``rows`` input rows (Linear-like layers) or
    im2col patches (convs); ``None`` when only shapes were requested.
    """

    gram: torch.Tensor | None = None
    rows: int = 0
    samples: int = 0
    calls: int = 0
    input_shape: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()

    @property
    def rows_per_sample(self) -> int:
        """Rows (tokens) per sample for a Linear, rounded; 1 for a plain ``(batch, features)`` input."""
        return max(1, round(self.rows / self.samples)) if self.samples else 1


def add_gram(stats: LayerStatistics, rows: torch.Tensor) -> None:
    """Add ``rowsᵀ rows`` (one input per row) to the running second moment."""
    gram = rows.T @ rows
    stats.gram = gram if stats.gram is None else stats.gram + gram


def _padding_amounts(conv: nn.modules.conv._ConvNd) -> tuple[int, ...]:
    """``F.pad`` amounts (last spatial dim first) that reproduce the conv's own padding."""
    amounts: list[int] = []
    for dim in reversed(range(len(conv.kernel_size))):
        kernel, dilation = conv.kernel_size[dim], conv.dilation[dim]
        if conv.padding == "same":
            total = dilation * (kernel - 1)
            amounts += [total // 2, total - total // 2]
        elif conv.padding == "valid":
            amounts += [0, 0]
        else:
            pad = conv.padding[dim]  # type: ignore[index]
            amounts += [pad, pad]
    return tuple(amounts)


def conv_patches(conv: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """im2col patches ``(batch, Cin·prod(kernel), L)`` exactly as the conv sees them, padding mode included.

    A Conv1d is unfolded as a conv with a ``1 × k`` kernel over a height-1 image.
    """
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = F.pad(x, _padding_amounts(conv), mode=mode)
    if padded.dim() == 3:
        return F.unfold(padded.unsqueeze(2), (1, conv.kernel_size[0]), dilation=(1, conv.dilation[0]),
                        stride=(1, conv.stride[0]))
    return F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)


def spatial_gram(gram: torch.Tensor, in_channels: int, kernel_size: tuple[int, int]) -> torch.Tensor:
    """The ``(Cin·kh)²`` column statistics the spatial scheme whitens with.

    Sums the diagonal blocks of the im2col second moment over kernel columns. This drops the
    correlation between columns, so spatial whitening is a close approximation, not the exact
    optimum that the channel scheme gets.
    """
    kh, kw = kernel_size
    blocks = gram.reshape(in_channels, kh, kw, in_channels, kh, kw)
    return blocks.diagonal(dim1=2, dim2=5).sum(-1).reshape(in_channels * kh, in_channels * kh)
