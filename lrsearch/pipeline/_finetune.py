"""Recovery fine-tuning of a compressed LightningModule, with distillation from the original.

A factorized model loses a little accuracy; a short fine-tune with the module's own
``training_step`` and optimizer, at a tenth of its learning rate and with knowledge
distillation from the uncompressed model, recovers most of it (algorithms notes, section 7).
The fit uses a fresh Trainer of the module's own Lightning package and leaves no trace: the
module gets its own ``training_step`` and Trainer reference back, and torch's grad mode and
thread count are restored.
"""

from __future__ import annotations

import functools
import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import torch
from torch import nn

from lrsearch._errors import format_problem
from lrsearch.core._runtime import ForwardFn, model_device
from lrsearch.pipeline._data import DataError
from lrsearch.pipeline._distill import DistillationError, _Distiller, _distilling
from lrsearch.pipeline._lightning import namespace_of

__all__ = ["DistillationError", "FinetuneConfig", "auto_epochs", "finetune"]

ModuleT = TypeVar("ModuleT", bound=nn.Module)

# Optimizer param-group keys and scheduler attributes that hold learning rates; scaling all of
# them scales the whole schedule (OneCycleLR reads max_lr/min_lr, CyclicLR max_lrs, ...).
_GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
_SCHEDULER_LR_ATTRIBUTES = ("base_lrs", "max_lrs", "min_lrs", "_last_lr", "eta_min")
# epochs=None: fine-tune on about this many samples, in 1 to AUTO_MAX_EPOCHS epochs. Measured on the
# MNIST-1D MLP (see benchmarks/README.md): 1 epoch of 32,000 samples left a front candidate 4.3 points
# below the original, 10 epochs recovered it.
AUTO_SAMPLES = 320_000
AUTO_MAX_EPOCHS = 10



@dataclass(frozen=True)
class FinetuneConfig:
    """Options of :func:`finetune`; every value is checked by name.

    Attributes:
        epochs: passes over the training data; ``None`` (default) picks them from the training
            set's size: enough to see about ``AUTO_SAMPLES`` samples, from 1 to ``AUTO_MAX_EPOCHS``
            (10 epochs for the 32,000-sample MNIST-1D demo, 1 for ImageNet).
        max_steps: when positive, stop after this many optimizer steps; ``-1`` for no cap.
        lr_scale: multiplies every learning rate of the module's own ``configure_optimizers``
            (param groups and scheduler bases), since a fine-tune should move less than training.
        distill: add knowledge distillation from the teacher to the module's loss.
        temperature: softening temperature T of the distillation targets.
        alpha: weight of distillation: ``(1 - alpha) * loss + alpha * T² * KL(teacher ‖ student)``.
        accelerator: Lightning accelerator name (``"auto"``, ``"cpu"``, ``"gpu"``, ...).
        progress: show Lightning's progress bar and model summary.
        limit_val_batches: fraction (float) or number (int) of validation batches per epoch.
    """

    epochs: int | None = None
    max_steps: int = -1
    lr_scale: float = 0.1
    distill: bool = True
    temperature: float = 2.0
    alpha: float = 0.5
    accelerator: str = "auto"
    progress: bool = True
    limit_val_batches: float | int = 1.0

    def __post_init__(self) -> None:
        if self.epochs is not None:
            _integer("epochs", self.epochs, low=1)
        if not (_is_int(self.max_steps) and (self.max_steps == -1 or self.max_steps >= 1)):
            raise ValueError(f"max_steps must be -1 (no cap) or an integer of at least 1 "
                             f"but got {self.max_steps!r}.")
        _positive("lr_scale", self.lr_scale)
        _positive("temperature", self.temperature)
        if not (_is_real(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must be a number between 0 and 1 but got {self.alpha!r}.")
        for name in ("distill", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False but got {getattr(self, name)!r}.")
        if not (isinstance(self.accelerator, str) and self.accelerator):
            raise ValueError(f"accelerator must be a non-empty string such as 'auto' but got {self.accelerator!r}.")
        limit = self.limit_val_batches
        if _is_int(limit):
            _integer("limit_val_batches", limit, low=0)
        elif not (isinstance(limit, float) and 0.0 <= limit <= 1.0):
            raise ValueError("limit_val_batches must be a fraction between 0.0 and 1.0 or a number of batches "
                             f"but got {limit!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(name: str, value: object, *, low: int) -> None:
    if not (_is_int(value) and value >= low):  # type: ignore[operator]
        raise ValueError(f"{name} must be an integer of at least {low} but got {value!r}.")


def _positive(name: str, value: object) -> None:
    if not (_is_real(value) and value > 0):  # type: ignore[operator]
        raise ValueError(f"{name} must be a positive finite number but got {value!r}.")


def finetune(module: ModuleT, *, teacher: nn.Module | None, root_dir: str | Path,
             config: FinetuneConfig = FinetuneConfig(), datamodule: Any = None,
             train_dataloaders: Any = None, val_dataloaders: Any = None,
             forward: ForwardFn | None = None) -> ModuleT:
    """Fine-tune ``module`` in place with a fresh Trainer and return it.

    ``module`` is the compressed copy the caller owns (see :func:`clone_module`); it is trained
    with its own ``training_step`` and ``configure_optimizers`` (a new optimizer, learning rates
    times ``config.lr_scale``), and comes back on the device and in the train/eval modes it came
    in, detached from the inner Trainer as it was before. Data comes from ``datamodule``, or
    from ``train_dataloaders`` (and optionally ``val_dataloaders``), or from the module's own
    ``train_dataloader`` hook.

    With ``config.distill`` the loss of each step becomes
    ``(1 - alpha) * loss + alpha * T² * KL(teacher ‖ student)`` on outputs softened by T. When
    the step calls ``self(...)`` exactly once and gets a tensor, that is the student's output and
    the teacher gets the same inputs (no extra forward pass); otherwise both models run
    ``forward(model, batch)`` (default :func:`default_forward`), which must return logits.
    ``teacher`` runs without gradients in eval mode; it is moved to the module's device for the
    fit and moved back, with its train/eval modes, afterwards.

    No logger and no checkpoints: the fine-tune is one step of a pipeline that records its own
    results, and a nested logger would write run folders into ``root_dir`` or take over a
    global experiment run (W&B) of an outer Trainer.
    """
    namespace = namespace_of(module)
    if not isinstance(config, FinetuneConfig):
        raise TypeError(format_problem("config must be a FinetuneConfig",
                                       given=f"an object of type {type(config).__qualname__}"))
    _check_data(namespace, module, datamodule, train_dataloaders, val_dataloaders)
    distiller = _Distiller(module, teacher, config, forward) if config.distill else None
    epochs = config.epochs or auto_epochs(_training_samples(module, datamodule, train_dataloaders))
    trainer = namespace.Trainer(
        default_root_dir=Path(root_dir), logger=False, enable_checkpointing=False, devices=1,
        accelerator=config.accelerator, max_epochs=epochs, max_steps=config.max_steps,
        enable_progress_bar=config.progress, enable_model_summary=config.progress,
        num_sanity_val_steps=0, limit_val_batches=config.limit_val_batches,
        callbacks=[_lr_scale_callback(namespace)(config.lr_scale)])
    with _restoring(module, teacher if distiller is not None else None), _distilling(module, distiller), \
            torch.inference_mode(False), torch.enable_grad():
        _fit(trainer, module, train_dataloaders=train_dataloaders, val_dataloaders=val_dataloaders,
             datamodule=datamodule)
    return module


def auto_epochs(samples: int | None) -> int:
    """Epochs that show the fine-tune about ``AUTO_SAMPLES`` samples (1 when the size is unknown)."""
    if not samples:
        return 1
    return max(1, min(AUTO_MAX_EPOCHS, math.ceil(AUTO_SAMPLES / samples)))


def _training_samples(module: Any, datamodule: Any, train_dataloaders: Any) -> int | None:
    """How many samples one epoch sees, when the training loader can tell (a sized dataset or loader)."""
    loader = train_dataloaders
    if loader is None:
        owner = datamodule if datamodule is not None else module
        try:
            loader = owner.train_dataloader()
        except Exception:  # noqa: BLE001 - a loader that needs the Trainer's setup(); the fit will say more
            return None
    if isinstance(loader, (list, tuple)) and loader:
        loader = loader[0]
    dataset = getattr(loader, "dataset", None)
    try:
        if dataset is not None:
            return len(dataset)
        return len(loader) * (getattr(loader, "batch_size", None) or 1)
    except TypeError:
        return None


def _fit(trainer: Any, module: Any, **data: Any) -> None:
    """``trainer.fit``, with Ctrl-C raised as KeyboardInterrupt.

    Lightning catches Ctrl-C itself and tears the fit down; then recent versions call
    ``sys.exit(1)`` and older ones return as if the fit had finished, with ``trainer.interrupted``
    set. Either way a half-trained module must not pass for a fine-tuned one.
    """
    try:
        trainer.fit(module, **data)
    except SystemExit as exit_:
        if isinstance(exit_.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise
    if trainer.interrupted:
        raise KeyboardInterrupt


def _check_data(namespace: ModuleType, module: Any, datamodule: Any, train_dataloaders: Any,
                val_dataloaders: Any) -> None:
    """Fail before the Trainer starts, with a message that says what to pass."""
    if datamodule is not None:
        if train_dataloaders is not None or val_dataloaders is not None:
            raise DataError(format_problem(
                "Fine-tuning got both a datamodule and dataloaders", expected="one source of data",
                hint="pass datamodule=... alone, or train_dataloaders=... (and val_dataloaders=...)."))
        if not isinstance(datamodule, namespace.LightningDataModule):
            raise DataError(format_problem(
                "The datamodule does not belong to the module's Lightning package",
                expected=f"a {namespace.__name__}.LightningDataModule",
                given=f"an object of type {type(datamodule).__module__}.{type(datamodule).__qualname__}",
                hint="import LightningModule and LightningDataModule from the same package, or pass "
                     "train_dataloaders=datamodule.train_dataloader()."))
        return
    if train_dataloaders is None and type(module).train_dataloader is namespace.LightningModule.train_dataloader:
        raise DataError(format_problem(
            "Fine-tuning needs training data", expected="datamodule=... or train_dataloaders=...",
            given="neither, and the module defines no train_dataloader()",
            hint="pass the training DataLoader (trainer.train_dataloader from a callback) or the datamodule."))


def _scale_learning_rates(trainer: Any, scale: float) -> None:
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            for key in _GROUP_LR_KEYS:
                if isinstance(group.get(key), torch.Tensor):
                    group[key].mul_(scale)
                elif key in group:
                    group[key] = group[key] * scale
    for scheduler_config in trainer.lr_scheduler_configs:
        scheduler = scheduler_config.scheduler
        for name in _SCHEDULER_LR_ATTRIBUTES:
            value = getattr(scheduler, name, None)
            if isinstance(value, list):
                setattr(scheduler, name, [entry * scale for entry in value])
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                setattr(scheduler, name, value * scale)


@functools.cache
def _lr_scale_callback(namespace: ModuleType) -> type:
    """A Callback class of ``namespace``: the Trainer calls every hook, so a duck type fails."""

    class LrScale(namespace.Callback):  # type: ignore[name-defined,misc]
        """Scales the freshly configured learning rates once, after any optimizer state is restored."""

        def __init__(self, scale: float) -> None:
            self.scale = scale

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            _scale_learning_rates(trainer, self.scale)

    return LrScale


@contextmanager
def _restoring(module: Any, teacher: nn.Module | None) -> Iterator[None]:
    """Give back what a fit changes but the caller did not ask for.

    Lightning leaves the module attached to the inner Trainer, on the CPU (strategy teardown)
    and in train mode, and its fit loop turns grad mode on globally; the teacher is moved to
    the module's device during distillation. On Ctrl-C Lightning sets SIGINT to "ignore" for
    good, which would make the rest of the pipeline (and the user's program) deaf to Ctrl-C.
    """
    models = [model for model in (module, teacher) if model is not None]
    devices = [model_device(model) for model in models]
    modes = {submodule: submodule.training for model in models for submodule in model.modules()}
    attached = module.__dict__.get("_trainer")
    threads = torch.get_num_threads()
    sigint = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if (sigint is not None and signal.getsignal(signal.SIGINT) is not sigint
                and threading.current_thread() is threading.main_thread()):
            signal.signal(signal.SIGINT, sigint)
        torch.set_num_threads(threads)
        module.trainer = attached
        for model, device in zip(models, devices, strict=True):
            model.to(device)
        for submodule, training in modes.items():
            submodule.training = training
