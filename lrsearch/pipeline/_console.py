"""What a run shows while it works: lrsearch's own lines, one search bar, nobody else's chatter.

Every entry point runs inside :func:`run_console`: lrsearch's INFO lines (the latency table,
which candidate is being fine-tuned, first-run training of the built-in model) go to stderr
unless logging is configured already; Optuna's per-trial lines and the ExperimentalWarnings of
lrsearch's own Optuna calls are off, as are Lightning's per-fine-tune banners (accelerator
found, "max_epochs reached"); a failed trial's warning keeps its one line but loses the
traceback. ``verbose=True`` keeps Optuna's and Lightning's output as they are. Everything is
put back afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator

import optuna
from optuna.exceptions import ExperimentalWarning

__all__ = ["run_console"]

_logger = logging.getLogger("lrsearch")
_LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (so output capture sees it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # logging must never break the run
            self.handleError(record)


def _without_traceback(record: logging.LogRecord) -> bool:
    """Keep the record, drop its traceback: one failed trial is one line, and the search goes on."""
    record.exc_info, record.exc_text = None, None
    return True


@contextlib.contextmanager
def _lrsearch_lines() -> Iterator[None]:
    """lrsearch's INFO lines on stderr, unless the program configured logging itself."""
    if _logger.hasHandlers():
        yield
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("lrsearch: %(message)s"))
    level = _logger.level
    _logger.addHandler(handler)
    _logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        _logger.removeHandler(handler)
        _logger.setLevel(level)


@contextlib.contextmanager
def _others_quiet() -> Iterator[None]:
    optuna_level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    handlers = list(logging.getLogger("optuna").handlers)  # a logger's own filters miss its children's records
    for handler in handlers:
        handler.addFilter(_without_traceback)
    levels = {name: logging.getLogger(name).level for name in _LIGHTNING_LOGGERS}
    for name in _LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=ExperimentalWarning)
            # Lightning's own use of torch's pytree API (torch 2.13), in every fine-tune's Trainer
            warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for handler in handlers:
            handler.removeFilter(_without_traceback)
        optuna.logging.set_verbosity(optuna_level)


@contextlib.contextmanager
def run_console(*, verbose: bool) -> Iterator[None]:
    """The output rules of a run (see the module docstring)."""
    with _lrsearch_lines(), (contextlib.nullcontext() if verbose else _others_quiet()):
        yield
