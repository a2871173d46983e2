"""Where the pipeline's data comes from: training, search and verification batches.

The verification split must be one the search never saw: the datamodule's test split when
it has one, otherwise the last part of the validation batches, held out from the search.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lrsearch._errors import LrSearchError, format_problem
from lrsearch.core._runtime import batch_size_of

__all__ = ["DataError", "PipelineData", "calibration_batches", "resolve_data"]


class DataError(LrSearchError, ValueError):
    """Training, validation or test data is missing or too small for the pipeline."""


@dataclass(frozen=True)
class PipelineData:
    """Materialized search and verification batches, the training iterable, and split names."""

    train: Iterable[Any] | None
    search: list[Any]
    verify: list[Any]
    search_split: str
    verify_split: str


def _implements(obj: Any, name: str) -> bool:
    """True when ``obj``'s class (not Lightning's base) defines ``name``."""
    for klass in type(obj).__mro__:
        if name in vars(klass):
            return not klass.__module__.startswith(("pytorch_lightning", "lightning"))
    return False


def _first_loader(loaders: Any) -> Any:
    if isinstance(loaders, (list, tuple)) and loaders and not hasattr(loaders, "_fields"):
        if len(loaders) > 1 and not isinstance(loaders[0], (list, tuple)):
            warnings.warn(f"{len(loaders)} dataloaders given; lrsearch uses the first one", UserWarning,
                          stacklevel=3)
        return loaders[0]
    return loaders


def resolve_data(*, datamodule: Any = None, train_dataloaders: Any = None, val_dataloaders: Any = None,
                 test_dataloaders: Any = None, verify_fraction: float = 0.3) -> PipelineData:
    """Collect the batches; fall back to holding out ``verify_fraction`` of validation, with a warning."""
    if not 0.0 < verify_fraction < 1.0:
        raise ValueError(f"verify_fraction must lie in (0, 1) but got {verify_fraction!r}.")
    if datamodule is not None:
        if train_dataloaders is None and _implements(datamodule, "train_dataloader"):
            train_dataloaders = datamodule.train_dataloader()
        if val_dataloaders is None and _implements(datamodule, "val_dataloader"):
            val_dataloaders = datamodule.val_dataloader()
        if test_dataloaders is None and _implements(datamodule, "test_dataloader"):
            datamodule.setup("test")
            test_dataloaders = datamodule.test_dataloader()
    if val_dataloaders is None:
        available = [name for name, value in (("train", train_dataloaders), ("test", test_dataloaders))
                     if value is not None]
        raise DataError(format_problem(
            "lrsearch needs validation data to search ranks on, and none was given",
            expected="val_dataloaders=..., or a datamodule with val_dataloader()",
            given=f"data for {available or 'nothing'}",
            hint="pass val_dataloaders to trainer.fit(...) or implement val_dataloader() in the datamodule; "
                 "Lightning keeps val_dataloaders only when the module defines validation_step."))
    validation = list(_first_loader(val_dataloaders))
    if not validation:
        raise DataError(format_problem("The validation dataloader is empty", expected="at least one batch"))
    if test_dataloaders is not None:
        verify = list(_first_loader(test_dataloaders))
        if verify:
            return PipelineData(_first_loader(train_dataloaders), validation, verify, "validation", "test")
    if len(validation) < 2:
        raise DataError(format_problem(
            "No test split, and the validation data has a single batch, so none can be held out",
            expected="a test dataloader, or validation data of at least 2 batches",
            hint="lower the validation batch size or add test_dataloader() to the datamodule."))
    held = max(1, math.floor(len(validation) * verify_fraction))
    warnings.warn(f"no test split: verifying on the last {held} of {len(validation)} validation batches, "
                  "which the search does not see", UserWarning, stacklevel=2)
    percent = round(100 * held / len(validation))
    return PipelineData(_first_loader(train_dataloaders), validation[:-held], validation[-held:],
                        f"validation (first {100 - percent}%)", f"validation (last {percent}%, held out)")


def calibration_batches(train: Iterable[Any] | None, fallback: list[Any], *, samples: int = 1024) -> list[Any]:
    """About ``samples`` training inputs for whitening (the search batches when there is no training data)."""
    source = train if train is not None else fallback
    batches: list[Any] = []
    seen = 0
    for batch in itertools.islice(source, 64):
        batches.append(batch)
        seen += batch_size_of(batch)
        if seen >= samples:
            break
    return batches
