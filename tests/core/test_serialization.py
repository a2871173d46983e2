"""save/load (folder = recipe.json + plain state_dict), recipe helpers, error cases that must
leave the fresh model untouched, and Lightning checkpoints through the module's hooks."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lrsearch
from lrsearch import LowRankConv2d, LowRankLinear
from tests.core import _models as M



def _batches(shape, count=3, seed=100):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for _ in range(count)]


def _compressed_mlp():
    model = M.seeded(M.MLP)
    return lrsearch.factorize(model, {"fc1": 4, "fc2": "dense", "head": 3}, method="whitened",
                              calibration=_batches((8, 12)))


def _compressed_cnn():
    model = M.seeded(M.ResidualCNN)
    schemes = {"stem": "spatial", "block.conv1": "tucker2", "block.conv2": "channel",
               "block.shortcut": "tucker2"}
    compressed = lrsearch.factorize(model, {"stem": 5, "block.conv1": (4, 6), "block.conv2": 7,
                                            "block.shortcut": (5, 3), "head": 4},
                                    method="svd", conv_scheme=schemes)
    compressed.train()
    with torch.no_grad():  # move the BatchNorm running statistics away from their defaults
        compressed(torch.randn(4, 3, 16, 16))
    return compressed.eval()


def _compressed_transformer():
    model = M.seeded(M.transformer_layer)
    return lrsearch.factorize(model, 0.5, method="whitened", calibration=_batches((4, 6, 32)))


CASES = {
    "mlp": (_compressed_mlp, M.MLP, (5, 12)),
    "residual_cnn": (_compressed_cnn, M.ResidualCNN, (2, 3, 16, 16)),
    "transformer_layer": (_compressed_transformer, M.transformer_layer, (2, 6, 32)),
}


def _types(model):
    return {name: type(module) for name, module in model.named_modules()}


def _weights_files(folder):
    return sorted(p.name for p in Path(folder).glob("weights-*.pt"))


# ---------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("case", sorted(CASES))
def test_save_load_round_trip_is_exact(case, tmp_path):
    build, factory, shape = CASES[case]
    compressed = build().eval()
    folder = tmp_path / "saved"
    assert lrsearch.save(compressed, folder) == folder

    fresh = M.seeded(factory, seed=99)
    loaded = lrsearch.load(folder, fresh)
    assert loaded is fresh
    assert _types(loaded) == _types(compressed)
    for key, value in compressed.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    loaded.eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(loaded(x), compressed(x))
    with torch.inference_mode():  # fused transformer fast path stays off after load as well
        assert torch.equal(loaded(x), compressed(x))


def test_round_trip_into_float64_model_keeps_its_dtype(tmp_path):
    compressed = _compressed_mlp()
    lrsearch.save(compressed, tmp_path / "m")
    fresh = M.seeded(M.MLP).double()
    lrsearch.load(tmp_path / "m", fresh)
    assert {p.dtype for p in fresh.parameters()} == {torch.float64}
    x = torch.randn(3, 12)
    assert torch.allclose(fresh(x.double()), compressed(x).double(), atol=1e-5)


def test_recipe_contents(tmp_path):
    compressed = _compressed_cnn()
    metadata = {"accuracy": 0.91, "notes": ["a", "b"], "nested": {"k": 1}, "none": None}
    lrsearch.save(compressed, tmp_path / "cnn", metadata=metadata)
    recipe = json.loads((tmp_path / "cnn" / "recipe.json").read_text())

    assert recipe["lrsearch_version"] == lrsearch.__version__
    assert recipe["metadata"] == metadata
    layers = recipe["layers"]
    assert set(layers) == {"stem", "block.conv1", "block.conv2", "block.shortcut", "head"}
    assert layers["stem"]["scheme"] == "spatial" and layers["stem"]["rank"] == 5
    assert layers["block.conv1"]["scheme"] == "tucker2" and layers["block.conv1"]["rank"] == [4, 6]
    assert layers["block.conv2"]["scheme"] == "channel" and layers["block.conv2"]["rank"] == 7
    assert layers["block.shortcut"]["rank"] == [5, 3]
    assert layers["head"]["scheme"] == "linear" and layers["head"]["rank"] == 4
    assert "depthwise" not in layers
    assert recipe["weights"]["file"] in _weights_files(tmp_path / "cnn")

    assert lrsearch.read_recipe(tmp_path / "cnn") == recipe
    structure = lrsearch.get_recipe(compressed)
    assert structure["layers"] == layers
    assert json.loads(json.dumps(structure)) == structure  # primitives only


def test_weights_file_is_a_plain_state_dict(tmp_path):
    compressed = _compressed_cnn()
    lrsearch.save(compressed, tmp_path / "cnn")
    (name,) = _weights_files(tmp_path / "cnn")
    state = torch.load(tmp_path / "cnn" / name, weights_only=True)
    assert set(state) == set(compressed.state_dict())
    for key, value in compressed.state_dict().items():
        assert torch.equal(state[key], value), key


def test_apply_recipe_then_strict_load_state_dict():
    compressed = _compressed_transformer().eval()
    fresh = M.seeded(M.transformer_layer, seed=3)
    assert lrsearch.apply_recipe(fresh, lrsearch.get_recipe(compressed)) is fresh
    assert _types(fresh) == _types(compressed)
    fresh.load_state_dict(compressed.state_dict(), strict=True)
    fresh.eval()
    x = torch.randn(2, 6, 32)
    with torch.inference_mode():
        assert torch.equal(fresh(x), compressed(x))


def test_dense_model_round_trips(tmp_path):
    model = M.seeded(M.MLP)
    lrsearch.save(model, tmp_path / "dense")
    assert lrsearch.read_recipe(tmp_path / "dense")["layers"] == {}
    fresh = lrsearch.load(tmp_path / "dense", M.seeded(M.MLP, seed=4))
    x = torch.randn(2, 12)
    assert torch.equal(fresh(x), model(x))


def test_resave_into_same_folder_keeps_one_weights_file(tmp_path):
    folder = tmp_path / "m"
    compressed = _compressed_mlp()
    lrsearch.save(compressed, folder)
    lrsearch.save(compressed, folder)  # identical content: same file name
    assert len(_weights_files(folder)) == 1
    first = _weights_files(folder)[0]

    with torch.no_grad():
        compressed.fc1.first.weight.mul_(2)
    lrsearch.save(compressed, folder, metadata={"round": 2})
    files = sorted(p.name for p in folder.iterdir())
    assert len(_weights_files(folder)) == 1
    assert files == ["recipe.json", *_weights_files(folder)]  # no temporary files left over
    assert _weights_files(folder)[0] != first
    assert lrsearch.read_recipe(folder)["metadata"] == {"round": 2}

    loaded = lrsearch.load(folder, M.seeded(M.MLP, seed=8))
    x = torch.randn(3, 12)
    assert torch.equal(loaded(x), compressed(x))


def test_failing_save_writes_nothing(tmp_path):
    compressed = _compressed_mlp()
    folder = tmp_path / "new"
    with pytest.raises((TypeError, ValueError)):
        lrsearch.save(compressed, folder, metadata={"bad": object()})
    assert not folder.exists() or not any(folder.iterdir())

    # a failing save over an existing one leaves the existing one intact and loadable
    existing = tmp_path / "existing"
    lrsearch.save(compressed, existing)
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    with pytest.raises((TypeError, ValueError)):
        lrsearch.save(M.seeded(M.MLP), existing, metadata={"bad": {1, 2}})
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before
    lrsearch.load(existing, M.seeded(M.MLP))


def test_save_into_a_file_path_is_refused(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    with pytest.raises(lrsearch.RecipeError, match="is a file"):
        lrsearch.save(_compressed_mlp(), path)
    assert path.read_text() == "x"


# ---------------------------------------------------------------------------- load errors

@pytest.fixture
def saved_mlp(tmp_path):
    folder = tmp_path / "saved"
    lrsearch.save(_compressed_mlp(), folder)
    return folder


def _edit_recipe(folder, edit):
    path = folder / "recipe.json"
    recipe = json.loads(path.read_text())
    edit(recipe)
    path.write_text(json.dumps(recipe))


def _assert_load_fails(folder, fresh, *fragments):
    before = M.snapshot(fresh)
    with pytest.raises(lrsearch.RecipeError) as info:
        lrsearch.load(folder, fresh)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    M.assert_same_snapshot(before, fresh)
    assert not any(isinstance(m, (LowRankLinear, LowRankConv2d)) for m in fresh.modules())
    return message


def test_load_missing_folder(tmp_path):
    _assert_load_fails(tmp_path / "nowhere", M.seeded(M.MLP), "recipe.json", "missing")


def test_load_folder_without_recipe(saved_mlp):
    (saved_mlp / "recipe.json").unlink()
    _assert_load_fails(saved_mlp, M.seeded(M.MLP), "recipe.json", "missing")


def test_load_path_that_is_a_file(tmp_path):
    path = tmp_path / "file.pt"
    path.write_bytes(b"not a folder")
    _assert_load_fails(path, M.seeded(M.MLP), str(path))


@pytest.mark.parametrize("text", ["{\"format\": \"lrsearch.recipe\", ", "", "\x00\xff garbage"])
def test_load_corrupted_recipe_json(saved_mlp, text):
    (saved_mlp / "recipe.json").write_text(text, encoding="latin-1")
    _assert_load_fails(saved_mlp, M.seeded(M.MLP), "corrupted")


@pytest.mark.parametrize("content", [[], {"format": "something.else"}, "string"])
def test_load_json_that_is_not_a_recipe(saved_mlp, content):
    (saved_mlp / "recipe.json").write_text(json.dumps(content))
    _assert_load_fails(saved_mlp, M.seeded(M.MLP), "not an lrsearch recipe")


def test_load_truncated_weights(saved_mlp):
    (name,) = _weights_files(saved_mlp)
    path = saved_mlp / name
    path.write_bytes(path.read_bytes()[:-100])
    _assert_load_fails(saved_mlp, M.seeded(M.MLP), name, "sha256")


def test_load_missing_weights_file(saved_mlp):
    (name,) = _weights_files(saved_mlp)
    (saved_mlp / name).unlink()
    _assert_load_fails(saved_mlp, M.seeded(M.MLP), "weights file", "missing")


def test_load_into_wrong_width(saved_mlp):
    message = _assert_load_fails(saved_mlp, M.seeded(M.MLP, hidden=24), "fc1")
    assert "32" in message and "24" in message


def test_load_into_model_whose_dense_layer_differs(tmp_path):
    folder = tmp_path / "m"
    lrsearch.save(lrsearch.factorize(M.seeded(M.MLP), {"fc1": 4}, method="svd"), folder)
    message = _assert_load_fails(folder, M.seeded(M.MLP, out_features=7), "head.weight")
    assert "(5, 32)" in message and "(7, 32)" in message


def test_load_recipe_naming_missing_layer(saved_mlp):
    def edit(recipe):
        recipe["layers"]["block.fc9"] = dict(recipe["layers"]["fc1"])
    _edit_recipe(saved_mlp, edit)
    _assert_load_fails(saved_mlp, M.seeded(M.MLP), "'block.fc9'", "does not have")


def test_load_recipe_with_newer_format_version(saved_mlp):
    _edit_recipe(saved_mlp, lambda recipe: recipe.update(format_version=99))
    _assert_load_fails(saved_mlp, M.seeded(M.MLP), "format version 99")


@pytest.mark.parametrize(("field", "value", "fragment"), [
    ("type", "conv2d", "expected Conv2d"),
    ("rank", 999, "'fc1'"),
    ("type", "lstm", "lstm"),
])
def test_load_recipe_entry_that_does_not_fit(saved_mlp, field, value, fragment):
    _edit_recipe(saved_mlp, lambda recipe: recipe["layers"]["fc1"].update({field: value}))
    _assert_load_fails(saved_mlp, M.seeded(M.MLP), fragment)


def test_load_recipe_without_layers_mapping(saved_mlp):
    _edit_recipe(saved_mlp, lambda recipe: recipe.update(layers=["fc1"]))
    _assert_load_fails(saved_mlp, M.seeded(M.MLP), "layers")


def test_apply_recipe_validates_everything_before_replacing(saved_mlp):
    recipe = lrsearch.read_recipe(saved_mlp)
    recipe["layers"]["zzz"] = dict(recipe["layers"]["fc1"])  # the last entry is the bad one
    fresh = M.seeded(M.MLP)
    before = M.snapshot(fresh)
    with pytest.raises(lrsearch.RecipeError, match="zzz"):
        lrsearch.apply_recipe(fresh, recipe)
    M.assert_same_snapshot(before, fresh)


# ---------------------------------------------------------------------------- Lightning



class LitMLP(pl.LightningModule):
    def __init__(self, hidden: int = 32, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = M.MLP(hidden=hidden)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_index):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def on_save_checkpoint(self, checkpoint):
        lrsearch.on_save_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint):
        lrsearch.on_load_checkpoint(self, checkpoint)


def _data():
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(32, 12, generator=generator)
    y = torch.randint(0, 5, (32,), generator=generator)
    return x, y


def _fit(module, root):
    x, y = _data()
    trainer = pl.Trainer(max_steps=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, accelerator="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # num_workers / few-batches hints
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    return trainer


def test_lightning_checkpoint_of_compressed_module(tmp_path):
    torch.manual_seed(0)
    module = LitMLP()
    x, _ = _data()
    compressed = lrsearch.factorize(module, 0.5, method="whitened", calibration=[x[:16], x[16:]])
    assert isinstance(compressed, LitMLP)
    assert isinstance(compressed.net.fc1, LowRankLinear)
    initial = {k: v.clone() for k, v in compressed.state_dict().items()}

    trainer = _fit(compressed, tmp_path)
    assert any(not torch.equal(initial[k], v) for k, v in compressed.state_dict().items())
    path = tmp_path / "compressed.ckpt"
    trainer.save_checkpoint(path)

    raw = torch.load(path, weights_only=True)  # primitives and tensors only
    assert set(raw[lrsearch.CHECKPOINT_KEY]["layers"]) == {"net.fc1", "net.fc2", "net.head"}

    restored = LitMLP.load_from_checkpoint(path)
    assert _types(restored) == _types(compressed)
    compressed.eval()
    restored.eval()
    assert torch.equal(restored(x), compressed(x))
    for key, value in compressed.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key

    restored_safe = LitMLP.load_from_checkpoint(path, weights_only=True)
    assert torch.equal(restored_safe.eval()(x), compressed(x))

    with pytest.raises(lrsearch.RecipeError, match="net.fc1"):
        LitMLP.load_from_checkpoint(path, hidden=24)


def test_lightning_checkpoint_of_dense_module_loads_unchanged(tmp_path):
    torch.manual_seed(0)
    module = LitMLP()
    trainer = _fit(module, tmp_path)
    path = tmp_path / "dense.ckpt"
    trainer.save_checkpoint(path)
    assert lrsearch.CHECKPOINT_KEY not in torch.load(path, weights_only=True)

    restored = LitMLP.load_from_checkpoint(path)
    assert _types(restored) == _types(module)
    assert not any(isinstance(m, LowRankLinear) for m in restored.modules())
    x, _ = _data()
    assert torch.equal(restored.eval()(x), module.eval()(x))


def test_on_load_checkpoint_rejects_mismatched_state_and_leaves_module_untouched():
    compressed = lrsearch.factorize(M.seeded(M.MLP), {"fc1": 4}, method="svd")
    checkpoint = {"state_dict": compressed.state_dict()}
    lrsearch.on_save_checkpoint(compressed, checkpoint)
    assert checkpoint[lrsearch.CHECKPOINT_KEY]["layers"]["fc1"]["rank"] == 4

    fresh = M.seeded(M.MLP)
    state = dict(checkpoint["state_dict"])
    state["fc2.weight"] = torch.zeros(3, 3)
    before = M.snapshot(fresh)
    with pytest.raises(lrsearch.RecipeError, match="fc2.weight"):
        lrsearch.on_load_checkpoint(fresh, {**checkpoint, "state_dict": state})
    M.assert_same_snapshot(before, fresh)

    lrsearch.on_load_checkpoint(fresh, checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    x = torch.randn(2, 12)
    assert torch.equal(fresh(x), compressed(x))

    dense_checkpoint = {"state_dict": M.seeded(M.MLP).state_dict()}
    lrsearch.on_save_checkpoint(M.seeded(M.MLP), dense_checkpoint)
    assert lrsearch.CHECKPOINT_KEY not in dense_checkpoint
    untouched = M.seeded(M.MLP)
    before = M.snapshot(untouched)
    lrsearch.on_load_checkpoint(untouched, dense_checkpoint)
    M.assert_same_snapshot(before, untouched)
