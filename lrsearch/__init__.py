"""lrsearch: make trained PyTorch models faster and smaller by low-rank factorization.

The package is layered: ``lrsearch.core`` (torch only) holds the layers, decomposition,
cost model, surgery and save/load; ``lrsearch.measure`` the budget, evaluation and latency
table; ``lrsearch.study`` the Optuna search; ``lrsearch.pipeline`` fine-tuning, verification,
the report and the Lightning callback. Every layer is imported lazily, on first
use of one of its names: ``import lrsearch`` for factorizing or loading a model never imports
Optuna or Lightning, and the command line answers ``--help`` without importing torch.
"""

from typing import TYPE_CHECKING, Any

from lrsearch._checks import ConflictError, OptionError, UnknownOptionError
from lrsearch._errors import (
    BudgetError,
    CalibrationError,
    Interrupted,
    InvalidRankError,
    LrSearchError,
    NoMatchingModuleError,
    RecipeError,
    RunFolderInUseError,
    StorageIOError,
    UnknownLayerError,
    UnsupportedLayerError,
)
from lrsearch._version import __version__

# The upper layers' names; every other name of __all__ that is not imported above is lrsearch.core's.
_LAZY = {
    "CompressionResult": "lrsearch.pipeline",
    "FinetuneConfig": "lrsearch.pipeline",
    "RankSearch": "lrsearch.pipeline",
    "RunSpec": "lrsearch.pipeline",
    "compress": "lrsearch.pipeline",
    "Candidate": "lrsearch.study",
    "SearchConfig": "lrsearch.study",
    "SearchResult": "lrsearch.study",
    "search": "lrsearch.study",
    "Budget": "lrsearch.measure",
    "LoggedMetric": "lrsearch.measure",
    "parse_budget": "lrsearch.measure",
}

if TYPE_CHECKING:
    from lrsearch.measure import Budget, LoggedMetric, parse_budget
    from lrsearch.pipeline import CompressionResult, FinetuneConfig, RankSearch, RunSpec, compress
    from lrsearch.study import Candidate, SearchConfig, SearchResult, search


_SUBPACKAGES = ("core", "measure", "study", "pipeline", "demo", "lightning")


def __getattr__(name: str) -> Any:
    """Import a layer on first use (optuna's lazy-import pattern): ``lrsearch --help`` needs no torch.

    The layers themselves (``lrsearch.core``, ``lrsearch.study``, ...) are reachable as attributes too,
    as they were when ``import lrsearch`` imported them eagerly.
    """
    import importlib

    if name in _SUBPACKAGES:
        return importlib.import_module(f"lrsearch.{name}")
    if name in _LAZY or name in __all__:
        return getattr(importlib.import_module(_LAZY.get(name, "lrsearch.core")), name)
    raise AttributeError(f"module 'lrsearch' has no attribute {name!r}")


__all__ = [
    "Budget",
    "BudgetError",
    "CHECKPOINT_KEY",
    "CONV_SCHEMES",
    "CalibrationError",
    "Candidate",
    "CompressionResult",
    "ConflictError",
    "Cost",
    "Coverage",
    "DENSE",
    "Decomposition",
    "FinetuneConfig",
    "Interrupted",
    "InvalidRankError",
    "LayerGeometry",
    "LoggedMetric",
    "LowRankCheckpointMixin",
    "LowRankConv1d",
    "LowRankConv2d",
    "LowRankLinear",
    "LowRankMultiheadAttention",
    "LrSearchError",
    "ModuleCoverage",
    "NoMatchingModuleError",
    "OptionError",
    "RankSearch",
    "RecipeError",
    "RunFolderInUseError",
    "RunSpec",
    "SearchConfig",
    "SearchResult",
    "StorageIOError",
    "UnknownLayerError",
    "UnknownOptionError",
    "UnsupportedLayerError",
    "__version__",
    "apply_recipe",
    "break_even_rank",
    "candidate_ranks",
    "compress",
    "count_macs",
    "count_params",
    "coverage",
    "dense_cost",
    "factorize",
    "factorized_cost",
    "full_rank",
    "get_recipe",
    "load",
    "on_load_checkpoint",
    "on_save_checkpoint",
    "parse_budget",
    "read_recipe",
    "save",
    "search",
    "select_targets",
]
