"""``RankSearch`` for the ``lightning.pytorch`` namespace (``import lightning as L``).

``lightning.pytorch.Callback`` and ``pytorch_lightning.Callback`` are different classes, and
LightningCLI rejects a callback of the other namespace, so each gets its own thin subclass.
Importing this module needs the ``lightning`` package (``pip install 'lrsearch[lightning]'``).
"""

from __future__ import annotations

import lightning.pytorch as lp
from typing_extensions import override

from lrsearch.pipeline._callback import RankSearchLogic

__all__ = ["RankSearch"]


class RankSearch(RankSearchLogic, lp.Callback):
    """:class:`lrsearch.RankSearch` for ``lightning.pytorch`` Trainers."""

    @override
    def on_fit_end(self, trainer: lp.Trainer, pl_module: lp.LightningModule) -> None:
        RankSearchLogic.on_fit_end(self, trainer, pl_module)
