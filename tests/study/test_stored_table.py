"""The latency table in the study: identical for every reader, compact, out of the dashboard's way."""

from __future__ import annotations

import json

import optuna
import optuna_dashboard
import pytest
import torch

from lrsearch.measure import DeploymentLatency, LatencyTable, LatencyTableError, LayerLatency
from lrsearch.study._stored_table import TABLE_ATTR, store_latency_table, stored_latency_table
from tests.study.test_dashboard import call


def big_table(layers: int = 72, ranks: int = 48) -> LatencyTable:
    """About the size of a BERT-base table: every layer timed at every candidate rank, with noise."""
    geometry = {"kind": "linear", "in_features": 768, "out_features": 3072}
    noise = torch.rand(layers, ranks + 1, generator=torch.Generator().manual_seed(0)).tolist()
    return LatencyTable(device="cpu", threads=2, batch_size=32, torch_version=torch.__version__, dense_model=0.0123,
                        layers={f"encoder.layer.{i}.fc": LayerLatency(
                            dense=1e-4 * (1 + noise[i][0]),
                            factorized={"linear": {8 * (r + 1): 1e-5 * (r + 1) * (1 + noise[i][r + 1])
                                                   for r in range(ranks)}},
                            geometry=dict(geometry), input_shape=(32, 128, 768)) for i in range(layers)})


def test_every_reader_gets_the_identical_table() -> None:
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="s")
    assert stored_latency_table(study) is None
    table = big_table()
    store_latency_table(study, DeploymentLatency.single(table))
    other = optuna.load_study(study_name="s", storage=storage)  # another worker on the same storage
    assert stored_latency_table(other).primary.to_dict() == table.to_dict()


def test_the_study_carries_a_compact_table_and_a_short_summary() -> None:
    study = optuna.create_study()
    table = big_table()
    store_latency_table(study, DeploymentLatency.single(table))
    full = len(json.dumps(table.to_dict()))
    system = study._storage.get_study_system_attrs(study._study_id)[TABLE_ATTR]
    summary = study.user_attrs[TABLE_ATTR]
    assert full > 100_000 and len(system["data"]) < full / 1.5
    assert len(json.dumps(summary)) < 1024  # the dashboard shows it whole
    assert summary["layers"] == 72 and summary["dense_model_ms"] == 12.3 and summary["sha256"] == system["sha256"]


def test_the_dashboard_answer_does_not_grow_with_the_table() -> None:
    storage = optuna.storages.InMemoryStorage()
    bare = optuna.create_study(storage=storage, study_name="bare")
    with_table = optuna.create_study(storage=storage, study_name="table")
    store_latency_table(with_table, DeploymentLatency.single(big_table()))
    app = optuna_dashboard.wsgi(storage)
    sizes = [len(json.dumps(call(app, f"/api/studies/{s._study_id}"))) for s in (bare, with_table)]
    assert sizes[1] - sizes[0] < 600  # only the summary; the table itself stays in the storage


def test_a_table_stored_by_an_older_lrsearch_is_read() -> None:
    study = optuna.create_study()
    table = big_table(layers=2, ranks=3)
    study.set_user_attr(TABLE_ATTR, table.to_dict())
    assert stored_latency_table(study).primary.to_dict() == table.to_dict()


@pytest.mark.parametrize("damage", ["data", "sha256"])
def test_a_damaged_table_is_an_error_not_a_silent_remeasure(damage: str) -> None:
    study = optuna.create_study()
    store_latency_table(study, DeploymentLatency.single(big_table(layers=2, ranks=3)))
    stored = dict(study._storage.get_study_system_attrs(study._study_id)[TABLE_ATTR])
    stored[damage] = "AAAA" + stored[damage][4:]
    study._storage.set_study_system_attr(study._study_id, TABLE_ATTR, stored)
    with pytest.raises(LatencyTableError, match="stored in the study"):
        stored_latency_table(study)
