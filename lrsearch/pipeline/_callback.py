"""``RankSearch``: the Lightning callback that compresses the model when training ends.

The logic is framework-agnostic (``RankSearchLogic``); thin subclasses bind it to
``pytorch_lightning.Callback`` here and to ``lightning.pytorch.Callback`` in
:mod:`lrsearch.lightning`, because the two namespaces' classes are distinct.

It runs in ``on_fit_end``: by then every checkpoint of the dense model has been written, the
module is back on the CPU, and the dataloaders are still reachable. Under multi-process
training only global rank zero compresses.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from typing_extensions import override

from lrsearch.core import apply_recipe, get_recipe
from lrsearch.pipeline._compress import CompressionResult, run_compression
from lrsearch.pipeline._finetune import parent_settings
from lrsearch.pipeline._spec import RunSpec

__all__ = ["RankSearch", "RankSearchLogic"]


class RankSearchLogic:
    """Everything of the callback except its Lightning base class (see :class:`RankSearch`)."""

    def __init__(self, budget: str | float | None = None, *, spec: RunSpec | None = None, swap: bool = False,
                 inherit_trainer: bool = True, **options: Any) -> None:
        super().__init__()
        if budget is not None:
            options = {"budget": budget, **options}
        self.spec = RunSpec.build(spec, options)
        self.swap, self.inherit_trainer = bool(swap), bool(inherit_trainer)
        self.result: CompressionResult | None = None

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Compress once training has finished and every dense checkpoint is on disk."""
        if not trainer.is_global_zero:
            return
        if getattr(trainer, "interrupted", False):
            warnings.warn("training was interrupted; lrsearch does not compress an unfinished model",
                          UserWarning, stacklevel=2)
            return
        run = self.spec.resolve(default_run_dir=Path(trainer.default_root_dir) / "lrsearch")
        datamodule = getattr(trainer, "datamodule", None)
        sources: dict[str, Any] = {"datamodule": datamodule}
        if datamodule is None:
            sources = {"train_dataloaders": trainer.train_dataloader, "val_dataloaders": trainer.val_dataloaders}
        inherited = parent_settings(trainer) if self.inherit_trainer else {}
        self.result = run_compression(pl_module, run, inherited=inherited, **sources)
        if self.swap and self.result.model is not None:
            compressed = self.result.model
            apply_recipe(pl_module, get_recipe(compressed))
            pl_module.load_state_dict(compressed.state_dict())


class RankSearch(RankSearchLogic, pl.Callback):
    """Compress the model after ``trainer.fit``: search ranks, fine-tune, verify, save.

    ``trainer = pl.Trainer(callbacks=[lrsearch.RankSearch(budget="0.5%", monitor="val_acc")])``
    scores candidates by what the module logs as ``val_acc`` in ``validation_step``
    (without ``monitor`` or ``metric``: top-1 accuracy of ``module(inputs)``). Keywords are
    the fields of :class:`~lrsearch.pipeline.RunSpec` (or pass ``spec=``); they are checked
    here, before training starts. Afterwards ``callback.result`` holds whether the budget held
    on unseen data, the ranks, the figures and the paths.

    Each candidate's fine-tune runs on the Trainer's device and precision and logs to its
    loggers, under ``trialN/`` (``inherit_trainer=False``: a plain Trainer on the default
    accelerator, no logger); ``finetune={"trainer": {...}}`` overrides any of it. The trained
    module is left as it is unless ``swap=True``, which swaps the compressed layers into it
    when the budget holds.
    """

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        RankSearchLogic.on_fit_end(self, trainer, pl_module)
