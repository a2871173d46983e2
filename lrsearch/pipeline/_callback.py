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
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from typing_extensions import override

from lrsearch.core import apply_recipe, get_recipe
from lrsearch.core._runtime import ForwardFn
from lrsearch.core._targets import Patterns
from lrsearch.measure import parse_budget
from lrsearch.pipeline._compress import AUTO, CompressionResult, compress, search_constraint
from lrsearch.pipeline._finetune import FinetuneConfig
from lrsearch.pipeline._metric import resolve_metric
from lrsearch.pipeline._select import Bisection
from lrsearch.study import SearchConfig

__all__ = ["RankSearch", "RankSearchLogic"]


def _config(value: Any, kind: type, what: str) -> Any:
    if value is None:
        return kind()
    if isinstance(value, kind):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in fields(kind)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise TypeError(f"unknown {what} option(s) {unknown}; known options are {sorted(known)}.")
        return kind(**value)
    raise TypeError(f"{what} must be a {kind.__name__}, a dict or None but got {type(value).__name__}.")


class RankSearchLogic:
    """Everything of the callback except its Lightning base class (see :class:`RankSearch`)."""

    def __init__(self, budget: str | float = "0.5%", *, run_dir: str | Path | None = None,
                 search_budget: str | float | None = AUTO,
                 search: SearchConfig | Mapping[str, Any] | None = None,
                 finetune: FinetuneConfig | Mapping[str, Any] | None = None, max_finetunes: int = 6,
                 select_fraction: float = 0.75, max_samples: int | None = 20_000, metric: Any = None, monitor: str | None = None,
                 metric_name: str | None = None, batch_fn: Any = None, forward: ForwardFn | None = None, target_modules: Patterns = None,
                 exclude_modules: Patterns = None, conv_scheme: str | Mapping[str, str] = "channel",
                 swap: bool = False) -> None:
        super().__init__()
        self.search_config: SearchConfig = _config(search, SearchConfig, "search")
        self.budget = parse_budget(budget, relative=self.search_config.relative_budget)
        self.search_budget = search_constraint(self.budget, search_budget)
        self.finetune_config: FinetuneConfig = _config(finetune, FinetuneConfig, "finetune")
        Bisection([], max_finetunes)  # checks max_finetunes
        if not 0.0 < select_fraction < 1.0:
            raise ValueError(f"select_fraction must lie in (0, 1) but got {select_fraction!r}.")
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.max_finetunes, self.select_fraction, self.max_samples = max_finetunes, select_fraction, max_samples
        if monitor is not None:
            resolve_metric(metric=metric, monitor=monitor, metric_name=metric_name)  # fail in __init__
        self.metric, self.monitor, self.metric_name = metric, monitor, metric_name
        self.batch_fn, self.forward = batch_fn, forward
        self.target_modules, self.exclude_modules, self.conv_scheme = target_modules, exclude_modules, conv_scheme
        self.swap = bool(swap)
        self.result: CompressionResult | None = None

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Compress once training has finished and every dense checkpoint is on disk."""
        if not trainer.is_global_zero:
            return
        if getattr(trainer, "interrupted", False):
            warnings.warn("training was interrupted; lrsearch does not compress an unfinished model",
                          UserWarning, stacklevel=2)
            return
        run_dir = self.run_dir or Path(trainer.default_root_dir) / "lrsearch"
        datamodule = getattr(trainer, "datamodule", None)
        loaders: dict[str, Any] = {}
        if datamodule is None:
            loaders = {"train_dataloaders": trainer.train_dataloader, "val_dataloaders": trainer.val_dataloaders}
        self.result = compress(
            pl_module, budget=self.budget, run_dir=run_dir, datamodule=datamodule,
            search_budget=self.search_budget,
            search_config=self.search_config, finetune_config=self.finetune_config,
            max_finetunes=self.max_finetunes, select_fraction=self.select_fraction, max_samples=self.max_samples,
            metric=self.metric,
            monitor=self.monitor, metric_name=self.metric_name, batch_fn=self.batch_fn, forward=self.forward,
            target_modules=self.target_modules, exclude_modules=self.exclude_modules,
            conv_scheme=self.conv_scheme, **loaders)
        if self.swap and self.result.model is not None:
            compressed = self.result.model
            apply_recipe(pl_module, get_recipe(compressed))
            pl_module.load_state_dict(compressed.state_dict())


class RankSearch(RankSearchLogic, pl.Callback):
    """Compress the model after ``trainer.fit``: search ranks, fine-tune, verify, save.

    ``trainer = pl.Trainer(callbacks=[lrsearch.RankSearch(budget="0.5%", monitor="val_acc")])``
    scores candidates by what the module logs as ``val_acc`` in ``validation_step``
    (without ``monitor`` or ``metric``: top-1 accuracy of ``module(inputs)``). Afterwards
    ``callback.result`` holds whether the budget held on unseen data, the ranks, the figures
    and the paths. The trained module is left as it is unless ``swap=True``, which swaps the
    compressed layers into it when the budget holds.
    """

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        RankSearchLogic.on_fit_end(self, trainer, pl_module)
