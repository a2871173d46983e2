"""Latency lookup table: structure and bookkeeping only; never asserts on wall-clock values."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lrsearch.measure._latency as latency
from lrsearch._errors import CalibrationError, InvalidRankError, LrSearchError, UnknownLayerError
from lrsearch.core import Decomposition, candidate_ranks
from lrsearch.measure._latency import (
    LatencyTable,
    LatencyTableError,
    LayerLatency,
    MissingLatencyError,
    build_latency_table,
    time_call,
)

# One thread: on a busy 2-core machine two threads stall tiny ops on each other.
FAST: dict[str, Any] = {"min_run_time": 0.001, "repeats": 1, "threads": 1}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class KeywordMLP(MLP):
    def forward(self, features: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(features)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class SharedLayer(nn.Module):
    """``fc`` runs twice per forward; ``unused`` never runs."""

    def __init__(self, *, with_unused: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.unused = nn.Linear(32, 32) if with_unused else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc(x)))


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()


@pytest.fixture(scope="module")
def built() -> tuple[MLP, LatencyTable]:
    """One real build shared by the read-only tests (timing is the slow part)."""
    torch.manual_seed(0)
    model = MLP()
    return model, build_latency_table(Decomposition(model, method="svd"), torch.randn(4, 12), **FAST)


def hand_made() -> LatencyTable:
    geometry = {"kind": "linear", "in_features": 32, "out_features": 32, "bias": True,
                "kernel_size": [1, 1], "rows": 1, "in_hw": None, "out_hw": None}
    return LatencyTable(
        device="cpu", threads=2, batch_size=8, torch_version=torch.__version__, dense_model=10.0,
        layers={"a": LayerLatency(dense=2.0, factorized={"linear": {4: 1.0, 8: 0.5, 16: 2.0, 24: 3.0}},
                                  geometry=dict(geometry), input_shape=(8, 32)),
                "b": LayerLatency(dense=3.0, factorized={"linear": {8: 1.0}}, geometry=dict(geometry),
                                  input_shape=(8, 32), calls=2)},
        hardware=latency._hardware(torch.device("cpu")))


# ------------------------------------------------------------------ building
def test_table_has_every_target_and_candidate_rank(built: tuple[MLP, LatencyTable]) -> None:
    mlp, table = built
    decomposition = Decomposition(mlp, method="svd")
    assert set(table.layers) == set(decomposition.targets) == {"fc1", "fc2", "head"}
    for name, layer in table.layers.items():
        geometry = decomposition.geometry(name)
        assert layer.geometry == geometry.to_dict()
        assert list(layer.factorized) == ["linear"]
        assert sorted(layer.factorized["linear"]) == candidate_ranks(geometry, "linear")
    assert sorted(table.layers["fc2"].factorized["linear"]) == [8]  # 32×32 breaks even at 15
    assert table.layers["head"].factorized["linear"] == {}  # 32→5 has no rank below break-even
    times = [table.dense_model] + [layer.dense for layer in table.layers.values()] + [
        t for layer in table.layers.values() for by_rank in layer.factorized.values() for t in by_rank.values()]
    assert all(math.isfinite(t) and t > 0 for t in times)
    assert (table.device, table.batch_size, table.threads) == ("cpu", 4, 1)
    assert table.torch_version == torch.__version__


def test_explicit_ranks_and_conv_schemes() -> None:
    torch.manual_seed(0)
    decomposition = Decomposition(SmallCNN(), method="svd")
    table = build_latency_table(decomposition, torch.randn(2, 3, 8, 8), ranks={"conv": [2, 4]},
                                schemes={"conv": ["channel", "spatial", "tucker2"]}, multiple=2, **FAST)
    conv = table.layers["conv"]
    assert set(conv.factorized) == {"channel", "spatial", "tucker2"}
    assert all(sorted(by_rank) == [2, 4] for by_rank in conv.factorized.values())
    assert conv.input_shape == (2, 3, 8, 8)
    assert sorted(table.layers["head"].factorized["linear"]) == candidate_ranks(
        decomposition.geometry("head"), "linear", multiple=2)
    # A resolved Tucker-2 plan holds a clipped pair: (min(4, Cin=3), min(4, Cout=16)) = (3, 4).
    plan = decomposition.resolve({"conv": 4}, schemes={"conv": "tucker2"})
    assert plan == {"conv": ("tucker2", (3, 4))}
    # Per-layer times that add up to more than the whole model (as on a busy machine) are scaled to fit it.
    scale = min(1.0, table.dense_model / sum(layer.calls * layer.dense for layer in table.layers.values()))
    assert table.predict(plan) == pytest.approx(
        table.dense_model + scale * (conv.factorized["tucker2"][4] - conv.dense), rel=1e-12)


def test_invalid_requests_fail_before_any_timing(mlp: MLP, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: Any, **kwargs: Any) -> float:
        raise AssertionError("timed something before validating the request")

    monkeypatch.setattr(latency, "time_call", never)
    decomposition = Decomposition(mlp, method="svd")
    batch = torch.randn(4, 12)
    with pytest.raises(UnknownLayerError, match="fc3"):
        build_latency_table(decomposition, batch, ranks={"fc3": [8]})
    with pytest.raises(InvalidRankError):
        build_latency_table(decomposition, batch, ranks={"fc2": [64]})
    with pytest.raises(ValueError, match="Linear"):
        build_latency_table(decomposition, batch, schemes={"fc2": ["channel"]})
    with pytest.raises(ValueError, match="batch_size"):
        build_latency_table(decomposition, batch, batch_size=0)
    with pytest.raises(ValueError, match="threads"):
        build_latency_table(decomposition, batch, threads=0)
    with pytest.raises(CalibrationError, match="batch dimension"):
        build_latency_table(decomposition, ["no tensor"])


def test_layer_that_never_runs_is_a_typed_error() -> None:
    decomposition = Decomposition(SharedLayer(with_unused=True), method="svd")
    with pytest.raises(CalibrationError, match="unused"):
        build_latency_table(decomposition, torch.randn(4, 32), **FAST)


def test_shared_layer_counts_its_calls() -> None:
    table = build_latency_table(Decomposition(SharedLayer(), method="svd"), torch.randn(4, 32), **FAST)
    layer = table.layers["fc"]
    assert layer.calls == 2
    assert table.predict({"fc": ("linear", 8)}) == table.dense_model + 2 * (
        layer.factorized["linear"][8] - layer.dense)


def test_users_model_is_unchanged(mlp: MLP) -> None:
    mlp.train()
    mlp.head.eval()  # a mixed mode that must survive as it is
    before = {name: p.detach().clone() for name, p in mlp.named_parameters()}
    modes = {name: module.training for name, module in mlp.named_modules()}
    build_latency_table(Decomposition(mlp, method="svd"), torch.randn(4, 12), **FAST)
    assert {name: module.training for name, module in mlp.named_modules()} == modes
    for name, parameter in mlp.named_parameters():
        assert parameter.device.type == "cpu"
        assert parameter.requires_grad
        assert torch.equal(parameter, before[name])
    assert all(not module._forward_pre_hooks for module in mlp.modules())


@pytest.mark.parametrize("batch_size", [3, 10])
def test_batch_is_resized_to_batch_size(mlp: MLP, batch_size: int) -> None:
    table = build_latency_table(Decomposition(mlp, method="svd"), torch.randn(4, 12),
                                batch_size=batch_size, **FAST)
    assert table.batch_size == batch_size
    assert {name: layer.input_shape for name, layer in table.layers.items()} == {
        "fc1": (batch_size, 12), "fc2": (batch_size, 32), "head": (batch_size, 32)}


def test_tuple_and_dict_batches_are_resized(mlp: MLP) -> None:
    seen: list[Any] = []

    def forward(model: nn.Module, batch: Any) -> torch.Tensor:
        seen.append(batch)
        return model(batch[0])

    inputs, targets = torch.randn(4, 12), torch.arange(4)
    table = build_latency_table(Decomposition(mlp, method="svd"), (inputs, targets, "tag"), batch_size=6,
                                forward=forward, **FAST)
    assert table.layers["fc1"].input_shape == (6, 12)
    assert seen and all(batch[0].shape == (6, 12) and batch[1].tolist() == [0, 1, 2, 3, 0, 1]
                        and batch[2] == "tag" for batch in seen)
    torch.manual_seed(0)
    table = build_latency_table(Decomposition(KeywordMLP(), method="svd"), {"features": inputs}, batch_size=2,
                                **FAST)
    assert table.layers["fc2"].input_shape == (2, 32)


def test_custom_forward_is_used(mlp: MLP) -> None:
    seen: list[Any] = []

    def forward(model: nn.Module, batch: Any) -> torch.Tensor:
        seen.append(batch)
        return model(batch["pixels"])

    table = build_latency_table(Decomposition(mlp, method="svd"), {"pixels": torch.randn(4, 12)},
                                forward=forward, batch_size=5, **FAST)
    assert seen and all(batch["pixels"].shape == (5, 12) for batch in seen)
    assert table.layers["fc1"].input_shape == (5, 12)


def test_progress_counts_up_to_total(mlp: MLP) -> None:
    calls: list[tuple[int, int]] = []
    build_latency_table(Decomposition(mlp, method="svd"), torch.randn(4, 12), min_run_time=0.001, repeats=2, threads=1,
                        progress=lambda done, total: calls.append((done, total)))
    totals = {total for _, total in calls}
    assert len(totals) == 1
    total = totals.pop()
    assert [done for done, _ in calls] == list(range(1, total + 1))
    # Dense layer and each rank twice (repeats=2); the whole model twice, then once per later layer.
    assert total == 2 * ((1 + 1) + (1 + 1) + (1 + 0)) + 2 + 2


def test_threads_are_recorded_and_restored(mlp: MLP, monkeypatch: pytest.MonkeyPatch) -> None:
    previous = torch.get_num_threads()
    decomposition = Decomposition(mlp, method="svd")
    fast = {"min_run_time": 0.001, "repeats": 1}
    table = build_latency_table(decomposition, torch.randn(4, 12), threads=previous + 1, **fast)
    assert table.threads == previous + 1
    assert torch.get_num_threads() == previous

    def fail(done: int, total: int) -> None:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        build_latency_table(decomposition, torch.randn(4, 12), threads=previous + 1, progress=fail, **fast)
    assert torch.get_num_threads() == previous

    seen: list[int] = []

    def fake_time_call(fn: Callable[[], Any], **kwargs: Any) -> float:
        seen.append(kwargs["threads"])
        return 1.0

    monkeypatch.setattr(latency, "time_call", fake_time_call)
    table = build_latency_table(decomposition, torch.randn(4, 12), **fast)
    assert table.threads == previous and set(seen) == {previous}


def test_time_call_uses_given_threads_and_restores_them() -> None:
    previous = torch.get_num_threads()
    seen: list[int] = []
    seconds = time_call(lambda: seen.append(torch.get_num_threads()), device="cpu", threads=previous + 1,
                        min_run_time=0.001, repeats=2, warmup=3)
    assert math.isfinite(seconds) and seconds > 0
    assert seen and set(seen) == {previous + 1}
    assert torch.get_num_threads() == previous
    with pytest.raises(ValueError, match="threads"):
        time_call(lambda: None, device="cpu", threads=0)
    with pytest.raises(ValueError, match="min_run_time"):
        time_call(lambda: None, device="cpu", threads=1, min_run_time=0.0)


# ------------------------------------------------------------------ the table's logic
def test_predict_arithmetic() -> None:
    table = hand_made()
    assert table.predict({}) == 10.0
    assert table.predict({"a": ("linear", 8)}) == 10.0 - 2.0 + 0.5
    assert table.predict({"a": ("linear", 8), "b": ("linear", 8)}) == 8.5 + 2 * (1.0 - 3.0)  # b runs twice


def test_predict_missing_entries_are_typed_errors() -> None:
    table = hand_made()
    with pytest.raises(MissingLatencyError, match=r"rank 12.*\[4, 8, 16, 24\]") as error:
        table.predict({"a": ("linear", 12)})
    assert isinstance(error.value, KeyError) and isinstance(error.value, LrSearchError)
    assert "'a'" in str(error.value)
    with pytest.raises(MissingLatencyError, match="no layer 'c'"):
        table.predict({"c": ("linear", 8)})
    with pytest.raises(MissingLatencyError, match="scheme 'channel'"):
        table.predict({"a": ("channel", 8)})


def test_faster_ranks_keeps_only_strictly_faster() -> None:
    table = hand_made()
    assert table.faster_ranks("a", "linear") == [4, 8]  # 16 ties the dense time, 24 is slower
    assert table.faster_ranks("b", "linear") == [8]


def test_json_round_trip(built: tuple[MLP, LatencyTable], tmp_path: Path) -> None:
    table = built[1]
    path = table.save(tmp_path / "sub" / "latency.json")
    raw = json.loads(path.read_text())
    assert set(raw["layers"]["fc2"]["factorized"]["linear"]) == {"8"}
    loaded = LatencyTable.load(path)
    assert loaded == table
    assert all(isinstance(rank, int) for rank in loaded.layers["fc2"].factorized["linear"])
    assert LatencyTable.from_dict(hand_made().to_dict()) == hand_made()


def test_matches(built: tuple[MLP, LatencyTable]) -> None:
    mlp, table = built
    decomposition = Decomposition(mlp, method="svd")
    geometries = {name: decomposition.geometry(name).to_dict() for name in decomposition.targets}
    settings: dict[str, Any] = {"device": "cpu", "threads": table.threads, "batch_size": 4, "layers": geometries}
    assert table.matches(**settings)
    assert LatencyTable.from_dict(json.loads(json.dumps(table.to_dict()))).matches(**settings)
    assert not table.matches(**{**settings, "threads": table.threads + 1})
    assert not table.matches(**{**settings, "batch_size": 8})
    assert not table.matches(**{**settings, "device": "meta"})
    assert not table.matches(**{**settings, "layers": {**geometries, "fc2": {**geometries["fc2"], "in_features": 64}}})
    assert not table.matches(**{**settings, "layers": {"fc1": geometries["fc1"], "fc2": geometries["fc2"]}})
    for field, value in [("torch_version", "0.0.0"), ("hardware", "another machine")]:
        changed = LatencyTable.from_dict({**table.to_dict(), field: value})
        assert not changed.matches(**settings)


def corrupted_files() -> list[tuple[str, Callable[[dict[str, Any]], Any]]]:
    def set_in(path: list[str], value: Any) -> Callable[[dict[str, Any]], Any]:
        def change(data: dict[str, Any]) -> Any:
            target = data
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
            return data
        return change

    return [
        ("not json", lambda data: "{not json"),
        ("list", lambda data: [1, 2]),
        ("format", set_in(["format"], "something else")),
        ("version", set_in(["version"], 99)),
        ("missing key", lambda data: {k: v for k, v in data.items() if k != "dense_model"}),
        ("negative", set_in(["dense_model"], -1.0)),
        ("nan rank time", set_in(["layers", "a", "factorized", "linear", "8"], float("nan"))),
        ("rank key", set_in(["layers", "a", "factorized", "linear"], {"eight": 1.0})),
        ("threads", set_in(["threads"], "2")),
        ("layers", set_in(["layers"], [])),
    ]


@pytest.mark.parametrize("name, corrupt", corrupted_files(), ids=[name for name, _ in corrupted_files()])
def test_corrupted_file_is_a_typed_error(tmp_path: Path, name: str,
                                         corrupt: Callable[[dict[str, Any]], Any]) -> None:
    path = tmp_path / "latency.json"
    data = corrupt(hand_made().to_dict())
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(LatencyTableError, match="HINT|Expected"):
        LatencyTable.load(path)


def test_truncated_and_binary_files_are_typed_errors(tmp_path: Path) -> None:
    path = hand_made().save(tmp_path / "latency.json")
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(LatencyTableError, match="corrupted or truncated"):
        LatencyTable.load(path)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(LatencyTableError):
        LatencyTable.load(path)


def test_resize_batch_cycles_or_cuts_only_the_batch_dimension() -> None:
    from lrsearch.measure import resize_batch

    batch = {"x": torch.arange(6).reshape(3, 2), "mask": torch.ones(5, 5), "n": 3}
    grown = resize_batch(batch, 7)
    assert grown["x"][:, 0].tolist() == [0, 2, 4, 0, 2, 4, 0] and grown["mask"].shape == (5, 5)
    assert resize_batch((torch.zeros(3, 4), torch.zeros(3)), 2)[1].shape == (2,)
    assert resize_batch(batch, 3) is batch
