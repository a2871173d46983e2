"""One pass over calibration batches that records, per target layer, what decomposition needs.

Forward hooks let each layer's kind accumulate the input second moment ``Σ x xᵀ`` in float64
(im2col patches for convs) and the per-sample input and output shapes for the cost model, and
count how often each layer ran: a layer whose ``forward`` never ran has its weight read by its
parent and must stay dense.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lrsearch._errors import CalibrationError, format_problem
from lrsearch.core._kinds import kind_of
from lrsearch.core._runtime import (
    ForwardFn,
    default_forward,
    evaluating,
    model_device,
    move_to_device,
)
from lrsearch.core._statistics import LayerStatistics, conv_patches, spatial_gram

__all__ = ["LayerStatistics", "collect_statistics", "conv_patches", "spatial_gram"]


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
        kind = kind_of(module)
        assert kind is not None, f"{name} is a target, so it has a kind"

        def pre_hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                kind.accumulate(stats[name], module, args[0].detach(), covariance=name in wanted)

        def post_hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            stats[name].calls += 1
            if isinstance(output, torch.Tensor):
                stats[name].output_shape = kind.output_shape(output)

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
