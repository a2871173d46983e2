"""Fixtures of the reliability tests: a throwaway PostgreSQL server, a tiny trained MLP on disk and
the checkpoint of a tiny trained LightningModule for ``lrsearch tune``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.reliability._lit import TinyClassifier, TinyData
from tests.reliability._worker import mlp
from tests.reliability.postgres import PostgresServer, find_bin_dir


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server that lives for the session; ``create_database(name)`` gives a URL."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, postgres, psql) are not installed; "
                    ".ci/run installs them with apt-get")
    server = PostgresServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres: PostgresServer) -> str:
    """``postgresql://postgres@127.0.0.1:PORT/lrsearch`` on the session's server."""
    return postgres.create_database("lrsearch")


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The MLP of tests/study, trained on a 4-class rule; four validation batches of 128."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = mlp()
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1024, 16, generator=generator)
        y = (x[:, :4] * torch.tensor([1.0, -2.0, 0.5, 1.5])).argmax(1)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(150):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model, [(x[i:i + 128], y[i:i + 128]) for i in range(0, 512, 128)]


@pytest.fixture
def saved(trained, tmp_path: Path) -> Path:
    """The trained model's state dict at ``model.pt`` and its validation batches at ``data.pt``."""
    model, val = trained
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save([list(batch) for batch in val], tmp_path / "data.pt")
    return tmp_path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Lightning-style checkpoint (``state_dict`` key) of a TinyClassifier trained on TinyData."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        module, data = TinyClassifier(), TinyData()
        x, y = data.x[:1024], data.y[:1024]
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
        for _ in range(150):
            loss = nn.functional.cross_entropy(module(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("tiny") / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict()}, path)
    return path
