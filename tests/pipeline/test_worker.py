"""``search_worker``: the search step of compress alone, for workers sharing one study."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrsearch.pipeline import search_worker
from lrsearch.study import SearchConfig


def _batches(seed: int, n: int = 512) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=generator)
    y = (x[:, :4] * torch.tensor([1.0, -2.0, 0.5, 1.5])).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=128)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4)).eval()


LATENCY = {"objective": "latency", "n_trials": 4, "threads": 1, "latency_min_run_time": 0.005, "latency_repeats": 1}


def test_workers_share_the_first_workers_search_space(tmp_path: Path) -> None:
    """Whichever worker comes first measures the latency table (here worker 1); the next reads it."""
    common = {"storage": f"journal:{tmp_path}/study.log", "study_name": "s", **LATENCY}
    data = {"val_dataloaders": _batches(1), "test_dataloaders": _batches(2)}
    first = search_worker(_model(), budget="5%", run_dir=str(tmp_path / "w1"),
                          search=SearchConfig(worker_index=1, **common), **data)
    second = search_worker(_model(), budget="5%", run_dir=str(tmp_path / "w0"),
                           search=SearchConfig(worker_index=0, **{**common, "n_trials": 8}), **data)
    assert first.latency_table is not None
    assert second.latency_table.to_dict() == first.latency_table.to_dict()
    choices = [{name: layer.choices for name, layer in result.space.layers.items()} for result in (first, second)]
    assert choices[0] == choices[1]
    # The search split is compress's: the validation batches, verified on the test split.
    assert second.baseline == first.baseline
