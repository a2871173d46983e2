"""Distillation of Hugging Face models: ModelOutput logits by KL, features by cosine or MSE, padding left out."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lrsearch.pipeline._distill import DistillationError, _Distiller, check_distill
from lrsearch.pipeline._finetune import FinetuneConfig, finetune

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::pytorch_lightning.utilities.warnings.PossibleUserWarning")

VOCAB, LABELS, TEMPERATURE = 99, 3, 2.0
NO_DROPOUT_BERT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
NO_DROPOUT_GPT2 = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def bert_config(**extra: Any) -> Any:
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=37, num_labels=LABELS, **extra)


def bert_classifier(**extra: Any) -> nn.Module:
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(bert_config(**extra))


def bert_encoder(**extra: Any) -> nn.Module:
    torch.manual_seed(0)
    return transformers.BertModel(bert_config(**extra))


def gpt2(**extra: Any) -> nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB,
                                                                n_positions=64, **extra))


class HFModule(pl.LightningModule):
    """A Hugging Face model wrapped as Lightning's transformers tutorial does; records its losses."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.own_losses: list[Tensor] = []
        self.step_losses: list[Tensor] = []

    def forward(self, **inputs: Tensor) -> Any:
        return self.model(**inputs)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        outputs = self(**batch)
        self.own_losses.append(outputs.loss.detach())
        return outputs.loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.step_losses.append(outputs["loss"].detach())

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class DirectHFModule(HFModule):
    """Calls the inner model directly, so distillation runs ``self(**inputs)`` itself."""

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.model(**batch).loss


class MeanPooled(HFModule):
    """A sentence-transformers-style embedder: mean-pooled token states, a plain (batch, dim) tensor."""

    def forward(self, **inputs: Tensor) -> Tensor:
        states = self.model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        return (states * mask).sum(1) / mask.sum(1)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        embeddings = self(**batch)
        return embeddings.pow(2).mean()  # stands in for the module's own unsupervised objective


class Encoder(MeanPooled):
    """Returns the encoder's own ModelOutput (last_hidden_state, pooler_output)."""

    def forward(self, **inputs: Tensor) -> Any:
        return self.model(**inputs)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(**batch).last_hidden_state.pow(2).mean()


class NoForward(pl.LightningModule):
    """Lightning's minimal style: no forward, the step calls the inner model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.model(**batch).loss


def tokens(*, labels: str | None, rows: int = 4, seed: int = 0) -> dict[str, Tensor]:
    """One right-padded batch; ``labels`` is None, ``"class"`` (sequence labels) or ``"tokens"`` (causal LM)."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(rows, 9, dtype=torch.long)
    mask[0, 5:] = 0
    batch = {"input_ids": torch.randint(0, VOCAB, (rows, 9), generator=generator), "attention_mask": mask}
    if labels == "class":
        batch["labels"] = torch.randint(0, LABELS, (rows,), generator=generator)
    elif labels == "tokens":
        batch["labels"] = batch["input_ids"].masked_fill(mask == 0, -100)
    return batch


def distiller(student: pl.LightningModule, teacher: nn.Module, distill: bool | str = True,
              alpha: float = 0.5) -> _Distiller:
    config = SimpleNamespace(distill=distill, temperature=TEMPERATURE, alpha=alpha)
    return _Distiller(student, teacher, config, None)  # type: ignore[arg-type]


def perturbed(module: pl.LightningModule) -> pl.LightningModule:
    """A teacher that differs from the student, as the uncompressed original does."""
    teacher = copy.deepcopy(module)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return teacher.eval()


def kl(student: Tensor, teacher: Tensor) -> Tensor:
    return TEMPERATURE ** 2 * F.kl_div(F.log_softmax(student / TEMPERATURE, -1),
                                       F.log_softmax(teacher / TEMPERATURE, -1), reduction="batchmean", log_target=True)


class CallCounter:
    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        model.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))


@pytest.mark.parametrize("cls", [HFModule, DirectHFModule])
def test_model_output_logits_are_distilled_by_kl(cls: type[HFModule]) -> None:
    student = cls(bert_classifier(**NO_DROPOUT_BERT)).eval()
    teacher = perturbed(student)
    batch = tokens(labels="class")
    counter = CallCounter(student.model)
    with torch.no_grad():
        own = student.model(**batch)
        expected = 0.5 * own.loss + 0.5 * kl(own.logits, teacher.model(**batch).logits)
        counter.calls = 0

        total = distiller(student, teacher).wrap(student.training_step)(batch, 0)

    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert counter.calls == (1 if cls is HFModule else 2)  # the step's own self(**batch) call is reused


def test_causal_lm_logits_leave_padding_out_of_the_kl() -> None:
    student = HFModule(gpt2(**NO_DROPOUT_GPT2)).eval()
    teacher = perturbed(student)
    batch = tokens(labels="tokens")
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        own = student.model(**batch)
        expected = 0.75 * own.loss + 0.25 * kl(own.logits[keep], teacher.model(**batch).logits[keep])

        total = distiller(student, teacher, alpha=0.25).wrap(student.training_step)(batch, 0)

    assert keep.sum() == 4 * 9 - 4
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def hand_feature_term(student: Tensor, teacher: Tensor, loss: str) -> Tensor:
    if loss == "cosine":
        return 1 - F.cosine_similarity(student, teacher, dim=-1).mean()
    return F.mse_loss(student, teacher)


@pytest.mark.parametrize("loss", [True, "cosine", "mse"], ids=["by-output", "cosine", "mse"])
def test_encoder_states_are_distilled_as_features_without_padding(loss: bool | str) -> None:
    student = Encoder(bert_encoder(**NO_DROPOUT_BERT)).eval()
    teacher = perturbed(student)
    batch = tokens(labels=None)
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        states, teacher_states = student.model(**batch).last_hidden_state, teacher.model(**batch).last_hidden_state
        own = states.pow(2).mean()
        term = hand_feature_term(states[keep], teacher_states[keep], "cosine" if loss is True else str(loss))

        total = distiller(student, teacher, loss, alpha=0.5).wrap(student.training_step)(batch, 0)

    assert term.item() > 1e-4
    assert total.item() == pytest.approx((0.5 * own + 0.5 * term).item(), rel=1e-5)


@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_pooled_embeddings_are_distilled_when_asked(loss: str) -> None:
    student = MeanPooled(bert_encoder(**NO_DROPOUT_BERT)).eval()
    teacher = perturbed(student)
    batch = tokens(labels=None)
    with torch.no_grad():
        embeddings, teacher_embeddings = student(**batch), teacher(**batch)
        expected = 0.5 * embeddings.pow(2).mean() + 0.5 * hand_feature_term(embeddings, teacher_embeddings, loss)

        total = distiller(student, teacher, loss).wrap(student.training_step)(batch, 0)

    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_sentence_embedding_entry_is_distilled_by_cosine() -> None:
    class Sentence(MeanPooled):
        def forward(self, **inputs: Tensor) -> Any:
            return {"sentence_embedding": super().forward(**inputs)}

        def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
            return self(**batch)["sentence_embedding"].pow(2).mean()

    student = Sentence(bert_encoder(**NO_DROPOUT_BERT)).eval()
    teacher = perturbed(student)
    batch = tokens(labels=None)
    with torch.no_grad():
        own, theirs = student(**batch)["sentence_embedding"], teacher(**batch)["sentence_embedding"]
        expected = own.pow(2).mean() * 0.5 + 0.5 * hand_feature_term(own, theirs, "cosine")

        total = distiller(student, teacher).wrap(student.training_step)(batch, 0)

    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_an_output_with_nothing_to_compare_names_what_was_looked_for() -> None:
    class Scores(HFModule):
        def forward(self, **inputs: Tensor) -> Any:
            return {"scores": self.model(**inputs).logits}

        def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
            return self(**batch)["scores"].sum()

    student = Scores(bert_classifier())
    with pytest.raises(DistillationError, match=r"logit tensors.*'last_hidden_state'.*scores.*HINT: pass forward="):
        distiller(student, perturbed(student)).wrap(student.training_step)(tokens(labels="class"), 0)


def test_a_module_without_forward_is_told_how_to_add_one() -> None:
    student = NoForward(bert_classifier())
    with pytest.raises(DistillationError, match=r"NoForward.*defines no forward.*def forward\(self, \*\*inputs\)"):
        distiller(student, perturbed(student)).wrap(student.training_step)(tokens(labels="class"), 0)


@pytest.mark.parametrize("value", ["l2", 1, None, "KL"])
def test_check_distill_names_the_field_and_the_choices(value: Any) -> None:
    with pytest.raises(ValueError, match=r"^distill must be True, False or one of 'kl', 'cosine', 'mse'"):
        check_distill(value)
    for valid in (True, False, "kl", "cosine", "mse"):
        check_distill(valid)


def loader(labels: str | None, *, batches: int = 2) -> DataLoader:
    rows = [{key: value[row] for key, value in tokens(labels=labels, rows=4, seed=seed).items()}
            for seed in range(batches) for row in range(4)]
    return DataLoader(rows, batch_size=4)


@pytest.mark.slow
@pytest.mark.parametrize(("make", "labels"), [
    pytest.param(lambda: HFModule(bert_classifier(**NO_DROPOUT_BERT)), "class", id="bert-classifier"),
    pytest.param(lambda: HFModule(gpt2(**NO_DROPOUT_GPT2)), "tokens", id="gpt2-lm"),
    pytest.param(lambda: Encoder(bert_encoder(**NO_DROPOUT_BERT)), None, id="bert-encoder-unlabeled"),
])
def test_finetune_distills_hugging_face_models_for_two_steps(tmp_path: Path, make: Any, labels: str | None) -> None:
    student = make()
    teacher = copy.deepcopy(student)
    before = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    config = FinetuneConfig(max_steps=2, alpha=1.0, progress=False, accelerator="cpu")

    finetune(student, teacher=teacher, root_dir=tmp_path, config=config, train_dataloaders=loader(labels))

    assert len(student.step_losses) == 2
    assert abs(student.step_losses[0].item()) <= 1e-5  # alpha=1: the teacher's copy gives a zero first step
    assert student.step_losses[1].item() > 0  # after one update the student has moved away from it
    assert any(not torch.equal(before[name], tensor) for name, tensor in student.state_dict().items())
    assert "training_step" not in student.__dict__


class Embedder(pl.LightningModule):
    """An embedding model as its user writes it: a forward and an optimizer, no training_step (no labels)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).float()
        return F.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=3e-2)


def unlabeled(*, batches: int, seed: int) -> list[dict[str, Tensor]]:
    return [tokens(labels=None, rows=8, seed=seed + i) for i in range(batches)]


def cosine_distance(student: nn.Module, teacher: nn.Module, batches: list[dict[str, Tensor]]) -> float:
    with torch.no_grad():
        return float(torch.cat([1 - F.cosine_similarity(student(**b), teacher(**b), dim=-1) for b in batches]).mean())


def test_a_module_without_training_step_is_distilled_by_the_term_alone(caplog: pytest.LogCaptureFixture) -> None:
    student = Embedder(bert_encoder(**NO_DROPOUT_BERT)).eval()
    teacher = perturbed(student)
    batch = tokens(labels=None)
    with caplog.at_level("INFO", logger="lrsearch"):
        step = distiller(student, teacher, "mse", alpha=0.25).wrap(student.training_step)
    with torch.no_grad():
        expected = F.mse_loss(student(**batch), teacher(**batch))

        total = step(batch, 0)

    assert expected.item() > 1e-6
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)  # the term itself, not alpha times it
    assert not hasattr(step, "__wrapped__")  # Lightning must not mistake it for its own default step
    assert "Embedder defines no training_step" in caplog.text and "alpha does not apply" in caplog.text


def test_a_module_without_training_step_or_forward_is_told_how_to_feed_it() -> None:
    class Bare(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = bert_encoder()

    student = Bare()
    step = distiller(student, perturbed(student), "cosine").wrap(student.training_step)
    with pytest.raises(DistillationError, match=r"Bare.*defines no forward"):
        step(tokens(labels=None), 0)


@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_distilling_unlabeled_batches_recovers_a_factorized_models_features(tmp_path: Path, loss: str) -> None:
    import lrsearch

    # A wide initialization, so that the layers (not the residual stream) shape the embeddings.
    teacher = Embedder(bert_encoder(**NO_DROPOUT_BERT, initializer_range=0.2)).eval()
    train, held_out = unlabeled(batches=16, seed=100), unlabeled(batches=4, seed=500)
    decomposition = lrsearch.Decomposition(teacher, method="svd")
    ranks = {name: 8 for name in decomposition.targets if "pooler" not in name}
    student = decomposition.build(ranks)
    factorized = cosine_distance(student, teacher, held_out)
    config = FinetuneConfig(epochs=3, lr_scale=1.0, distill=loss, progress=False, accelerator="cpu")

    tuned = finetune(copy.deepcopy(student).train(), teacher=copy.deepcopy(teacher), root_dir=tmp_path,
                     config=config, train_dataloaders=DataLoader(train, batch_size=None))

    assert len(ranks) == 12  # every Linear of both layers, rank 8 of 32
    assert factorized > 0.2  # measured 0.38
    assert cosine_distance(tuned.eval(), teacher, held_out) < 0.1 * factorized  # measured 0.02, on unseen batches
    assert "training_step" not in tuned.__dict__


def test_a_module_without_training_step_and_without_distillation_is_refused(tmp_path: Path) -> None:
    from lrsearch._checks import OptionError

    student = Embedder(bert_encoder(**NO_DROPOUT_BERT))
    with pytest.raises(OptionError, match=r"Embedder defines no training_step.*HINT: use FinetuneConfig\(distill='cosine'\)"):
        finetune(student, teacher=None, root_dir=tmp_path, config=FinetuneConfig(distill=False, progress=False),
                 train_dataloaders=unlabeled(batches=2, seed=0))
