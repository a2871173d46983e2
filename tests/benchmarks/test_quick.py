"""The benchmark suite end to end at a tiny size, and its MiniLM agreement metric on synthetic data.

No timing assertions: the figures only have to exist and be finite. MiniLM itself is left out
(loading and factorizing it takes about a minute); its metric is checked here without the model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import run
from benchmarks._methods import LABELS, METHODS
from benchmarks._minilm import _nn_targets, nn_agreement, pydoc_sentences
from benchmarks._tasks import FULL

MODELS = ("mnist1d_mlp", "digits_mlp")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.slow
def test_tiny_run_produces_every_row_with_finite_figures(tmp_path):
    report = run.main(["--tiny", "--models", *MODELS, "--out", str(tmp_path)])

    saved = json.loads((tmp_path / "results.json").read_text())
    assert [task["key"] for task in saved["tasks"]] == list(MODELS)
    table = (tmp_path / "results.md").read_text()
    for task in report["tasks"]:
        assert [row["method"] for row in task["rows"]] == list(METHODS)
        dense = task["dense"]
        assert all(_finite(dense[key]) for key in ("test_metric", "params", "macs"))
        assert all(_finite(ms) and ms > 0 for ms in dense["latency_ms"].values())
        for row in task["rows"]:
            for key in ("test_metric", "base_test_metric", "test_drop", "params", "macs", "mac_reduction",
                        "speedup_per_mac_reduction", "search_seconds", "finetune_seconds", "search_drop",
                        "val_drop"):
                assert _finite(row[key]), (task["key"], row["method"], key, row[key])
            assert set(row["latency_ms"]) == set(row["speedup"]) == {"1", str(task["large_batch"])}
            assert all(_finite(v) and v > 0 for v in [*row["latency_ms"].values(), *row["speedup"].values()])
            assert isinstance(row["evaluations"], int) and row["evaluations"] >= 0
            assert row["candidates_tried"] >= 1 and isinstance(row["within_budget"], bool)
            assert f"| {task['title']} | {LABELS[row['method']]} |" in table
    assert "## Goals" in table and "MNIST-1D MLP: lrsearch held-out (test) drop" in table


def _targets(embeddings: torch.Tensor, groups: int, margin: float = 0.0) -> torch.Tensor:
    size = embeddings.shape[0] // groups
    return torch.cat([_nn_targets(chunk, g, margin) for g, chunk in enumerate(embeddings.split(size))])


def test_nn_agreement_is_one_for_the_original_and_ignores_row_order():
    torch.manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(40, 8), dim=-1)
    targets = _targets(embeddings, groups=2)
    assert nn_agreement(embeddings, targets) == 1.0
    order = torch.randperm(40)
    assert nn_agreement(embeddings[order], targets[order]) == 1.0


def test_nn_agreement_counts_changed_neighbours_within_groups():
    torch.manual_seed(1)
    embeddings = torch.nn.functional.normalize(torch.randn(20, 6), dim=-1)
    targets = _targets(embeddings, groups=1)
    moved = embeddings.clone()
    neighbour = int(targets[0, 2])
    moved[0] = -embeddings[neighbour]  # row 0 now points away from its old neighbour
    expected = sum(int((moved @ moved.T).fill_diagonal_(-2)[i].argmax() == targets[i, 2]) for i in range(20)) / 20
    assert nn_agreement(moved, targets) == pytest.approx(expected)
    assert expected < 1.0


def test_nn_agreement_scores_only_unambiguous_rows():
    # Row 0's two nearest neighbours (rows 1 and 2) are nearly tied: it is not scored.
    embeddings = torch.nn.functional.normalize(torch.tensor(
        [[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.9, 0.0, 0.1], [0.0, 0.0, 1.0]]), dim=-1)
    targets = _nn_targets(embeddings, 0, margin=0.05)
    assert targets[0, 3] == 0 and targets[:, 3].sum() > 0
    swapped = embeddings.clone()
    swapped[0] = torch.nn.functional.normalize(torch.tensor([0.9, 0.0, 0.12]), dim=0)  # row 0 flips to row 2
    scored = targets[:, 3] == 1
    assert nn_agreement(swapped, targets) == pytest.approx(
        float(((swapped @ swapped.T).fill_diagonal_(-2).argmax(1) == targets[:, 2])[scored].float().mean()))


def test_nn_agreement_leaves_out_incomplete_groups():
    # lrsearch's search asks for a running score after every batch: partial groups must not count.
    torch.manual_seed(2)
    embeddings = torch.nn.functional.normalize(torch.randn(20, 4), dim=-1)
    targets = _targets(embeddings, groups=2)
    assert math.isnan(nn_agreement(embeddings[:9], targets[:9]))
    broken = embeddings.clone()
    broken[10:] = broken[10:].flip(0)  # the second group's neighbours change
    partial = torch.cat([torch.arange(10), torch.arange(10, 15)])
    assert nn_agreement(broken[partial], targets[partial]) == 1.0
    assert nn_agreement(broken, targets) < 1.0


def test_pydoc_pool_holds_the_full_minilm_splits():
    # load_minilm draws disjoint splits from this pool; the full run's sizes must fit on every Python.
    sentences = pydoc_sentences()
    assert len(set(sentences)) == len(sentences) >= sum(FULL.minilm_sizes)
    assert all(30 <= len(sentence) <= 200 for sentence in sentences)
    assert pydoc_sentences() == sentences  # the same shuffle every time
