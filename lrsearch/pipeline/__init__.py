"""Layer 4 of lrsearch: fine-tuning, verification, the report, the Lightning callback.

``compress`` runs the whole pipeline on a LightningModule; ``RankSearch`` runs it from
``trainer.fit``; ``search_worker`` runs only its search, as one of several workers on a
shared study. All three take one :class:`RunSpec` (or its fields as keywords). The CLI is a
thin layer over these.
"""

from lrsearch.pipeline._callback import RankSearch, RankSearchLogic
from lrsearch.pipeline._compress import CompressionResult, compress
from lrsearch.pipeline._data import DataError
from lrsearch.pipeline._finetune import FinetuneConfig, finetune
from lrsearch.pipeline._layout import RunLayout
from lrsearch.pipeline._outcome import Report
from lrsearch.pipeline._spec import Run, RunSpec
from lrsearch.pipeline._worker import search_worker

__all__ = [
    "CompressionResult",
    "DataError",
    "FinetuneConfig",
    "RankSearch",
    "RankSearchLogic",
    "Report",
    "Run",
    "RunLayout",
    "RunSpec",
    "compress",
    "finetune",
    "search_worker",
]
