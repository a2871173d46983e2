"""Where the pipeline's data comes from, and the one job each split has.

- **search**: the trials score candidates on it (before fine-tuning);
- **select**: fine-tuned candidates are accepted or rejected on it; the search never sees it;
- **test**: looked at exactly once, for the final verdict of the report.

The search and selection splits are the validation batches, cut in two. The test split is
the datamodule's (or the given) test data; without one, the last part of the validation
batches is held out for it, with a warning. A datamodule is driven the way the Trainer drives
it: ``prepare_data()``, then ``setup("fit")`` before the train and validation loaders and
``setup("test")`` before the test loader.
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lrsearch._errors import LrSearchError, format_problem
from lrsearch.core._runtime import batch_size_of

__all__ = ["DataError", "PipelineData", "calibration_batches", "resolve_data"]

_logger = logging.getLogger("lrsearch")
# Without a test split this share of the validation batches is held out for the final verdict.
_TEST_FRACTION = 0.25


class DataError(LrSearchError, ValueError):
    """Training, validation or test data is missing or too small for the pipeline."""


@dataclass(frozen=True)
class PipelineData:
    """Materialized search, selection and test batches, the training iterable, and split names."""

    train: Iterable[Any] | None
    search: list[Any]
    select: list[Any]
    test: list[Any]
    search_split: str
    select_split: str
    test_split: str

    def describe(self) -> dict[str, str]:
        """Which data each role used, for the report."""
        return {"search": self.search_split, "select": self.select_split, "test": self.test_split}


def _implements(obj: Any, name: str) -> bool:
    """True when ``obj``'s class (not Lightning's base) defines ``name``."""
    for klass in type(obj).__mro__:
        if name in vars(klass):
            return not klass.__module__.startswith(("pytorch_lightning", "lightning"))
    return False


def _is_batch(value: Any) -> bool:
    """A ready batch (a tensor, a dict, or a tuple or list that starts with one), not a loader."""
    if isinstance(value, (torch.Tensor, Mapping)):
        return True
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], (torch.Tensor, Mapping))


def _first_loader(loaders: Any) -> Any:
    """The loader to read: the first of several (as Lightning takes them), or a list of ready batches itself."""
    if isinstance(loaders, (list, tuple)) and loaders and not hasattr(loaders, "_fields") \
            and not _is_batch(loaders[0]):
        if len(loaders) > 1 and not isinstance(loaders[0], (list, tuple)):
            warnings.warn(f"{len(loaders)} dataloaders given; lrsearch uses the first one", UserWarning,
                          stacklevel=3)
        return loaders[0]
    return loaders


def _from_datamodule(datamodule: Any, loaders: dict[str, Any]) -> dict[str, Any]:
    """The datamodule's loaders, after the lifecycle calls the Trainer would make before each."""
    wanted = {role: hook for role, hook in (("train", "train_dataloader"), ("val", "val_dataloader"))
              if loaders[role] is None and _implements(datamodule, hook)}
    wants_test = loaders["test"] is None and _implements(datamodule, "test_dataloader")
    if not wanted and not wants_test:
        return loaders
    datamodule.prepare_data()
    if wanted:
        datamodule.setup("fit")
        for role, hook in wanted.items():
            loaders[role] = getattr(datamodule, hook)()
    if wants_test:
        datamodule.setup("test")
        loaders["test"] = datamodule.test_dataloader()
    return loaders


def _take(loader: Any, *, max_samples: int | None, split: str) -> list[Any]:
    """The loader's batches, up to about ``max_samples`` samples, saying so when it stops early."""
    batches: list[Any] = []
    seen = 0
    iterator = iter(loader)
    for batch in iterator:
        if max_samples is not None and seen >= max_samples:
            _logger.warning("the %s data has more than %d samples; lrsearch keeps the first %d in memory "
                            "(raise max_samples to use more)", split, max_samples, seen)
            break
        batches.append(batch)
        seen += batch_size_of(batch)
    return batches


def _cut(batches: list[Any], fraction: float) -> int:
    """How many batches from the end make ``fraction`` of them (at least one)."""
    return max(1, math.floor(len(batches) * fraction))


def _percent(part: int, whole: int) -> int:
    return round(100 * part / whole)


def resolve_data(*, datamodule: Any = None, train_dataloaders: Any = None, val_dataloaders: Any = None,
                 test_dataloaders: Any = None, select_fraction: float = 0.75,
                 max_samples: int | None = 20_000) -> PipelineData:
    """Collect the batches of every role (see the module docstring).

    ``select_fraction`` of the validation batches (the last ones) become the selection split.
    Each split keeps at most about ``max_samples`` samples in memory (None: no cap).
    """
    if not 0.0 < select_fraction < 1.0:
        raise ValueError(f"select_fraction must lie in (0, 1) but got {select_fraction!r}.")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise ValueError(f"max_samples must be a positive integer or None but got {max_samples!r}.")
    loaders = {"train": train_dataloaders, "val": val_dataloaders, "test": test_dataloaders}
    if datamodule is not None:
        loaders = _from_datamodule(datamodule, loaders)
    if loaders["val"] is None:
        available = [role for role in ("train", "test") if loaders[role] is not None]
        raise DataError(format_problem(
            "lrsearch needs validation data to search ranks on, and none was given",
            expected="val_dataloaders=..., or a datamodule with val_dataloader()",
            given=f"data for {available or 'nothing'}",
            hint="pass val_dataloaders to trainer.fit(...) or implement val_dataloader() in the datamodule; "
                 "Lightning keeps val_dataloaders only when the module defines validation_step."))
    train = _first_loader(loaders["train"])
    validation = _take(_first_loader(loaders["val"]), max_samples=max_samples, split="validation")
    if not validation:
        raise DataError(format_problem("The validation dataloader is empty", expected="at least one batch"))
    test = [] if loaders["test"] is None else _take(_first_loader(loaders["test"]), max_samples=max_samples,
                                                    split="test")
    test_split = "test"
    if not test:
        if len(validation) < 3:
            raise DataError(format_problem(
                "No test split, and the validation data has fewer than 3 batches, so it cannot be cut into "
                "search, selection and test parts",
                expected="a test dataloader, or validation data of at least 3 batches",
                hint="lower the validation batch size or add test_dataloader() to the datamodule."))
        held = _cut(validation, _TEST_FRACTION)
        test_split = f"validation (last {_percent(held, len(validation))}%, held out)"
        warnings.warn(f"no test split: the final verdict uses the last {held} of {len(validation)} validation "
                      "batches, which neither the search nor the selection sees", UserWarning, stacklevel=2)
        total = len(validation)
        validation, test = validation[:-held], validation[-held:]
    else:
        total = len(validation)
        if total < 2:
            raise DataError(format_problem(
                "The validation data has a single batch, so it cannot be cut into search and selection parts",
                expected="validation data of at least 2 batches",
                hint="lower the validation batch size."))
    selected = _cut(validation, select_fraction)
    if selected >= len(validation):
        selected = len(validation) - 1
    search, select = validation[:-selected], validation[-selected:]
    return PipelineData(train, search, select, test,
                        f"validation ({_percent(len(search), total)}% for the search)",
                        f"validation ({_percent(selected, total)}% held out for selection)", test_split)


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
