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
import inspect
import math
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import torch
from torch import nn

from lrsearch._checks import (
    ConflictError,
    OptionError,
    check_bool,
    check_int,
    check_positive,
    check_unit_interval,
    check_unknown,
    is_int,
)
from lrsearch._errors import format_problem
from lrsearch.core._runtime import ForwardFn, model_device
from lrsearch.pipeline._data import DataError
from lrsearch.pipeline._distill import DistillationError, DistillLoss, _Distiller, _distilling, check_distill
from lrsearch.pipeline._lightning import defines_training_step, namespace_of

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
    """Options of the fine-tune of each candidate (lrsearch.pipeline.finetune); each is checked by name.

    Attributes:
        epochs: passes over the training data per candidate; unset: from the training set's size,
            enough to see about 320,000 samples, 1 to 10 epochs (10 for the 32,000-sample MNIST-1D demo).
        max_steps: stop after this many optimizer steps; -1: no cap.
        lr_scale: multiplies every learning rate of the module's own configure_optimizers (param
            groups and scheduler bases): a fine-tune should move less than training did.
        distill: add knowledge distillation from the original model to the module's loss: true
            chooses the loss by output (KL for logits, cosine for features), or kl, cosine or mse.
        temperature: softening temperature T of the distillation targets.
        alpha: weight of distillation: (1 - alpha) * loss + alpha * term.
        accelerator: Lightning accelerator (auto, cpu, gpu, ...); unset: the accelerator of the
            Trainer the callback runs in, else auto.
        progress: show Lightning's progress bar while a candidate is fine-tuned; unset: shown
            when the run shows its own progress and, under the callback, the Trainer it runs in
            shows a progress bar (a user who turned bars off for a log file gets none from us).
        limit_val_batches: fraction (float) or number (int) of validation batches per epoch.
        trainer: more keyword arguments of the fine-tuning Trainer (precision, devices, logger,
            callbacks, ...); they win over what the callback inherits from its own Trainer.
    """

    epochs: int | None = None
    max_steps: int = -1
    lr_scale: float = 0.1
    distill: bool | DistillLoss = True
    temperature: float = 2.0
    alpha: float = 0.5
    accelerator: str | None = None
    progress: bool | None = None
    limit_val_batches: float | int = 1.0
    trainer: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, low=1, optional=True)
        if not (is_int(self.max_steps) and (self.max_steps == -1 or self.max_steps >= 1)):
            raise OptionError(f"max_steps must be -1 (no cap) or an integer of at least 1 but got {self.max_steps!r}.")
        check_positive("lr_scale", self.lr_scale)
        check_positive("temperature", self.temperature)
        check_unit_interval("alpha", self.alpha)
        check_distill(self.distill)
        if self.progress is not None:
            check_bool("progress", self.progress)
        if self.accelerator is not None and not (isinstance(self.accelerator, str) and self.accelerator):
            raise OptionError(f"accelerator must be a non-empty string such as 'auto' but got {self.accelerator!r}.")
        if is_int(self.limit_val_batches):
            check_int("limit_val_batches", self.limit_val_batches, low=0)
        elif isinstance(self.limit_val_batches, float):
            check_unit_interval("limit_val_batches", self.limit_val_batches)
        else:
            raise OptionError("limit_val_batches must be a fraction between 0.0 and 1.0 or a number of batches "
                              f"but got {self.limit_val_batches!r}.")
        if self.trainer is not None:
            if not isinstance(self.trainer, Mapping) or not all(isinstance(key, str) for key in self.trainer):
                raise OptionError(f"trainer must map Trainer argument names to values but got {self.trainer!r}.")
            for key, field_name in _OWN_TRAINER_KEYS.items():
                if key in self.trainer:
                    raise ConflictError(format_problem(
                        f"trainer sets {key!r}, which lrsearch sets itself", hint=(
                            f"use the {field_name} option instead." if field_name else
                            "leave it out: lrsearch chooses it for each candidate's fine-tune.")))
            object.__setattr__(self, "trainer", dict(self.trainer))

    def to_dict(self) -> dict[str, Any]:
        """Field by field; the Trainer arguments are copied, not deep-copied (they may hold a logger)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["trainer"] = None if self.trainer is None else dict(self.trainer)
        return data


# Trainer arguments that a FinetuneConfig field (or lrsearch itself, None) already sets.
_OWN_TRAINER_KEYS = {"max_epochs": "epochs", "max_steps": "max_steps", "accelerator": "accelerator",
                     "enable_progress_bar": "progress", "limit_val_batches": "limit_val_batches",
                     "default_root_dir": None, "num_sanity_val_steps": None}


def check_trainer_options(namespace: ModuleType, options: Mapping[str, Any] | None) -> None:
    """Refuse names the Trainer of ``namespace`` does not take, before any work (not minutes into a run)."""
    if options:
        known = [name for name in inspect.signature(namespace.Trainer.__init__).parameters if name != "self"]
        check_unknown("finetune.trainer", options, known)


def parent_settings(trainer: Any) -> dict[str, Any]:
    """What a fine-tune inherits from the Trainer it runs in: its device, precision, loggers and progress bar.

    Only global rank zero fine-tunes, so a multi-device Trainer passes on the one device that
    rank uses rather than its device count.
    """
    device = trainer.strategy.root_device
    settings: dict[str, Any] = {"accelerator": device.type, "precision": trainer.precision,
                                "devices": [device.index] if device.index is not None else 1,
                                "enable_progress_bar": trainer.progress_bar_callback is not None}
    if trainer.loggers:
        settings["logger"] = list(trainer.loggers)
    return settings


def finetune(module: ModuleT, *, teacher: nn.Module | None, root_dir: str | Path,
             config: FinetuneConfig = FinetuneConfig(), datamodule: Any = None,
             train_dataloaders: Any = None, val_dataloaders: Any = None,
             forward: ForwardFn | None = None, inherited: Mapping[str, Any] | None = None,
             name: str | None = None) -> ModuleT:
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
    ``forward(model, batch)`` (default :func:`default_forward`), which must return logits or features.
    ``teacher`` runs without gradients in eval mode; it is moved to the module's device for the
    fit and moved back, with its train/eval modes, afterwards.

    The Trainer's arguments, later ones winning: lrsearch's (no logger, no checkpoints, one
    device), then ``inherited`` (what :func:`parent_settings` reads off the Trainer a callback
    runs in), then ``config.accelerator``, then ``config.trainer``. A logger object is wrapped so
    that its metric names start with ``name/`` (``trial12/val_loss``), and the fine-tune neither
    overwrites the run's hyperparameters nor closes it.
    """
    namespace = namespace_of(module)
    if not isinstance(config, FinetuneConfig):
        raise TypeError(format_problem("config must be a FinetuneConfig",
                                       given=f"an object of type {type(config).__qualname__}"))
    _check_data(namespace, module, datamodule, train_dataloaders, val_dataloaders)
    distiller = _Distiller(module, teacher, config, forward) if config.distill else None
    if distiller is None and not defines_training_step(module):
        raise OptionError(format_problem(
            f"{type(module).__qualname__} defines no training_step, and distillation is off",
            expected="a training_step, or distillation to train on",
            hint="use FinetuneConfig(distill='cosine') (or 'mse'; 'kl' for class scores): a module without a "
                 "training_step is fine-tuned on the distillation term alone."))
    epochs = config.epochs or auto_epochs(_training_samples(module, datamodule, train_dataloaders))
    trainer = namespace.Trainer(**_trainer_arguments(namespace, config, root_dir=Path(root_dir), epochs=epochs,
                                                     inherited=inherited or {}, name=name))
    with _restoring(module, teacher if distiller is not None else None), _distilling(module, distiller), \
            torch.inference_mode(False), torch.enable_grad():
        _fit(trainer, module, train_dataloaders=train_dataloaders, val_dataloaders=val_dataloaders,
             datamodule=datamodule)
    return module


def _trainer_arguments(namespace: ModuleType, config: FinetuneConfig, *, root_dir: Path, epochs: int,
                       inherited: Mapping[str, Any], name: str | None) -> dict[str, Any]:
    """The fine-tuning Trainer's keyword arguments (see :func:`finetune` for their order)."""
    check_trainer_options(namespace, config.trainer)
    arguments: dict[str, Any] = {
        "logger": False, "enable_checkpointing": False, "devices": 1, "accelerator": "auto",
        "enable_model_summary": False, **inherited,
        "default_root_dir": root_dir, "max_epochs": epochs, "max_steps": config.max_steps,
        "enable_progress_bar": inherited.get("enable_progress_bar", True) if config.progress is None
        else config.progress, "num_sanity_val_steps": 0,
        "limit_val_batches": config.limit_val_batches}
    if config.accelerator is not None:
        arguments["accelerator"] = config.accelerator
    arguments.update(config.trainer or {})
    own = [_lr_scale_callback(namespace)(config.lr_scale)]
    given = arguments.get("callbacks") or []
    arguments["callbacks"] = own + (list(given) if isinstance(given, (list, tuple)) else [given])
    logger = arguments["logger"]
    if name is not None and not isinstance(logger, bool) and logger is not None:
        loggers = logger if isinstance(logger, (list, tuple)) else [logger]
        arguments["logger"] = [_prefixed_logger(namespace)(inner, name) for inner in loggers]
    return arguments


@functools.cache
def _prefixed_logger(namespace: ModuleType) -> type:
    """A Logger class of ``namespace`` that forwards to another logger under a name prefix."""

    class Prefixed(namespace.loggers.Logger):  # type: ignore[name-defined,misc]
        """Metrics go to ``inner`` as ``prefix/name``; hyperparameters and the end of the fit stay the outer run's."""

        def __init__(self, inner: Any, prefix: str) -> None:
            super().__init__()
            self.inner, self.prefix = inner, prefix

        @property
        def name(self) -> str | None:
            return self.inner.name

        @property
        def version(self) -> Any:
            return self.inner.version

        @property
        def save_dir(self) -> str | None:
            return self.inner.save_dir

        @property
        def log_dir(self) -> str | None:
            return getattr(self.inner, "log_dir", None)

        @property
        def experiment(self) -> Any:
            return self.inner.experiment

        def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
            self.inner.log_metrics({f"{self.prefix}/{key}": value for key, value in metrics.items()}, step)

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            """The outer run's hyperparameters are the user's; a fine-tune does not overwrite them."""

        def save(self) -> None:
            self.inner.save()

        def finalize(self, status: str) -> None:
            self.inner.save()  # the outer run goes on: do not close it

    return Prefixed


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
    set. Either way a half-trained module must not pass for a fine-tuned one. A teardown that
    fails after Ctrl-C (a DataLoader cut short while it started its workers) is the Ctrl-C too.
    """
    try:
        trainer.fit(module, **data)
    except KeyboardInterrupt:
        raise
    except BaseException as error:
        if _after_ctrl_c(error):
            raise KeyboardInterrupt from None
        raise
    if trainer.interrupted:
        raise KeyboardInterrupt


def _after_ctrl_c(error: BaseException) -> bool:
    """Whether ``error`` was raised while a KeyboardInterrupt was being handled (Lightning's exit is)."""
    seen: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and cause not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.append(cause)
        cause = cause.__context__
    return False


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
