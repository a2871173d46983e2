"""One pass over calibration batches that records, per target layer, what decomposition needs.

Forward hooks accumulate the input second moment ``Σ x xᵀ`` in float64 (im2col patches for
convs), the per-sample input and output shapes for the cost model, and how often each layer
ran: a layer whose ``forward`` never ran has its weight read by its parent and must stay dense.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrsearch._errors import CalibrationError, format_problem
from lrsearch.core._factors import compute_dtype
from lrsearch.core._runtime import ForwardFn, default_forward, evaluating, model_device, move_to_device

__all__ = ["LayerStatistics", "collect_statistics", "conv_patches", "spatial_gram"]

_MAX_PATCH_ELEMENTS = 1 << 24


@dataclass
class LayerStatistics:
    """What one calibration pass saw at one layer.

    ``gram`` is the un-normalized ``Σ x xᵀ`` over ``rows`` input rows (Linear) or im2col
    patches (Conv2d); ``None`` when only shapes were requested.
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


def _padding_amounts(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """``F.pad`` amounts ``(left, right, top, bottom)`` that reproduce the conv's own padding."""
    amounts: list[int] = []
    for dim in (1, 0):
        kernel, dilation = conv.kernel_size[dim], conv.dilation[dim]
        if conv.padding == "same":
            total = dilation * (kernel - 1)
            amounts += [total // 2, total - total // 2]
        elif conv.padding == "valid":
            amounts += [0, 0]
        else:
            pad = conv.padding[dim]  # type: ignore[index]
            amounts += [pad, pad]
    return tuple(amounts)  # type: ignore[return-value]


def conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """im2col patches ``(batch, Cin·kh·kw, L)`` exactly as the conv sees them, padding mode included."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = F.pad(x, _padding_amounts(conv), mode=mode)
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


def _accumulate(stats: LayerStatistics, module: nn.Module, x: torch.Tensor, *, covariance: bool) -> None:
    work = compute_dtype(x.device)
    if isinstance(module, nn.Conv2d):
        batched = x if x.dim() == 4 else x.unsqueeze(0)
        stats.samples += batched.shape[0]
        stats.input_shape = tuple(batched.shape[1:])
        if not covariance:
            return
        per_chunk = max(1, _MAX_PATCH_ELEMENTS // max(1, batched[:1].numel() * module.kernel_size[0]
                                                        * module.kernel_size[1]))
        for chunk in batched.split(per_chunk):
            patches = conv_patches(module, chunk).to(work)
            gram = torch.einsum("bdl,bel->de", patches, patches)
            stats.gram = gram if stats.gram is None else stats.gram + gram
            stats.rows += patches.shape[0] * patches.shape[2]
        return
    rows = x.reshape(-1, x.shape[-1])
    stats.samples += x.shape[0] if x.dim() > 1 else 1
    stats.rows += rows.shape[0]
    stats.input_shape = tuple(x.shape[1:]) if x.dim() > 1 else tuple(x.shape)
    if covariance:
        rows = rows.to(work)
        gram = rows.T @ rows
        stats.gram = gram if stats.gram is None else stats.gram + gram


def collect_statistics(model: nn.Module, modules: Mapping[str, nn.Module], batches: Iterable[Any], *,
                       covariance: Collection[str] = (), forward: ForwardFn | None = None,
                       max_batches: int | None = None) -> dict[str, LayerStatistics]:
    """Run ``model`` over ``batches`` once (eval mode, no grad) and return statistics per layer.

    ``covariance`` names the layers whose input second moment is needed (whitened SVD); the
    others only get shapes and call counts. The model's train/eval flags are restored.
    """
    forward = forward or default_forward
    stats = {name: LayerStatistics() for name in modules}
    wanted = set(covariance)
    device = model_device(model)
    handles = []

    def make_hooks(name: str, module: nn.Module) -> None:
        def pre_hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                _accumulate(stats[name], module, args[0].detach(), covariance=name in wanted)

        def post_hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            stats[name].calls += 1
            if isinstance(output, torch.Tensor):
                batched = output.dim() == 4 or (not isinstance(module, nn.Conv2d) and output.dim() > 1)
                stats[name].output_shape = tuple(output.shape[1:] if batched else output.shape)

        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook))

    for name, module in modules.items():
        make_hooks(name, module)
    seen = 0
    try:
        with evaluating(model), torch.no_grad(), _dense_tensors(model):
            for index, batch in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                try:
                    forward(model, move_to_device(batch, device))
                except Exception as error:
                    raise CalibrationError(format_problem(
                        f"Calibration batch {index} does not fit the model: {error}",
                        expected="batches shaped like the model's training inputs",
                        given=_describe(batch),
                        hint="pass batches from the model's own DataLoader, or forward=lambda "
                             "model, batch: model(...) to say how a batch is fed")) from error
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise CalibrationError(format_problem(
            "Calibration data is empty", expected="at least one batch",
            hint="pass a DataLoader or a list of input batches"))
    return stats


@contextmanager
def _dense_tensors(model: nn.Module) -> Iterator[None]:
    """Keep ``nn.TransformerEncoder`` from packing inputs into nested tensors while hooks read them."""
    encoders = [m for m in model.modules() if isinstance(m, nn.TransformerEncoder) and m.use_nested_tensor]
    for encoder in encoders:
        encoder.use_nested_tensor = False
    try:
        yield
    finally:
        for encoder in encoders:
            encoder.use_nested_tensor = True


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return "a dict with " + ", ".join(f"{k}: {_describe(v)}" for k, v in batch.items())
    if isinstance(batch, (list, tuple)):
        return f"a {type(batch).__name__} of [" + ", ".join(_describe(v) for v in batch) + "]"
    return type(batch).__name__
