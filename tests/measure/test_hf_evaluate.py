"""Hugging Face conventions without hooks: dict batches with labels, ``.logits``, causal LMs, clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import lrsearch
from lrsearch.core._runtime import default_forward
from lrsearch.measure._evaluate import EvaluationError, Evaluator, default_batch_fn

transformers = pytest.importorskip("transformers")

VOCAB, LABELS = 99, 3


def bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, num_labels=LABELS)
    return transformers.BertForSequenceClassification(config).eval()


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def token_batches(*, labels: bool = True, seed: int = 0) -> list[dict[str, Tensor]]:
    """Right-padded token batches; the first row of each ends in 3 padding positions."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for size in (4, 3):
        mask = torch.ones(size, 9, dtype=torch.long)
        mask[0, 6:] = 0
        batch = {"input_ids": torch.randint(0, VOCAB, (size, 9), generator=generator), "attention_mask": mask}
        if labels:
            batch["labels"] = torch.randint(0, LABELS, (size,), generator=generator)
        batches.append(batch)
    return batches


def logits_of(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


class KeywordRecorder:
    """Records the keyword names of every forward call of a module."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[set[str]] = []
        model.register_forward_pre_hook(lambda _, args, kwargs: self.calls.append(set(kwargs)), with_kwargs=True)


def test_sequence_classification_is_scored_by_accuracy_without_hooks() -> None:
    model, batches = bert(), token_batches()
    recorder = KeywordRecorder(model)
    hits = torch.cat([logits_of(model, batch).argmax(-1) == batch["labels"] for batch in batches])

    evaluation = Evaluator(batches).evaluate(model)

    assert evaluation.value == pytest.approx(hits.float().mean().item())
    assert evaluation.correct is not None and torch.equal(evaluation.correct, hits)
    assert evaluation.samples == 7 and evaluation.metric_name == "accuracy"
    # labels are the targets, not an input: the model is not asked to compute its own loss
    assert recorder.calls[-2:] == [{"input_ids", "attention_mask"}] * 2


def test_batch_encoding_and_tuple_batches_give_the_same_score() -> None:
    model, batches = bert(), token_batches()
    expected = Evaluator(batches).evaluate(model).value
    encodings = [transformers.BatchEncoding(batch) for batch in batches]
    tuples = [(batch["input_ids"], batch["labels"]) for batch in batches]
    unmasked = torch.cat([model(input_ids=ids).logits.argmax(-1) == y for ids, y in tuples]).float().mean()

    assert Evaluator(encodings).evaluate(model).value == pytest.approx(expected)
    assert Evaluator(tuples).evaluate(model).value == pytest.approx(unmasked.item())


def hand_next_token(model: nn.Module, batches: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
    """(hits, per-token losses) of next-token prediction, skipping padding and -100 by hand."""
    hits, losses = [], []
    for batch in batches:
        logits = logits_of(model, batch)
        targets = batch.get("labels", batch["input_ids"])
        for row in range(logits.shape[0]):
            for position in range(logits.shape[1] - 1):
                target = targets[row, position + 1]
                if batch["attention_mask"][row, position + 1] == 0 or target == -100:
                    continue
                hits.append(logits[row, position].argmax() == target)
                losses.append(nn.functional.cross_entropy(logits[row, position], target))
    return torch.stack(hits), torch.stack(losses)


@pytest.mark.parametrize("labelled", [False, True], ids=["input-ids-only", "labels-are-input-ids"])
def test_a_causal_lm_is_scored_on_the_next_token(labelled: bool) -> None:
    model, batches = gpt2(), token_batches(labels=False)
    if labelled:  # the Hugging Face collator's layout: labels are the ids, -100 on padding and the prompt
        for batch in batches:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            batch["labels"][:, :2] = -100
    hits, losses = hand_next_token(model, batches)

    accuracy = Evaluator(batches).evaluate(model)
    loss_evaluator = Evaluator(batches, metric="loss")
    loss = loss_evaluator.evaluate(model)

    assert accuracy.metric_name == "next-token accuracy" and loss.metric_name == "next-token loss"
    assert accuracy.samples == loss.samples == hits.numel() == (7 * 8 - 2 * 3 - (7 if labelled else 0))
    assert accuracy.correct is not None and torch.equal(accuracy.correct, hits)
    assert accuracy.value == pytest.approx(hits.float().mean().item())
    assert loss.value == pytest.approx(losses.mean().item(), rel=1e-5)
    assert loss_evaluator.higher_is_better is False and Evaluator(batches).higher_is_better is True


def test_the_loss_matches_the_models_own_loss_when_padding_is_labelled_minus_100() -> None:
    model, batch = gpt2(), token_batches(labels=False)[0]
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        own = model(**batch).loss
    assert Evaluator([batch], metric="loss").evaluate(model).value == pytest.approx(own.item(), rel=1e-5)


class TokenTagger(nn.Module):
    """Per-token class scores in a dict, like a token-classification head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, LABELS)

    def forward(self, input_ids: Tensor) -> dict[str, Tensor]:
        return {"logits": self.embed(input_ids)}


def test_token_labels_are_scored_in_place_and_minus_100_is_left_out() -> None:
    model, ids = TokenTagger(), torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    labels = torch.randint(0, LABELS, (2, 5), generator=torch.Generator().manual_seed(4))
    labels[0, 3:] = -100
    kept = labels != -100
    with torch.no_grad():
        hits = model(ids)["logits"].argmax(-1)[kept] == labels[kept]

    evaluation = Evaluator([{"input_ids": ids, "labels": labels}]).evaluate(model)

    assert evaluation.samples == 8 and evaluation.metric_name == "accuracy"
    assert evaluation.correct is not None and torch.equal(evaluation.correct, hits)


def test_user_metrics_get_the_scored_rows_and_their_own_name() -> None:
    model, batches = gpt2(), token_batches(labels=False)
    hits, _ = hand_next_token(model, batches)

    def token_accuracy(outputs: Tensor, targets: Tensor) -> Tensor:
        return (outputs.argmax(-1) == targets).float().mean()

    evaluator = Evaluator(batches, metric=token_accuracy)
    evaluation = evaluator.evaluate(model)

    assert evaluation.value == pytest.approx(hits.float().mean().item())
    assert evaluation.metric_name == "token_accuracy" and evaluator.higher_is_better is None


def test_an_output_without_logits_names_the_output_not_a_batch_fn_nobody_passed() -> None:
    model = transformers.BertModel(bert().config).eval()
    with pytest.raises(EvaluationError, match=r"BaseModelOutput\w*, has no logits.*last_hidden_state") as caught:
        Evaluator(token_batches()).evaluate(model)
    assert "batch_fn returned" not in str(caught.value) and "HINT: pass batch_fn=" in str(caught.value)


@pytest.mark.parametrize(("batch", "problem"), [
    pytest.param({"x": torch.randn(2, 6)}, r"no 'labels' entry.*HINT: name the targets 'labels'", id="no-ids"),
    pytest.param(token_batches(labels=False)[0], r"no 'labels' entry.*logits of shape \(4, 3\)", id="classifier-ids"),
])
def test_a_dict_batch_without_targets_says_what_it_looked_for(batch: dict[str, Tensor], problem: str) -> None:
    with pytest.raises(EvaluationError, match=problem):
        Evaluator([batch]).evaluate(bert())


def test_a_tuple_output_is_refused_with_a_hint() -> None:
    model = bert()
    model.config.return_dict = False
    with pytest.raises(EvaluationError, match=r"a tuple, has no logits.*HINT: pass batch_fn="):
        Evaluator(token_batches()).evaluate(model)


def test_default_forward_and_batch_fn_leave_labels_out_of_the_inputs() -> None:
    model, batch = bert(), token_batches()[0]
    recorder = KeywordRecorder(model)
    with torch.no_grad():
        output = default_forward(model, batch)
        logits, targets = default_batch_fn(model, batch)
    assert output.loss is None and torch.equal(output.logits, logits) and targets is batch["labels"]
    assert recorder.calls == [{"input_ids", "attention_mask"}] * 2


def test_a_custom_module_with_dict_batches_needs_no_hooks() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(6, LABELS)

        def forward(self, features: Tensor) -> Any:
            return self.body(features)

    generator = torch.Generator().manual_seed(0)
    batch = {"features": torch.randn(5, 6, generator=generator), "labels": torch.randint(0, LABELS, (5,), generator=generator)}
    model = Net()
    with torch.no_grad():
        expected = (model(batch["features"]).argmax(-1) == batch["labels"]).float().mean().item()
    assert Evaluator([batch]).evaluate(model).value == pytest.approx(expected)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_search_runs_on_a_bert_classifier_without_hooks(tmp_path: Path) -> None:
    model = bert()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, VOCAB, (8, 12), generator=generator),
                "attention_mask": torch.ones(8, 12, dtype=torch.long),
                "labels": torch.randint(0, LABELS, (8,), generator=generator)} for _ in range(3)]

    result = lrsearch.search(model, batches, run_dir=str(tmp_path), n_trials=3, objective="macs")

    assert result.baseline == pytest.approx(Evaluator(batches).evaluate(model).value)
    assert "bert.encoder.layer.0.attention.self.query" in result.space.layers
    assert result.best is not None and result.best.macs < result.dense["macs"]
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_search_runs_on_gpt2_without_hooks(tmp_path: Path) -> None:
    """GPT-2's transformers Conv1D layers are searched, scored by next-token accuracy, with no hooks."""
    model, batches = gpt2(), token_batches(labels=False)
    result = lrsearch.search(model, batches, run_dir=str(tmp_path), n_trials=3, objective="macs")
    assert result.baseline == pytest.approx(Evaluator(batches).evaluate(model).value)
    assert "transformer.h.0.attn.c_attn" in result.space.layers
    assert result.best is not None and result.best.macs < result.dense["macs"]
