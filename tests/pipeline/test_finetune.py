"""Recovery fine-tuning: cloning during a fit, learning-rate scaling, distillation, restored state."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lrsearch._errors import LrSearchError
from lrsearch.pipeline._data import DataError
from lrsearch.pipeline._finetune import DistillationError, FinetuneConfig, finetune
from lrsearch.pipeline._lightning import NotALightningModuleError, clone_module, is_lightning_module, namespace_of

pytestmark = pytest.mark.filterwarnings("ignore::pytorch_lightning.utilities.warnings.PossibleUserWarning")

FAST = {"progress": False, "accelerator": "cpu"}
LR = 0.1


class Classifier(pl.LightningModule):
    """A tiny MLP that logs a torchmetrics attribute and records what each training step saw."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.accuracy = MulticlassAccuracy(num_classes=3, average="micro")
        self.own_losses: list[torch.Tensor] = []
        self.step_losses: list[torch.Tensor] = []
        self.seen_lrs: list[float] = []
        self.seen_base_lrs: list[list[float]] = []
        self.forward_calls = 0

    def forward(self, x: torch.Tensor) -> Any:
        self.forward_calls += 1
        return self.net(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = F.cross_entropy(self.logits(x), y)
        self.own_losses.append(loss.detach().clone())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.accuracy(self.logits(x), y)
        self.log("val_acc", self.accuracy)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=LR)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}

    def on_train_start(self) -> None:
        self.own_losses, self.step_losses, self.seen_lrs, self.seen_base_lrs = [], [], [], []

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.seen_lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        self.seen_base_lrs.append(list(self.trainer.lr_scheduler_configs[0].scheduler.base_lrs))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.step_losses.append(outputs["loss"].detach().clone())


class DirectClassifier(Classifier):
    """Its training_step bypasses ``self(...)``, so distillation needs its own forward pass."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.own_losses.append(loss.detach().clone())
        return {"loss": loss}


class DictOutputClassifier(Classifier):
    """Outputs a dict, which distillation cannot compare without a ``forward``."""

    def forward(self, x: torch.Tensor) -> Any:
        return {"scores": self.net(x)}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)["scores"]


class SkipFirstBatch(Classifier):
    """Returns None for the first batch, which Lightning skips."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return None if batch_idx == 0 else super().training_step(batch, batch_idx)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if outputs:
            super().on_train_batch_end(outputs, batch, batch_idx)


class CloneAtFitEnd(pl.Callback):
    """Clones the module in ``on_fit_end``, before teardown, where the rank search runs."""

    def __init__(self, clone: Any) -> None:
        self.clone = clone
        self.copy: Any = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.copy = self.clone(pl_module)


def _loader(seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=generator)
    y = (x[:, :3] * torch.tensor([1.0, -2.0, 0.5])).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _pretrain(tmp_path: Path, cls: type[Classifier] = Classifier,
              clone: Any = clone_module) -> tuple[Classifier, Classifier, pl.Trainer]:
    """(original, clone taken in on_fit_end, the original's trainer) after 3 real training steps."""
    torch.manual_seed(0)
    module = cls()
    callback = CloneAtFitEnd(clone)
    trainer = pl.Trainer(default_root_dir=tmp_path / "outer", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu",
                         max_steps=3, callbacks=[callback])
    trainer.fit(module, _loader(), _loader(1))
    return module, callback.copy, trainer


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                    reduction="batchmean", log_target=True)


def test_clone_from_on_fit_end_forgets_the_outer_fit(tmp_path: Path) -> None:
    original, clone, trainer = _pretrain(tmp_path)
    assert clone._metric_attributes is None and clone._current_fx_name is None
    assert clone._trainer is None and original._trainer is trainer


def test_plain_deepcopy_from_on_fit_end_is_the_pitfall_that_clone_module_avoids(tmp_path: Path) -> None:
    _, copied, _ = _pretrain(tmp_path, clone=copy.deepcopy)
    with pytest.raises(MisconfigurationException, match="Could not find the `LightningModule` attribute"):
        finetune(copied, teacher=None, root_dir=tmp_path, config=FinetuneConfig(distill=False, **FAST),
                 train_dataloaders=_loader(), val_dataloaders=_loader(1))


def test_clone_module_drops_every_reference_to_the_attached_trainer(tmp_path: Path) -> None:
    original, _, trainer = _pretrain(tmp_path)
    holder = nn.Module()
    holder.inner = original
    holder.trainer_ref = trainer
    clone = clone_module(holder)
    assert clone.trainer_ref is None and clone.inner._trainer is None
    assert holder.trainer_ref is trainer and original._trainer is trainer
    assert torch.equal(clone.inner.net[0].weight, original.net[0].weight)
    assert clone.inner.net[0].weight is not original.net[0].weight


def test_finetune_changes_weights_and_leaves_the_original_alone(tmp_path: Path) -> None:
    original, clone, trainer = _pretrain(tmp_path)
    original.eval()
    original_state, clone_state = _state(original), _state(clone)
    modes = {name: sub.training for name, sub in original.named_modules()}
    grads = [None if p.grad is None else p.grad.clone() for p in original.parameters()]
    returned = finetune(clone, teacher=original, root_dir=tmp_path / "ft", config=FinetuneConfig(**FAST),
                        train_dataloaders=_loader(), val_dataloaders=_loader(1))
    assert returned is clone
    assert any(not torch.equal(clone_state[name], value) for name, value in clone.state_dict().items())
    assert all(torch.equal(original_state[name], value) for name, value in original.state_dict().items())
    assert original._trainer is trainer
    assert {name: sub.training for name, sub in original.named_modules()} == modes
    assert all(torch.equal(p.grad, g) for p, g in zip(original.parameters(), grads, strict=True))
    assert all(parameter.requires_grad for parameter in original.parameters())


def test_lr_scale_multiplies_the_learning_rates_and_scheduler_bases(tmp_path: Path) -> None:
    _, clone, _ = _pretrain(tmp_path)
    finetune(clone, teacher=None, root_dir=tmp_path, config=FinetuneConfig(lr_scale=0.25, epochs=2, distill=False,
                                                                          **FAST), train_dataloaders=_loader())
    assert clone.seen_lrs == [LR * 0.25] * 4 + [LR * 0.25 * 0.5] * 4
    assert clone.seen_base_lrs == [[LR * 0.25]] * 8


@pytest.mark.parametrize("cls", [Classifier, DirectClassifier])
def test_distillation_from_an_identical_teacher_adds_nothing_at_alpha_one(tmp_path: Path,
                                                                          cls: type[Classifier]) -> None:
    original, clone, _ = _pretrain(tmp_path, cls)
    finetune(clone, teacher=original, root_dir=tmp_path, config=FinetuneConfig(alpha=1.0, max_steps=1, **FAST),
             train_dataloaders=_loader())
    assert len(clone.step_losses) == 1
    assert abs(clone.step_losses[0].item()) <= 1e-6
    assert clone.own_losses[0].item() > 0.1


def test_distillation_at_alpha_zero_is_the_module_loss(tmp_path: Path) -> None:
    original, clone, _ = _pretrain(tmp_path)
    finetune(clone, teacher=original, root_dir=tmp_path, config=FinetuneConfig(alpha=0.0, max_steps=3, **FAST),
             train_dataloaders=_loader())
    assert torch.equal(torch.stack(clone.step_losses), torch.stack(clone.own_losses))


@pytest.mark.parametrize(("cls", "forward"), [(Classifier, None), (DirectClassifier, None),
                                              (Classifier, lambda model, batch: model(batch[0])),
                                              (DirectClassifier, lambda model, batch: model(batch[0]))])
def test_distillation_adds_the_weighted_kl_term(tmp_path: Path, cls: type[Classifier], forward: Any) -> None:
    original, clone, _ = _pretrain(tmp_path, cls)
    teacher = copy.deepcopy(original)
    with torch.no_grad():
        teacher.net[2].weight.mul_(3.0)
    x, _ = next(iter(_loader()))
    with torch.no_grad():
        kl = _kl(clone.net(x), teacher.net(x), 3.0)
    clone.forward_calls = 0
    finetune(clone, teacher=teacher, root_dir=tmp_path,
             config=FinetuneConfig(alpha=0.25, temperature=3.0, max_steps=1, **FAST), train_dataloaders=_loader(),
             forward=forward)
    expected = 0.75 * clone.own_losses[0] + 0.25 * 9.0 * kl
    assert kl.item() > 1e-3
    assert clone.step_losses[0].item() == pytest.approx(expected.item(), abs=1e-6)
    assert clone.forward_calls == 1  # the step's own self(x) call is reused, else one extra forward
    assert all(parameter.grad is None for parameter in teacher.parameters())


def test_without_distillation_the_loss_is_the_module_loss(tmp_path: Path) -> None:
    _, clone, _ = _pretrain(tmp_path)
    before = _state(clone)
    finetune(clone, teacher=None, root_dir=tmp_path, config=FinetuneConfig(distill=False, epochs=1, **FAST),
             train_dataloaders=_loader(), val_dataloaders=_loader(1))
    assert torch.equal(torch.stack(clone.step_losses), torch.stack(clone.own_losses))
    assert len(clone.own_losses) == 4
    assert not torch.equal(before["net.0.weight"], clone.net[0].weight)


def test_max_steps_caps_the_training_steps(tmp_path: Path) -> None:
    original, clone, _ = _pretrain(tmp_path)
    finetune(clone, teacher=original, root_dir=tmp_path, config=FinetuneConfig(epochs=5, max_steps=3, **FAST),
             train_dataloaders=_loader())
    assert len(clone.own_losses) == 3


def test_finetune_restores_global_and_module_state(tmp_path: Path) -> None:
    original, clone, _ = _pretrain(tmp_path)
    clone.net[1].eval()
    modes = {name: sub.training for name, sub in clone.named_modules()}
    threads = torch.get_num_threads()
    with torch.no_grad():
        finetune(clone, teacher=original, root_dir=tmp_path, config=FinetuneConfig(max_steps=2, **FAST),
                 train_dataloaders=_loader())
        assert not torch.is_grad_enabled()
    with torch.inference_mode():
        finetune(clone, teacher=original, root_dir=tmp_path, config=FinetuneConfig(max_steps=2, **FAST),
                 train_dataloaders=_loader())
        assert torch.is_inference_mode_enabled()
    assert len(clone.own_losses) == 2
    assert torch.get_num_threads() == threads
    assert "training_step" not in clone.__dict__
    assert clone._trainer is None
    assert {name: sub.training for name, sub in clone.named_modules()} == modes


@pytest.mark.filterwarnings("ignore:'pin_memory' argument:UserWarning")
def test_finetune_runs_on_a_datamodule(tmp_path: Path) -> None:
    original, clone, _ = _pretrain(tmp_path)
    datamodule = pl.LightningDataModule.from_datasets(_loader().dataset, _loader(1).dataset, batch_size=16)
    finetune(clone, teacher=original, root_dir=tmp_path, config=FinetuneConfig(epochs=1, **FAST), datamodule=datamodule)
    assert len(clone.own_losses) == 4


@pytest.mark.parametrize(("field", "value"), [
    ("epochs", 0), ("epochs", 1.5), ("max_steps", 0), ("max_steps", -2), ("lr_scale", 0.0),
    ("lr_scale", float("inf")), ("distill", 1), ("temperature", -1.0), ("alpha", 1.5), ("alpha", True),
    ("accelerator", ""), ("progress", "yes"), ("limit_val_batches", 1.5), ("limit_val_batches", -1),
])
def test_invalid_config_values_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"^{field} must "):
        FinetuneConfig(**{field: value})


def test_config_to_dict_round_trips() -> None:
    config = FinetuneConfig(epochs=3, limit_val_batches=2, **FAST)
    assert FinetuneConfig(**config.to_dict()) == config
    assert config.to_dict()["limit_val_batches"] == 2


def test_missing_or_conflicting_data_raises_a_typed_error(tmp_path: Path) -> None:
    original, clone, _ = _pretrain(tmp_path)
    config = FinetuneConfig(**FAST)
    with pytest.raises(DataError, match="needs training data") as info:
        finetune(clone, teacher=original, root_dir=tmp_path, config=config)
    assert isinstance(info.value, LrSearchError) and isinstance(info.value, ValueError)
    assert "HINT:" in str(info.value)
    datamodule = pl.LightningDataModule.from_datasets(_loader().dataset, batch_size=16)
    with pytest.raises(DataError, match="both a datamodule and dataloaders"):
        finetune(clone, teacher=original, root_dir=tmp_path, config=config, datamodule=datamodule,
                 train_dataloaders=_loader())
    with pytest.raises(DataError, match="LightningDataModule"):
        finetune(clone, teacher=original, root_dir=tmp_path, config=config, datamodule=object())


def test_distillation_problems_raise_typed_errors(tmp_path: Path) -> None:
    original, clone, _ = _pretrain(tmp_path)
    config = FinetuneConfig(**FAST)
    with pytest.raises(DistillationError, match="needs a teacher"):
        finetune(clone, teacher=None, root_dir=tmp_path, config=config, train_dataloaders=_loader())
    with pytest.raises(DistillationError, match="is the module being fine-tuned"):
        finetune(clone, teacher=clone, root_dir=tmp_path, config=config, train_dataloaders=_loader())
    with pytest.raises(DistillationError, match="must be a torch module"):
        finetune(clone, teacher=original.net[0].weight, root_dir=tmp_path, config=config,
                 train_dataloaders=_loader())


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`:UserWarning")
def test_distillation_refuses_manual_optimization_and_passes_skipped_batches_through(tmp_path: Path) -> None:
    original, clone, _ = _pretrain(tmp_path, SkipFirstBatch)
    finetune(clone, teacher=original, root_dir=tmp_path, config=FinetuneConfig(epochs=1, **FAST),
             train_dataloaders=_loader())
    assert len(clone.own_losses) == len(clone.step_losses) == 3
    clone.automatic_optimization = False
    with pytest.raises(DistillationError, match="automatic optimization"):
        finetune(clone, teacher=original, root_dir=tmp_path, config=FinetuneConfig(**FAST),
                 train_dataloaders=_loader())


def test_dict_outputs_need_a_forward_or_no_distillation(tmp_path: Path) -> None:
    original, clone, _ = _pretrain(tmp_path, DictOutputClassifier)
    config = FinetuneConfig(max_steps=1, **FAST)
    with pytest.raises(DistillationError, match=r"logit tensors.*HINT: pass forward="):
        finetune(clone, teacher=original, root_dir=tmp_path, config=config, train_dataloaders=_loader())
    assert "training_step" not in clone.__dict__ and clone._trainer is None
    finetune(clone, teacher=original, root_dir=tmp_path, config=FinetuneConfig(max_steps=1, alpha=1.0, **FAST),
             train_dataloaders=_loader(), forward=lambda model, batch: model(batch[0])["scores"])
    assert abs(clone.step_losses[0].item()) <= 1e-6


def test_a_plain_module_is_refused_with_a_typed_type_error(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 3))
    assert not is_lightning_module(model) and is_lightning_module(Classifier())
    assert namespace_of(Classifier()) is pl
    with pytest.raises(NotALightningModuleError, match=r"needs a LightningModule.*HINT:") as info:
        finetune(model, teacher=None, root_dir=tmp_path, config=FinetuneConfig(distill=False, **FAST),
                 train_dataloaders=_loader())
    assert isinstance(info.value, TypeError) and isinstance(info.value, LrSearchError)


def test_the_lightning_package_is_not_imported_to_answer() -> None:
    was_loaded = "lightning.pytorch" in sys.modules
    assert not is_lightning_module(nn.Linear(2, 2))
    with pytest.raises(NotALightningModuleError):
        namespace_of(nn.Linear(2, 2))
    assert ("lightning.pytorch" in sys.modules) == was_loaded


def test_the_unified_lightning_package_gets_its_own_trainer(tmp_path: Path) -> None:
    lightning = pytest.importorskip("lightning.pytorch")

    class Unified(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(8, 3)
            self.trainers: list[type] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.trainers.append(type(self.trainer))
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=LR)

    module = Unified()
    assert namespace_of(module) is lightning and is_lightning_module(module)
    clone = clone_module(module)
    finetune(clone, teacher=module, root_dir=tmp_path, config=FinetuneConfig(max_steps=2, **FAST),
             train_dataloaders=_loader())
    assert clone.trainers == [lightning.Trainer] * 2
