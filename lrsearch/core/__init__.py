"""Layer 1 of lrsearch: low-rank layers, decomposition math, cost model, surgery, save/load.

Depends on torch only; never imports Optuna or Lightning.
"""

from lrsearch.core._attention import LowRankMultiheadAttention
from lrsearch.core._calibration import LayerStatistics, collect_statistics
from lrsearch.core._conv import CONV_SCHEMES, LowRankConv1d, LowRankConv2d
from lrsearch.core._cost import (
    Cost,
    LayerGeometry,
    break_even_rank,
    candidate_ranks,
    count_macs,
    count_params,
    dense_cost,
    factorized_cost,
    full_rank,
    macs_per_sample,
)
from lrsearch.core._coverage import Coverage, ModuleCoverage
from lrsearch.core._decomposition import DENSE, Decomposition, coverage, factorize
from lrsearch.core._factors import MatrixFactors, TuckerFactors, matrix_factors, tucker2_factors
from lrsearch.core._linear import LowRankLinear
from lrsearch.core._runtime import default_forward, evaluating
from lrsearch.core._serialization import (
    CHECKPOINT_KEY,
    LowRankCheckpointMixin,
    apply_recipe,
    get_recipe,
    load,
    on_load_checkpoint,
    on_save_checkpoint,
    read_recipe,
    save,
)
from lrsearch.core._targets import TargetSelection, name_matches, select_targets

__all__ = [
    "CHECKPOINT_KEY",
    "CONV_SCHEMES",
    "Cost",
    "Coverage",
    "DENSE",
    "Decomposition",
    "LayerGeometry",
    "LayerStatistics",
    "LowRankCheckpointMixin",
    "LowRankConv1d",
    "LowRankConv2d",
    "LowRankLinear",
    "LowRankMultiheadAttention",
    "MatrixFactors",
    "ModuleCoverage",
    "TargetSelection",
    "TuckerFactors",
    "apply_recipe",
    "break_even_rank",
    "candidate_ranks",
    "collect_statistics",
    "count_macs",
    "count_params",
    "coverage",
    "default_forward",
    "dense_cost",
    "evaluating",
    "factorize",
    "factorized_cost",
    "full_rank",
    "get_recipe",
    "load",
    "macs_per_sample",
    "matrix_factors",
    "name_matches",
    "on_load_checkpoint",
    "on_save_checkpoint",
    "read_recipe",
    "save",
    "select_targets",
    "tucker2_factors",
]
