"""Evaluator: micro accuracy, custom metrics, progressive chunks, modes, inference mode and errors."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torchmetrics
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lrsearch._errors import LrSearchError
from lrsearch.measure._evaluate import (
    Evaluation,
    EvaluationError,
    Evaluator,
    check_metric,
    default_batch_fn,
)
from lrsearch.pipeline._metric import resolve_metric

CLASSES = 4


def classification_data(sizes: tuple[int, ...] = (10, 10, 5), *, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=generator), torch.randint(0, CLASSES, (size,), generator=generator))
            for size in sizes]


def classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, CLASSES))


def hand_accuracy(model: nn.Module, data: list[tuple[Tensor, Tensor]]) -> tuple[float, Tensor]:
    model.eval()
    with torch.no_grad():
        hits = torch.cat([model(x).argmax(-1) == y for x, y in data])
    return hits.float().mean().item(), hits


def test_accuracy_matches_hand_computation_and_torchmetrics_micro() -> None:
    data, model = classification_data(), classifier()
    expected, hits = hand_accuracy(model, data)
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in data])
    targets = torch.cat([y for _, y in data])
    reference = torchmetrics.functional.accuracy(logits, targets, task="multiclass", num_classes=CLASSES,
                                                 average="micro")

    evaluation = Evaluator(data).evaluate(model)

    assert evaluation.value == pytest.approx(expected) == pytest.approx(reference.item())
    assert evaluation.samples == 25
    assert evaluation.correct is not None and torch.equal(evaluation.correct, hits)
    assert evaluation.correct.dtype == torch.bool and evaluation.correct.device.type == "cpu"


def test_accuracy_is_micro_not_macro_on_an_imbalanced_set() -> None:
    # 8 samples of class 0, 2 of class 1, and a "model" that always predicts class 0.
    logits = torch.tensor([[1.0, 0.0]]).repeat(10, 1)
    targets = torch.tensor([0] * 8 + [1] * 2)
    macro = MulticlassAccuracy(num_classes=2)(logits, targets).item()  # torchmetrics' default: macro

    value = Evaluator([(logits, targets)]).evaluate(nn.Identity()).value

    assert value == pytest.approx(0.8)
    assert macro == pytest.approx(0.5)


def test_sequence_outputs_score_every_position() -> None:
    logits = torch.randn(3, 5, CLASSES)
    targets = torch.randint(0, CLASSES, (3, 5))
    evaluation = Evaluator([(logits, targets)]).evaluate(nn.Identity())
    assert evaluation.samples == 15
    assert evaluation.value == pytest.approx((logits.argmax(-1) == targets).float().mean().item())


def regression_data() -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, generator=generator), torch.randn(size, 1, generator=generator))
            for size in (8, 8, 4)]


def test_custom_torchmetrics_metric_on_a_regression_model() -> None:
    data, model = regression_data(), nn.Linear(3, 1)
    with torch.no_grad():
        expected = torch.cat([(model(x) - y) ** 2 for x, y in data]).mean().item()
    metric = torchmetrics.MeanSquaredError()
    metric.update(torch.zeros(2, 1), torch.ones(2, 1))  # the user's own state, which must survive
    evaluator = Evaluator(data, metric=metric)

    first, second = evaluator.evaluate(model), evaluator.evaluate(model)

    assert first.value == pytest.approx(expected) and second.value == pytest.approx(expected)
    assert first.samples == 20 and first.correct is None
    assert metric.compute().item() == pytest.approx(1.0)  # the user's metric was not reset or updated
    assert metric.sync_on_compute is True


def test_plain_function_is_called_once_on_all_outputs() -> None:
    data, model = regression_data(), nn.Linear(3, 1)
    calls: list[tuple[int, int]] = []

    def mean_absolute_error(outputs: Tensor, targets: Tensor) -> Tensor:
        calls.append((outputs.shape[0], targets.shape[0]))
        return (outputs - targets).abs().mean()

    evaluation = Evaluator(data, metric=mean_absolute_error).evaluate(model)

    with torch.no_grad():
        expected = torch.cat([(model(x) - y).abs() for x, y in data]).mean().item()
    assert calls == [(20, 20)]
    assert evaluation.value == pytest.approx(expected) and evaluation.samples == 20


def test_plain_function_may_return_a_python_float() -> None:
    evaluation = Evaluator(regression_data(), metric=lambda outputs, targets: 0.25).evaluate(nn.Linear(3, 1))
    assert evaluation.value == 0.25


def metric_kinds() -> list[Any]:
    return [
        pytest.param(None, id="default-accuracy"),
        pytest.param(MulticlassAccuracy(CLASSES, average="micro"), id="torchmetrics"),
        pytest.param(lambda outputs, targets: (outputs.argmax(-1) == targets).float().mean(), id="function"),
    ]


@pytest.mark.parametrize("metric", metric_kinds())
def test_iter_chunks_is_cumulative_and_ends_at_evaluate(metric: Any) -> None:
    data, model = classification_data((6, 6, 6, 6, 3)), classifier()
    evaluator = Evaluator(data, metric=metric)

    chunks = list(evaluator.iter_chunks(model, chunk_batches=2))
    final = evaluator.evaluate(model)

    assert [chunk.samples for chunk in chunks] == [12, 24, 27]
    assert chunks[0].value == pytest.approx(hand_accuracy(model, data[:2])[0])
    assert chunks[-1].value == pytest.approx(final.value) == pytest.approx(hand_accuracy(model, data)[0])
    if metric is None:
        assert chunks[-1].correct is not None and final.correct is not None
        assert torch.equal(chunks[-1].correct, final.correct)
        assert torch.equal(chunks[1].correct, final.correct[:24])  # type: ignore[index]


def test_iter_chunks_can_stop_early_and_leaves_the_caller_alone_between_chunks() -> None:
    data, model = classification_data((5, 5, 5)), classifier()
    model.train()
    chunks = Evaluator(data).iter_chunks(model)

    first = next(chunks)

    assert first.samples == 5
    assert model.training and all(module.training for module in model.modules())
    assert not torch.is_inference_mode_enabled()
    chunks.close()


class MixedModes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = classifier()
        self.norm = nn.BatchNorm1d(CLASSES)
        self.seen_inside: list[tuple[bool, bool, bool]] = []
        self.register_forward_hook(self._record)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.body(x))

    def _record(self, module: nn.Module, args: Any, output: Tensor) -> None:
        in_eval = not any(sub.training for sub in self.modules())
        self.seen_inside.append((in_eval, torch.is_inference_mode_enabled(), output.requires_grad))


def test_modes_are_restored_and_no_graph_is_built() -> None:
    model = MixedModes()
    model.train()
    model.body[2].eval()  # dropout frozen by the user
    model.norm.eval()
    before = {name: module.training for name, module in model.named_modules()}
    evaluator = Evaluator(classification_data())

    evaluation = evaluator.evaluate(model)

    assert {name: module.training for name, module in model.named_modules()} == before
    assert model.seen_inside and all(seen == (True, True, False) for seen in model.seen_inside)
    assert evaluation.correct is not None and not evaluation.correct.is_inference()


def test_non_finite_logits_count_as_wrong() -> None:
    targets = torch.tensor([0, 1, 2, 3])
    logits = torch.eye(CLASSES) * 5  # every row right
    logits[1, 1] = math.nan  # argmax would pick the NaN: the right class
    logits[2, 2] = math.inf  # argmax picks the inf: also the right class
    logits[3, 0] = -math.inf

    evaluation = Evaluator([(logits, targets)]).evaluate(nn.Identity())

    assert evaluation.correct is not None
    assert evaluation.correct.tolist() == [True, False, False, False]
    assert evaluation.value == pytest.approx(0.25)


def test_a_custom_metric_returning_nan_gives_nan() -> None:
    evaluation = Evaluator(regression_data(), metric=lambda outputs, targets: math.nan).evaluate(nn.Linear(3, 1))
    assert math.isnan(evaluation.value)


class CountingData:
    """An iterable that counts how often it is iterated and how many batches were pulled."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        self.batches, self.iterations, self.pulled = batches, 0, 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.iterations += 1
        for batch in self.batches:
            self.pulled += 1
            yield batch


def test_data_is_read_once_and_max_batches_stops_reading() -> None:
    data = CountingData(classification_data((4, 4, 4, 4)))
    evaluator = Evaluator(data, max_batches=2)
    evaluator.evaluate(classifier())
    evaluation = evaluator.evaluate(classifier())
    assert (data.iterations, data.pulled) == (1, 2)
    assert evaluation.samples == 8


def test_default_batch_fn_uses_the_first_two_entries() -> None:
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    output, target = default_batch_fn(nn.Identity(), (x, y, "extra"))
    assert output is x and target is y


def broken_model() -> nn.Module:
    return nn.Linear(7, CLASSES)  # the data has 6 features


@pytest.mark.parametrize(("make", "problem"), [
    pytest.param(lambda: Evaluator([]), "empty", id="empty-data"),
    pytest.param(lambda: Evaluator(classification_data(), max_batches=0), "max_batches", id="max-batches-0"),
    pytest.param(lambda: Evaluator(classification_data(), metric=3), "neither", id="metric-a-number"),
    pytest.param(lambda: Evaluator(classification_data(), metric="f1"), "Unknown metric name 'f1'.*'loss'",
                 id="metric-an-unknown-name"),
    pytest.param(lambda: Evaluator(classification_data()).iter_chunks(classifier(), chunk_batches=0),
                 "chunk_batches", id="chunk-batches-0"),
    pytest.param(lambda: Evaluator([{"x": torch.randn(2, 6), "y": torch.zeros(2)}]).evaluate(classifier()),
                 "dict batch has no 'labels'.*batch_fn=", id="dict-batch"),
    pytest.param(lambda: Evaluator([torch.randn(2, 6)]).evaluate(classifier()), "no targets", id="no-targets"),
    pytest.param(lambda: Evaluator([(torch.randn(2, 6), [0, 1])]).evaluate(classifier()),
                 "targets are not a tensor.*Got a list", id="list-targets"),
    pytest.param(lambda: Evaluator(classification_data()).evaluate(broken_model()),
                 "batch 0: RuntimeError", id="model-error"),
    pytest.param(lambda: Evaluator(classification_data(), batch_fn=lambda model, batch: model(batch[0]))
                 .evaluate(classifier()), "pair", id="batch-fn-not-a-pair"),
    pytest.param(lambda: Evaluator([(torch.randn(4, 3), torch.rand(4))]).evaluate(nn.Linear(3, CLASSES)),
                 "class-index targets", id="float-targets"),
    pytest.param(lambda: Evaluator([(torch.randn(4, 3), torch.eye(CLASSES))]).evaluate(nn.Linear(3, CLASSES)),
                 r"cannot score.*target \(4, 4\)", id="one-hot-targets"),
    pytest.param(lambda: Evaluator([(torch.randn(4, 3), torch.tensor([0, 1, 9, 2]))])
                 .evaluate(nn.Linear(3, CLASSES)), r"batch 0: .*not a class index.*from 0 to 9", id="target-out-of-range"),
    pytest.param(lambda: Evaluator(classification_data(), metric=lambda outputs, targets: outputs)
                 .evaluate(classifier()), "single number", id="metric-not-scalar"),
    pytest.param(lambda: Evaluator(classification_data(), metric=lambda outputs, targets: 1 / 0)
                 .evaluate(classifier()), "ZeroDivisionError", id="metric-fn-raises"),
])
def test_errors_are_typed_and_explain_themselves(make: Any, problem: str) -> None:
    with pytest.raises(EvaluationError, match=problem) as caught:
        make()
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, LrSearchError)
    assert "Expected" in str(caught.value) or "HINT" in str(caught.value)


def test_a_failing_batch_is_named_and_the_cause_kept() -> None:
    data = classification_data((3, 3))
    data[1] = (torch.randn(3, 7), data[1][1])
    with pytest.raises(EvaluationError, match="batch 1") as caught:
        Evaluator(data).evaluate(classifier())
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert "HINT: pass batch_fn=" in str(caught.value)


def test_custom_batch_fn_for_dict_batches() -> None:
    data = [{"x": x, "label": y} for x, y in classification_data()]
    model = classifier()
    evaluation = Evaluator(data, batch_fn=lambda m, batch: (m(batch["x"]), batch["label"])).evaluate(model)
    assert evaluation.value == pytest.approx(hand_accuracy(model, classification_data())[0])


def test_loss_is_the_mean_cross_entropy_per_row_and_lower_is_better() -> None:
    data, model = classification_data(), classifier()
    model.eval()
    with torch.no_grad():
        expected = torch.cat([nn.functional.cross_entropy(model(x), y, reduction="none") for x, y in data]).mean()
    evaluator = Evaluator(data, metric="loss")

    chunks = list(evaluator.iter_chunks(model, chunk_batches=2))

    assert chunks[-1].value == pytest.approx(expected.item(), rel=1e-6)
    assert [chunk.samples for chunk in chunks] == [20, 25]
    assert chunks[-1].metric_name == "loss" and chunks[-1].correct is None
    assert evaluator.higher_is_better is False
    assert Evaluator(data).higher_is_better is True and Evaluator(data, metric="accuracy").higher_is_better is True
    assert Evaluator(data, metric=MulticlassAccuracy(CLASSES)).higher_is_better is None


def test_every_evaluation_names_its_metric() -> None:
    data, model = classification_data(), classifier()

    def my_score(outputs: Tensor, targets: Tensor) -> float:
        return 0.5

    assert Evaluator(data).evaluate(model).metric_name == "accuracy"
    assert Evaluator(data, metric=my_score).evaluate(model).metric_name == "my_score"
    assert Evaluator(data, metric=MulticlassAccuracy(CLASSES)).evaluate(model).metric_name == "MulticlassAccuracy"


def test_targets_of_minus_100_are_left_out() -> None:
    logits = torch.eye(CLASSES) * 5
    targets = torch.tensor([0, -100, 2, 0])
    evaluation = Evaluator([(logits, targets)]).evaluate(nn.Identity())
    assert evaluation.correct is not None and evaluation.correct.tolist() == [True, True, False]
    assert evaluation.samples == 3


def test_metric_names_are_checked_before_any_data_is_read() -> None:
    check_metric("loss")
    with pytest.raises(EvaluationError, match="Unknown metric name 'los'"):
        check_metric("los")
    with pytest.raises(EvaluationError, match="Unknown metric name 'los'"):
        resolve_metric(metric="los", monitor=None, metric_name=None)
    assert resolve_metric(metric="loss", monitor=None, metric_name=None) == ("loss", None)


def test_evaluation_is_frozen() -> None:
    evaluation = Evaluation(0.5, 2)
    with pytest.raises(AttributeError):
        evaluation.value = 1.0  # type: ignore[misc]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_batches_are_moved_once_to_the_models_device() -> None:
    data, model = classification_data(), classifier()
    expected, hits = hand_accuracy(model, data)
    evaluator = Evaluator(data)
    model.cuda()
    first, second = evaluator.evaluate(model), evaluator.evaluate(model)
    assert first.value == pytest.approx(expected, abs=1e-6) and second.value == first.value
    assert first.correct is not None and first.correct.device.type == "cpu"
    assert torch.equal(first.correct, hits)
