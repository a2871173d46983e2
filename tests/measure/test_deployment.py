"""Latency over several deployment batch sizes: one table each, combined as a weighted mean or worst case."""

from __future__ import annotations

import pytest
import torch

from lrsearch.measure import DeploymentLatency, LatencyTable, LatencyTableError, LayerLatency

GEOMETRY = {"kind": "linear", "in_features": 64, "out_features": 64}


def _table(batch_size: int, dense: float, fast: dict[int, float], model: float) -> LatencyTable:
    layer = LayerLatency(dense=dense, factorized={"linear": fast}, geometry=dict(GEOMETRY))
    return LatencyTable(device="cpu", threads=1, batch_size=batch_size, torch_version=torch.__version__,
                        dense_model=model, layers={"fc": layer})


# Batch 1: rank 8 is 0.5 ms slower than dense; batch 256: rank 8 saves 4 ms of a 10 ms model.
SMALL = _table(1, 1e-3, {8: 1.5e-3, 16: 1.8e-3}, 2e-3)
LARGE = _table(256, 6e-3, {8: 2e-3, 16: 3e-3}, 10e-3)


def test_one_table_predicts_exactly_what_the_table_predicts() -> None:
    single = DeploymentLatency.single(LARGE)
    plan = {"fc": ("linear", 8)}
    assert single.predict(plan) == pytest.approx(LARGE.predict(plan))
    assert single.faster_ranks("fc", "linear") == LARGE.faster_ranks("fc", "linear") == [8, 16]
    assert single.dense_layer("fc") == pytest.approx(6e-3)


def test_weighted_mean_and_worst_case_of_relative_latencies() -> None:
    plan = {"fc": ("linear", 8)}
    small_ratio = (2e-3 + 0.5e-3) / 2e-3   # 1.25: slower at batch 1
    large_ratio = (10e-3 - 4e-3) / 10e-3   # 0.6: faster at batch 256
    mean = DeploymentLatency((SMALL, LARGE), (1.0, 1.0))
    assert mean.predict(plan) == pytest.approx((small_ratio + large_ratio) / 2 * 2e-3)
    worst = DeploymentLatency((SMALL, LARGE), (1.0, 1.0), "max")
    assert worst.predict(plan) == pytest.approx(small_ratio * 2e-3)
    assert mean.predict_each(plan) == {1: pytest.approx(2.5e-3), 256: pytest.approx(6e-3)}


def test_a_rank_is_offered_when_it_lowers_the_weighted_relative_latency() -> None:
    # Rank 8: +0.25 at batch 1, -0.4 at batch 256; rank 16: +0.4 and -0.3.
    assert DeploymentLatency((SMALL, LARGE), (1.0, 1.0)).faster_ranks("fc", "linear") == [8]
    assert DeploymentLatency((SMALL, LARGE), (3.0, 1.0)).faster_ranks("fc", "linear") == []


def test_round_trip_and_bare_tables() -> None:
    deployment = DeploymentLatency((SMALL, LARGE), (1.0, 2.0), "max")
    again = DeploymentLatency.from_dict(deployment.to_dict())
    assert again.to_dict() == deployment.to_dict()
    assert DeploymentLatency.from_dict(LARGE.to_dict()).tables[0].to_dict() == LARGE.to_dict()


@pytest.mark.parametrize(("tables", "weights", "reduce", "match"), [
    ((SMALL,), (1.0, 2.0), "mean", "one weight per latency table"),
    ((SMALL, LARGE), (1.0, 1.0), "median", "Unknown latency reduction"),
    ((SMALL, SMALL), (1.0, 1.0), "mean", "must appear once"),
])
def test_bad_deployments(tables, weights, reduce, match) -> None:
    with pytest.raises(LatencyTableError, match=match):
        DeploymentLatency(tables, weights, reduce)


def test_layers_timed_apart_that_add_up_to_more_than_the_model_never_predict_a_negative_latency() -> None:
    # Two layers of 6 ms each in a model timed at 10 ms: each is scaled to fit, savings keep their order.
    fast = {8: 1e-3, 16: 2e-3}
    layers = {name: LayerLatency(dense=6e-3, factorized={"linear": dict(fast)}, geometry=dict(GEOMETRY))
              for name in ("a", "b")}
    table = LatencyTable(device="cpu", threads=1, batch_size=1, torch_version=torch.__version__,
                         dense_model=10e-3, layers=layers)
    both = table.predict({"a": ("linear", 8), "b": ("linear", 8)})
    one = table.predict({"a": ("linear", 8)})
    assert 0 < both < one < 10e-3
    assert both == pytest.approx(10e-3 * 2e-3 / 12e-3)
