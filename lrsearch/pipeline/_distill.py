"""Knowledge distillation for the recovery fine-tune: the compressed student learns the original's outputs.

Class scores (a tensor, or the ``logits`` of a Hugging Face ``ModelOutput``) are distilled by the
KL divergence of temperature-softened distributions. Outputs that are not class scores, such as
the embeddings of an encoder (``sentence_embedding``, ``last_hidden_state``, ``pooler_output``),
are distilled by cosine distance (or MSE) to the teacher's, which needs no labels: the batches
only have to be valid inputs. Padding positions (``attention_mask`` 0) are left out of both.

A module without a ``training_step`` of its own (an embedding model has no labels to train on)
is fine-tuned on the distillation term alone: its batches are fed to both models and the
student learns to reproduce the teacher's outputs, so unlabeled batches suffice.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrsearch._errors import LrSearchError, format_problem
from lrsearch.core._runtime import (
    ForwardFn,
    default_forward,
    describe,
    model_device,
    output_field,
)
from lrsearch.pipeline._lightning import defines_training_step, namespace_of

if TYPE_CHECKING:
    from lrsearch.pipeline._finetune import FinetuneConfig

__all__ = ["DISTILL_LOSSES", "DistillLoss", "DistillationError", "check_distill"]

DistillLoss = Literal["kl", "cosine", "mse"]
DISTILL_LOSSES: tuple[DistillLoss, ...] = ("kl", "cosine", "mse")
"""Values of ``FinetuneConfig.distill`` besides True (chosen by the output) and False (off)."""

# Output fields that hold features rather than class scores, in the order they are looked for:
# a pooled sentence embedding (sentence-transformers), then token states, then BERT's pooler.
_FEATURE_FIELDS = ("sentence_embedding", "last_hidden_state", "pooler_output")
_FORWARD_HINT = ("pass forward=lambda model, batch: <the tensor to distill>, or FinetuneConfig(distill=False).")

_Call = tuple[tuple[Any, ...], dict[str, Any], Any]

_logger = logging.getLogger("lrsearch")


class DistillationError(LrSearchError, ValueError):
    """Distillation cannot work with this module, teacher or their outputs."""


def check_distill(value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a valid ``FinetuneConfig.distill``."""
    if not (isinstance(value, bool) or (isinstance(value, str) and value in DISTILL_LOSSES)):
        raise ValueError(f"distill must be True, False or one of {', '.join(map(repr, DISTILL_LOSSES))} "
                         f"but got {value!r}.")


class _Distiller:
    """Adds ``alpha`` times a distillation term to the loss of the wrapped ``training_step``.

    The term is ``T² * KL(teacher ‖ student)`` for class scores, ``1 - cos(student, teacher)``
    (mean over rows) or their MSE for features; ``config.distill`` is True to choose by the
    output (KL for a tensor or ``logits``, cosine for features) or names one of
    :data:`DISTILL_LOSSES`. A module that defines no ``training_step`` has no loss to add to:
    its step is the term alone (``alpha`` does not apply), from feeding each batch to both models.
    """

    def __init__(self, module: Any, teacher: nn.Module | None, config: FinetuneConfig,
                 forward: ForwardFn | None) -> None:
        if teacher is None:
            raise DistillationError(format_problem(
                "distill=True needs a teacher", expected="teacher=<the uncompressed model>",
                hint="pass the original model as teacher, or FinetuneConfig(distill=False)."))
        if not isinstance(teacher, nn.Module):
            raise DistillationError(format_problem(
                "The teacher must be a torch module", given=f"an object of type {type(teacher).__qualname__}"))
        if teacher is module:
            raise DistillationError(format_problem(
                "The teacher is the module being fine-tuned", expected="the uncompressed original model",
                hint="pass the model the compressed copy was built from."))
        if not module.automatic_optimization:
            raise DistillationError(format_problem(
                "Distillation needs automatic optimization", given="a module that steps its optimizers itself",
                hint="add the distillation term in your own training_step, or FinetuneConfig(distill=False)."))
        if "dataloader_iter" in inspect.signature(module.training_step).parameters:
            raise DistillationError(format_problem(
                "Distillation cannot see the batches of a training_step that takes dataloader_iter",
                hint="use FinetuneConfig(distill=False)."))
        check_distill(config.distill)
        self.alone = not defines_training_step(module)
        if self.alone:
            _logger.info("%s defines no training_step: its fine-tune minimizes the distillation term alone "
                         "(%s; alpha does not apply), so its batches need no labels", type(module).__qualname__,
                         "KL for logits, cosine for features" if config.distill is True else config.distill)
        self.module = module
        self.teacher = teacher
        self.temperature = config.temperature
        self.alpha = config.alpha
        self.loss: DistillLoss | None = None if config.distill is True else config.distill
        self.forward = forward

    def wrap(self, training_step: Any) -> Any:
        """The step to train with: ``training_step`` plus the term, or the term alone (see the class)."""
        if self.alone:
            def distill_only(batch: Any, *args: Any, **kwargs: Any) -> Tensor:
                return self.term(batch, [])

            return distill_only  # not functools.wraps: Lightning must see a training_step of the module's own

        @functools.wraps(training_step)
        def step(batch: Any, *args: Any, **kwargs: Any) -> Any:
            calls: list[_Call] = []
            handle = self.module.register_forward_hook(
                lambda _, inputs, keywords, output: calls.append((inputs, keywords, output)), with_kwargs=True)
            try:
                result = training_step(batch, *args, **kwargs)
            finally:
                handle.remove()
            if result is None or (isinstance(result, Mapping) and "loss" not in result):
                return result  # a skipped batch, or a step Lightning itself rejects with its own message
            loss = result["loss"] if isinstance(result, Mapping) else result
            total = (1.0 - self.alpha) * loss + self.alpha * self.term(batch, calls)
            if isinstance(result, Mapping):
                return {**result, "loss": total}
            return total

        return step

    def term(self, batch: Any, calls: list[_Call]) -> Tensor:
        """The distillation term of one batch, reusing the step's own forward call when it can."""
        device = model_device(self.module)
        if model_device(self.teacher) != device:
            self.teacher.to(device)
        if len(calls) == 1 and _distilled(calls[0][2]) is not None:
            inputs, keywords, student = calls[0]
            with torch.no_grad():
                teacher = self.teacher(*inputs, **keywords)
            source: Any = keywords
        else:
            student, teacher = self._run_both(batch)
            source = batch
        kind, student_tensor, teacher_tensor = _pair(student, teacher)
        loss = self.loss or ("kl" if kind == "logits" else "cosine")
        _check_pair(student_tensor, teacher_tensor, loss)
        rows_student, rows_teacher = _rows(student_tensor, teacher_tensor, _attention_mask(source, student))
        if loss == "kl":
            log_student = F.log_softmax(rows_student / self.temperature, dim=-1)
            log_teacher = F.log_softmax(rows_teacher / self.temperature, dim=-1)
            return self.temperature ** 2 * F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
        if loss == "cosine":
            return 1.0 - F.cosine_similarity(rows_student, rows_teacher, dim=-1).mean()
        return F.mse_loss(rows_student, rows_teacher)

    def _run_both(self, batch: Any) -> tuple[Any, Any]:
        """Feed the batch to both models when the step's own call cannot be reused."""
        if self.forward is None and type(self.module).forward is namespace_of(self.module).LightningModule.forward:
            raise DistillationError(format_problem(
                f"Distillation has to run {type(self.module).__qualname__} on the batch, but it defines no forward",
                expected="a forward that returns logits or features, called once as self(...) in training_step",
                hint="define forward (e.g. def forward(self, **inputs): return self.model(**inputs)) and call "
                     "it in training_step, or " + _FORWARD_HINT))
        forward = self.forward or default_forward
        student = forward(self.module, batch)
        with torch.no_grad():
            teacher = forward(self.teacher, batch)
        return student, teacher


def _distilled(output: Any) -> tuple[Literal["logits", "features"], Tensor] | None:
    """What to distill of an output: a tensor or its ``logits`` (class scores), else its features."""
    if isinstance(output, Tensor):
        return "logits", output
    logits = output_field(output, "logits")
    if isinstance(logits, Tensor):
        return "logits", logits
    for name in _FEATURE_FIELDS:
        features = output_field(output, name)
        if isinstance(features, Tensor):
            return "features", features
    return None


def _pair(student: Any, teacher: Any) -> tuple[str, Tensor, Tensor]:
    picked_student, picked_teacher = _distilled(student), _distilled(teacher)
    if picked_student is None or picked_teacher is None or picked_student[0] != picked_teacher[0]:
        raise DistillationError(format_problem(
            "Distillation needs outputs it can compare: logit tensors, or features of the same kind",
            expected="tensors, or outputs with 'logits' or one of "
                     f"{', '.join(map(repr, _FEATURE_FIELDS))} (a Hugging Face ModelOutput or a dict)",
            given=f"{describe(student)} from the student and {describe(teacher)} from the teacher",
            hint=_FORWARD_HINT))
    return picked_student[0], picked_student[1], picked_teacher[1]


def _check_pair(student: Tensor, teacher: Tensor, loss: str) -> None:
    """Same shape, floating point, rows of at least 2 entries (2 classes for KL)."""
    if student.shape != teacher.shape or student.dim() < 2 or student.shape[-1] < 2 \
            or not (student.is_floating_point() and teacher.is_floating_point()):
        what = "logits with at least 2 classes" if loss == "kl" else "features with at least 2 entries"
        raise DistillationError(format_problem(
            f"Distillation needs floating-point {what} in the last dimension, of the same shape",
            given=f"student {tuple(student.shape)} {student.dtype}, teacher {tuple(teacher.shape)} {teacher.dtype}",
            hint=_FORWARD_HINT))


def _attention_mask(source: Any, output: Any) -> Tensor | None:
    """The padding mask of the inputs (a dict batch or the call's keywords), else of the output."""
    for holder in (source, output):
        mask = output_field(holder, "attention_mask") if isinstance(holder, Mapping) else None
        if isinstance(mask, Tensor):
            return mask
    return None


def _rows(student: Tensor, teacher: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Both outputs as float32 rows over the last dimension, without padded positions."""
    if mask is not None and student.dim() >= 3 and mask.shape == student.shape[:-1]:
        keep = mask.to(student.device).bool()
        return student[keep].float(), teacher[keep].float()
    width = student.shape[-1]
    return student.reshape(-1, width).float(), teacher.reshape(-1, width).float()


@contextmanager
def _distilling(module: nn.Module, distiller: _Distiller | None) -> Iterator[None]:
    """Patch the distillation wrapper onto this instance only, and put back what was there."""
    if distiller is None:
        yield
        return
    distiller.teacher.eval()
    missing = object()
    previous = module.__dict__.get("training_step", missing)
    module.training_step = distiller.wrap(module.training_step)
    try:
        yield
    finally:
        if previous is missing:
            del module.training_step
        else:
            module.training_step = previous
