"""``LowRankConv2d`` and ``LowRankConv1d``: a dense conv replaced by a chain of smaller dense convs.

Three schemes for ``nn.Conv2d``, each a sequence of ordinary ``nn.Conv2d`` modules (never a
reconstructed kernel, which would be slower than the dense layer):

* ``channel``: kh×kw conv ``Cin → r``, then 1×1 ``r → Cout`` (Zhang et al. 2015);
* ``spatial``: kh×1 conv ``Cin → r``, then 1×kw ``r → Cout`` (Jaderberg et al. 2014);
* ``tucker2``: 1×1 ``Cin → r_in``, kh×kw ``r_in → r_out``, 1×1 ``r_out → Cout`` (Kim et al. 2016).

``nn.Conv1d`` gets the channel scheme: a k-tap conv ``Cin → r``, then a 1-tap ``r → Cout``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, Union

import torch
from torch import nn

from lrsearch._errors import InvalidRankError, UnsupportedLayerError, format_problem
from lrsearch.core._factors import (
    MatrixFactors,
    TuckerFactors,
    matrix_factors,
    tucker2_factors,
)
from lrsearch.core._linear import assign_, check_rank

__all__ = [
    "CONV1D_SCHEMES",
    "CONV_SCHEMES",
    "ConvRank",
    "ConvScheme",
    "LowRankConv1d",
    "LowRankConv2d",
    "check_conv_rank",
    "conv_full_rank",
    "conv_weight_matrix",
]

ConvScheme = Literal["channel", "spatial", "tucker2"]
ConvRank = Union[int, tuple[int, int]]
CONV_SCHEMES: tuple[str, ...] = ("channel", "spatial", "tucker2")
CONV1D_SCHEMES: tuple[str, ...] = ("channel",)


def _tuple(value: int | tuple[int, ...], dims: int) -> tuple[int, ...]:
    return (value,) * dims if isinstance(value, int) else tuple(int(v) for v in value)


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return _tuple(value, 2)  # type: ignore[return-value]


def is_channels_last(weight: torch.Tensor) -> bool:
    """Whether a 4-D kernel is stored channels_last (and not also plain contiguous, as 1×1 kernels are)."""
    return (weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last)
            and not weight.is_contiguous())


def follow_memory_format(layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    """Store the replacement's kernels channels_last when the dense kernel was, so the model keeps its layout."""
    return layer.to(memory_format=torch.channels_last) if is_channels_last(weight) else layer


def _check_scheme(scheme: str) -> None:
    if scheme not in CONV_SCHEMES:
        raise ValueError(format_problem(f"Unknown conv scheme {scheme!r}",
                                        expected=f"one of {list(CONV_SCHEMES)}"))


def conv_full_rank(out_channels: int, in_channels: int, kernel_size: tuple[int, ...],
                   scheme: str) -> ConvRank:
    """Rank at which the scheme reproduces any kernel exactly (a pair for Tucker-2)."""
    _check_scheme(scheme)
    if scheme == "channel":
        return min(out_channels, in_channels * math.prod(kernel_size))
    if scheme == "spatial":
        kh, kw = kernel_size
        return min(out_channels * kw, in_channels * kh)
    return (in_channels, out_channels)


def check_conv_rank(rank: object, full_rank: ConvRank, *, what: str) -> ConvRank:
    """Validate a conv rank; a Tucker-2 int ``r`` means ``(min(r, Cin), min(r, Cout))``."""
    if isinstance(full_rank, int):
        return check_rank(rank, full_rank, what=what)
    max_in, max_out = full_rank
    if isinstance(rank, int) and not isinstance(rank, bool):
        check_rank(rank, max(max_in, max_out), what=what)
        return (min(rank, max_in), min(rank, max_out))
    if isinstance(rank, (tuple, list)) and len(rank) == 2:
        return (check_rank(rank[0], max_in, what=f"{what} (input mode)"),
                check_rank(rank[1], max_out, what=f"{what} (output mode)"))
    raise InvalidRankError(format_problem(
        f"Tucker-2 rank of {what} must be an int or a pair (r_in, r_out)",
        expected=f"r_in in [1, {max_in}] and r_out in [1, {max_out}]", given=repr(rank)))


def conv_weight_matrix(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """Fold a ``(Cout, Cin, *kernel)`` kernel into the matrix the scheme factors as ``left @ right``.

    ``channel`` gives ``Cout × (Cin·prod(kernel))`` (im2col order); ``spatial`` gives
    ``(Cout·kw) × (Cin·kh)`` so that the right factor is a kh×1 conv and the left a 1×kw conv.
    """
    if scheme == "channel":
        return weight.reshape(weight.shape[0], -1)
    if scheme == "spatial":
        out_channels, in_channels, kh, kw = weight.shape
        return weight.permute(0, 3, 1, 2).reshape(out_channels * kw, in_channels * kh)
    raise ValueError(f"scheme {scheme!r} has no matrix fold")


class _LowRankConv(nn.Module):
    """A conv as a chain of dense convs (``first``, ``second`` and, for Tucker-2, ``third``).

    Stride, padding (including ``"same"``/``"valid"``), dilation, padding mode, bias, dtype
    and device are kept; at full rank the output equals the dense layer's up to rounding.
    """

    _dense: ClassVar[type[nn.Conv1d | nn.Conv2d]]
    _schemes: ClassVar[tuple[str, ...]]
    _dims: ClassVar[int]

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, ...],
                 rank: ConvRank, *, scheme: ConvScheme = "channel",
                 stride: int | tuple[int, ...] = 1,
                 padding: int | tuple[int, ...] | str = 0,
                 dilation: int | tuple[int, ...] = 1, bias: bool = True,
                 padding_mode: str = "zeros", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if scheme not in self._schemes:
            raise ValueError(format_problem(f"Unknown {type(self).__name__} scheme {scheme!r}",
                                            expected=f"one of {list(self._schemes)}"))
        dims = self._dims
        self.kernel_size = _tuple(kernel_size, dims)
        self.stride, self.dilation = _tuple(stride, dims), _tuple(dilation, dims)
        self.padding = padding if isinstance(padding, str) else _tuple(padding, dims)
        what = (f"{type(self).__name__}({in_channels}→{out_channels}, "
                f"{'×'.join(map(str, self.kernel_size))}, {scheme})")
        self.rank: ConvRank = check_conv_rank(
            rank, conv_full_rank(out_channels, in_channels, self.kernel_size, scheme), what=what)
        self.scheme: str = scheme
        self.in_channels, self.out_channels = in_channels, out_channels
        self.padding_mode = padding_mode
        self._build(bias=bias, device=device, dtype=dtype)

    def _build(self, *, bias: bool, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        """The channel scheme: a full-kernel conv ``Cin → r``, then a 1-tap conv ``r → Cout``."""
        r = int(self.rank)  # type: ignore[arg-type]
        self.first = self._dense(self.in_channels, r, self.kernel_size, stride=self.stride,  # type: ignore[arg-type]
                                 padding=self.padding, dilation=self.dilation, bias=False,  # type: ignore[arg-type]
                                 padding_mode=self.padding_mode, device=device, dtype=dtype)
        self.second = self._dense(r, self.out_channels, 1, bias=bias, device=device, dtype=dtype)
        self.third: nn.Module | None = None

    @property
    def bias(self) -> torch.Tensor | None:
        return (self.third if self.third is not None else self.second).bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.second(self.first(x))
        return x if self.third is None else self.third(x)

    @classmethod
    def from_dense(cls, conv: nn.Conv1d | nn.Conv2d, rank: ConvRank, *, scheme: ConvScheme = "channel",
                   factors: MatrixFactors | TuckerFactors | None = None) -> _LowRankConv:
        """Build from a dense conv; ``factors`` (e.g. whitened) default to a plain decomposition.

        The new kernels are stored channels_last when the dense kernel is.
        """
        if conv.groups != 1:
            raise UnsupportedLayerError(format_problem(
                f"Cannot factorize a grouped conv (groups={conv.groups})",
                expected="groups=1", hint="exclude this layer; depthwise and grouped convs stay dense."))
        layer = cls(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), rank,
                    scheme=scheme, stride=tuple(conv.stride), padding=conv.padding
                    if isinstance(conv.padding, str) else tuple(conv.padding),
                    dilation=tuple(conv.dilation), bias=conv.bias is not None,
                    padding_mode=conv.padding_mode, device=conv.weight.device,
                    dtype=conv.weight.dtype)
        if factors is None:
            factors = (tucker2_factors(conv.weight) if scheme == "tucker2"
                       else matrix_factors(conv_weight_matrix(conv.weight, scheme)))
        layer._load_factors(factors)
        if conv.bias is not None:
            assign_(layer.bias, conv.bias)  # type: ignore[arg-type]
        return follow_memory_format(layer, conv.weight)  # type: ignore[return-value]

    def _load_factors(self, factors: MatrixFactors | TuckerFactors) -> None:
        assert isinstance(factors, MatrixFactors), "the channel scheme is a matrix factorization"
        left, right = factors.truncate(int(self.rank))  # type: ignore[arg-type]
        assign_(self.first.weight, right)
        assign_(self.second.weight, left)

    def _dense_kernel(self) -> torch.Tensor:
        first, second = self.first.weight, self.second.weight
        return (second.flatten(1) @ first.flatten(1)).reshape(self.out_channels, self.in_channels,
                                                              *self.kernel_size)

    def to_dense(self) -> nn.Conv1d | nn.Conv2d:
        """The equivalent single conv (same outputs up to float rounding)."""
        weight = self.first.weight
        dense = self._dense(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,  # type: ignore[arg-type]
                            padding=self.padding, dilation=self.dilation, bias=self.bias is not None,  # type: ignore[arg-type]
                            padding_mode=self.padding_mode, device=weight.device, dtype=weight.dtype)
        assign_(dense.weight, self._dense_kernel())
        if self.bias is not None:
            assign_(dense.bias, self.bias)
        return dense

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"scheme={self.scheme!r}, rank={self.rank}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"padding_mode={self.padding_mode!r}")


class LowRankConv1d(_LowRankConv):
    """An ``nn.Conv1d`` as a k-tap conv ``Cin → r`` then a 1-tap conv ``r → Cout`` (channel scheme)."""

    _dense = nn.Conv1d
    _schemes = CONV1D_SCHEMES
    _dims = 1


class LowRankConv2d(_LowRankConv):
    """An ``nn.Conv2d`` as a chain of dense convs, by the channel, spatial or Tucker-2 scheme."""

    _dense = nn.Conv2d
    _schemes = CONV_SCHEMES
    _dims = 2

    def _build(self, *, bias: bool, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        if self.scheme == "channel":
            super()._build(bias=bias, device=device, dtype=dtype)
            return
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        common = {"padding_mode": self.padding_mode, "device": device, "dtype": dtype}
        point = {"device": device, "dtype": dtype}
        if self.scheme == "spatial":
            r = int(self.rank)  # type: ignore[arg-type]
            vertical, horizontal = self._split_padding()
            self.first = nn.Conv2d(self.in_channels, r, (kh, 1), stride=(sh, 1), padding=vertical,
                                   dilation=(dh, 1), bias=False, **common)
            self.second = nn.Conv2d(r, self.out_channels, (1, kw), stride=(1, sw), padding=horizontal,
                                    dilation=(1, dw), bias=bias, **common)
            self.third = None
            return
        r_in, r_out = self.rank  # type: ignore[misc]
        self.first = nn.Conv2d(self.in_channels, r_in, 1, bias=False, **point)
        self.second = nn.Conv2d(r_in, r_out, (kh, kw), stride=(sh, sw), padding=self.padding,  # type: ignore[arg-type]
                                dilation=(dh, dw), bias=False, **common)
        self.third = nn.Conv2d(r_out, self.out_channels, 1, bias=bias, **point)

    def _split_padding(self) -> tuple[str | tuple[int, int], str | tuple[int, int]]:
        """Vertical padding goes to the kh×1 stage, horizontal to the 1×kw stage."""
        if isinstance(self.padding, str):
            return self.padding, self.padding
        ph, pw = self.padding
        return (ph, 0), (0, pw)

    def _load_factors(self, factors: MatrixFactors | TuckerFactors) -> None:
        if isinstance(factors, TuckerFactors):
            r_in, r_out = self.rank  # type: ignore[misc]
            in_basis, core, out_basis = factors.truncate(r_in, r_out)
            assign_(self.first.weight, in_basis.T)
            assign_(self.second.weight, core)
            assign_(self.third.weight, out_basis)  # type: ignore[union-attr]
        elif self.scheme == "channel":
            super()._load_factors(factors)
        else:
            r = int(self.rank)  # type: ignore[arg-type]
            left, right = factors.truncate(r)
            kw = self.kernel_size[1]
            assign_(self.first.weight, right)
            assign_(self.second.weight, left.reshape(self.out_channels, kw, r).permute(0, 2, 1))

    def _dense_kernel(self) -> torch.Tensor:
        first, second = self.first.weight, self.second.weight
        if self.scheme == "spatial":
            return torch.einsum("orj,rci->ocij", second[:, :, 0, :], first[:, :, :, 0])
        if self.scheme == "tucker2":
            third = self.third.weight  # type: ignore[union-attr]
            return torch.einsum("op,pqkl,qi->oikl", third[:, :, 0, 0], second, first[:, :, 0, 0])
        return super()._dense_kernel()
