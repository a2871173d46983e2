"""The fine-tuned MiniLM benchmark's data plumbing, without the model: training text and the splits compress cuts.

The model run itself takes about half an hour (benchmarks/minilm_finetuned.py); what can break
silently is here: fine-tuning on test sentences, and a validation cut that splits a group (whose
nearest-neighbour targets then count in neither split).
"""

from __future__ import annotations

import torch

from benchmarks import minilm_finetuned
from benchmarks._minilm import docstring_sentences, pydoc_sentences
from lrsearch.pipeline._data import resolve_data


def test_the_fine_tuning_text_is_enough_and_never_a_pydoc_sentence():
    pydoc = pydoc_sentences()
    train = docstring_sentences(exclude=pydoc)

    assert len(train) >= 2048  # the benchmark's default; 7,405 on Python 3.11
    assert not set(train) & set(pydoc)
    assert docstring_sentences(exclude=pydoc) == train  # the same shuffle every time


def _group(group: int, lengths: tuple[int, int]) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    rows = [torch.tensor([[group, 0, 0, 1, 2]]), torch.tensor([[group, 1, 0, 1, 2]])]
    return [({"input_ids": torch.zeros(1, n, dtype=torch.long), "attention_mask": torch.ones(1, n, dtype=torch.long)},
             row) for n, row in zip(lengths, rows, strict=True)]


def test_the_validation_cut_keeps_every_group_whole_and_leads_with_a_typical_batch():
    groups = [_group(g, (10 + g, 40 + g)) for g in range(minilm_finetuned.VALIDATION_GROUPS)]

    batches = minilm_finetuned._first_typical(groups, median=13)
    data = resolve_data(val_dataloaders=minilm_finetuned.batches(batches),
                        test_dataloaders=minilm_finetuned.batches(batches[:2]))

    assert batches[0][0]["input_ids"].shape[1] == 13  # the latency batch: nearest the median length
    assert len(data.search) == 8 and len(data.select) == 24
    in_search = {int(b[1][0, 0]) for b in data.search}
    in_select = {int(b[1][0, 0]) for b in data.select}
    assert not in_search & in_select and len(in_search | in_select) == minilm_finetuned.VALIDATION_GROUPS
    assert sorted(int(b[1][0, 0]) for b in batches) == sorted(2 * list(range(minilm_finetuned.VALIDATION_GROUPS)))


def test_feed_takes_training_dicts_and_evaluation_pairs():
    inputs = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long)}

    def model(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return input_ids + attention_mask

    assert torch.equal(minilm_finetuned.feed(model, inputs), minilm_finetuned.feed(model, (inputs, torch.zeros(2))))
