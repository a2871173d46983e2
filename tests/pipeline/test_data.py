"""Data roles and the DataModule lifecycle, with a DataModule written the way Lightning's docs write one."""

from __future__ import annotations

import logging

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset, random_split

from lrsearch.pipeline._data import DataError, resolve_data


class DocsDataModule(pl.LightningDataModule):
    """Datasets exist only after ``setup(stage)``, as in Lightning's DataModule guide."""

    def __init__(self, *, with_test: bool = True) -> None:
        super().__init__()
        self.with_test = with_test
        self.calls: list[str] = []

    def prepare_data(self) -> None:
        self.calls.append("prepare_data")

    def setup(self, stage: str) -> None:
        self.calls.append(f"setup:{stage}")
        generator = torch.Generator().manual_seed(0)
        full = TensorDataset(torch.randn(1200, 8, generator=generator), torch.randint(0, 3, (1200,), generator=generator))
        if stage == "fit":
            self.train_ds, self.val_ds, _ = random_split(full, [800, 256, 144], generator=generator)
        if stage == "test":
            self.test_ds = torch.utils.data.Subset(full, range(1000, 1200))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_ds, batch_size=64, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_ds, batch_size=32)

    def test_dataloader(self) -> DataLoader:
        if not self.with_test:
            raise NotImplementedError
        return DataLoader(self.test_ds, batch_size=50)


def test_datamodule_lifecycle_runs_as_the_trainer_runs_it() -> None:
    datamodule = DocsDataModule()
    data = resolve_data(datamodule=datamodule)
    assert datamodule.calls == ["prepare_data", "setup:fit", "setup:test"]
    assert len(data.search) == 2 and len(data.select) == 6 and len(data.test) == 4
    assert data.test_split == "test" and "selection" in data.select_split
    # The search and selection splits are disjoint halves of validation.
    search_x = torch.cat([x for x, _ in data.search])
    select_x = torch.cat([x for x, _ in data.select])
    assert not any(torch.equal(a, b) for a in search_x[:20] for b in select_x)


def test_without_a_test_split_validation_is_cut_three_ways() -> None:
    loader = DataLoader(TensorDataset(torch.randn(320, 4), torch.zeros(320, dtype=torch.long)), batch_size=32)
    with pytest.warns(UserWarning, match="no test split"):
        data = resolve_data(val_dataloaders=loader)
    assert (len(data.search), len(data.select), len(data.test)) == (2, 6, 2)
    assert "held out" in data.test_split


@pytest.mark.parametrize("as_dicts", [False, True])
def test_a_list_of_ready_batches_is_one_loader_not_several(as_dicts: bool) -> None:
    batches = [(torch.full((32, 4), float(i)), torch.full((32,), i, dtype=torch.long)) for i in range(10)]
    if as_dicts:
        batches = [{"x": x, "labels": y} for x, y in batches]
    loader = DataLoader(TensorDataset(torch.randn(64, 4), torch.zeros(64, dtype=torch.long)), batch_size=32)
    data = resolve_data(val_dataloaders=batches, test_dataloaders=[loader])
    assert data.search + data.select == batches        # every batch, in order, none taken apart
    assert len(data.test) == 2                          # a list of loaders still means its first loader


def test_a_loader_larger_than_the_cap_is_cut_with_a_message(caplog) -> None:
    loader = DataLoader(TensorDataset(torch.randn(1000, 4), torch.zeros(1000, dtype=torch.long)), batch_size=100)
    with caplog.at_level(logging.WARNING, logger="lrsearch"):
        data = resolve_data(val_dataloaders=loader, test_dataloaders=loader, max_samples=400)
    assert sum(len(x) for x, _ in data.search + data.select) == 400
    assert any("more than 400 samples" in r.getMessage() and "max_samples" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("kwargs", "match"), [({"select_fraction": 0.0}, "select_fraction"),
                                               ({"max_samples": 0}, "max_samples")])
def test_bad_arguments(kwargs, match) -> None:
    loader = DataLoader(TensorDataset(torch.randn(64, 4), torch.zeros(64, dtype=torch.long)), batch_size=8)
    with pytest.raises(ValueError, match=match):
        resolve_data(val_dataloaders=loader, **kwargs)


def test_too_little_validation_data_for_three_roles() -> None:
    loader = DataLoader(TensorDataset(torch.randn(16, 4), torch.zeros(16, dtype=torch.long)), batch_size=8)
    with pytest.raises(DataError, match="fewer than 3 batches"):
        resolve_data(val_dataloaders=loader)
