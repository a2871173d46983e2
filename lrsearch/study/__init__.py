"""Layer 3 of lrsearch: the Optuna study over per-layer ranks (space, constraint, warm starts,
early abort, storage and the data optuna-dashboard shows)."""

from lrsearch.study._config import SearchConfig
from lrsearch.study._objective import CONSTRAINT, Objective, PlanCosts
from lrsearch.study._space import LayerSpace, SearchSpace, param_name
from lrsearch.study._storage import StorageError, fail_stale_trials, open_storage, sqlite_url
from lrsearch.study._study import Candidate, SearchResult, search
from lrsearch.study._warmstart import warm_starts

__all__ = [
    "CONSTRAINT",
    "Candidate",
    "LayerSpace",
    "Objective",
    "PlanCosts",
    "SearchConfig",
    "SearchResult",
    "SearchSpace",
    "StorageError",
    "fail_stale_trials",
    "open_storage",
    "param_name",
    "search",
    "sqlite_url",
    "warm_starts",
]
