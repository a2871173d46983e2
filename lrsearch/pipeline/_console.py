"""What a run shows while it works: lrsearch's own lines, one search bar, nobody else's chatter.

Every entry point runs inside :func:`run_console`: lrsearch's INFO lines (the latency table,
which candidate is being fine-tuned, first-run training of the built-in model) go to stderr
unless logging is configured already; Optuna's per-trial lines and the ExperimentalWarnings of
lrsearch's own Optuna calls are off, as are Lightning's per-fine-tune banners (accelerator
found, "max_epochs reached"); a failed trial's warning keeps its one line but loses the
traceback. ``verbose=True`` keeps Optuna's and Lightning's output as they are. Everything is
put back afterwards.

A terminal's Ctrl-C reaches the run however it lands (:func:`_ctrl_c_reaches_the_run`): one
that Python would only print, because it hit a finalizer (a DataLoader iterator joining its
worker processes in ``__del__``, a garbage-collection callback), is sent again so that it stops
the run; and processes forked during the run (DataLoader workers) start deaf to Ctrl-C, which
a terminal sends to them too: they stop when the run stops them, not halfway through a batch
with a traceback of their own, nor with one of the connection the stopped run dropped.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

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


class _CtrlCState:
    """How many run_console blocks are open in this process, and what the outermost one replaced."""

    depth = 0
    hooks_registered = in_hook = False
    previous_hook: Any = None
    forking = threading.local()


def _resend_swallowed_ctrl_c(unraisable: Any) -> None:
    """``sys.unraisablehook`` of a run: a KeyboardInterrupt raised in a finalizer is sent again.

    Python only prints an exception raised in ``__del__`` or a garbage-collection callback, and
    the interrupted run goes on (a fine-tune to its end, exit status 0). Sent again, the signal
    reaches whatever handler the run has in place at that moment (the search's, Lightning's).
    It is sent from another thread once this hook has returned: sent from here, its handler
    would run in the hook, whose exceptions Python only prints as well.
    """
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and threading.current_thread() is threading.main_thread():
        _CtrlCState.in_hook = True
        threading.Thread(target=_interrupt_main_after_the_hook, name="lrsearch-ctrl-c", daemon=True).start()
        _CtrlCState.in_hook = False
        return
    _CtrlCState.previous_hook(unraisable)


def _interrupt_main_after_the_hook() -> None:
    """Interrupt the main thread once the hook has returned, if the run is still on (not after it)."""
    while _CtrlCState.in_hook:
        time.sleep(0.001)
    if _CtrlCState.depth:
        _thread.interrupt_main(signal.SIGINT)


def _block_ctrl_c_for_the_child() -> None:
    """Before a fork during a run: the child inherits a signal mask with SIGINT blocked."""
    if _CtrlCState.depth:
        _CtrlCState.forking.mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def _unblock_ctrl_c_in_the_parent() -> None:
    """After the fork, the parent's mask is what it was; a Ctrl-C that came meanwhile arrives now."""
    mask = getattr(_CtrlCState.forking, "mask", None)
    if mask is not None:
        _CtrlCState.forking.mask = None
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _quiet_broken_connections_in_the_child() -> None:
    """In a child forked during a run: a connection its parent dropped is not printed as a traceback.

    A DataLoader worker hands each batch's shared memory to its parent over a connection
    (multiprocessing's resource sharer); when Ctrl-C stops the parent in that handshake, the
    worker's sharer thread would print the reset connection through ``sys.excepthook``.
    """
    if not _CtrlCState.depth:
        return
    inner = sys.excepthook

    def excepthook(kind: type[BaseException], value: BaseException, trace: Any) -> None:
        if not issubclass(kind, ConnectionError):
            inner(kind, value, trace)

    sys.excepthook = excepthook


@contextlib.contextmanager
def _ctrl_c_reaches_the_run() -> Iterator[None]:
    """See the module docstring; nested blocks (the CLI around ``compress``) share the outermost's."""
    if not _CtrlCState.hooks_registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_block_ctrl_c_for_the_child, after_in_parent=_unblock_ctrl_c_in_the_parent,
                            after_in_child=_quiet_broken_connections_in_the_child)
        _CtrlCState.hooks_registered = True
    if _CtrlCState.depth == 0:
        _CtrlCState.previous_hook = sys.unraisablehook
        sys.unraisablehook = _resend_swallowed_ctrl_c
    _CtrlCState.depth += 1
    try:
        yield
    finally:
        _CtrlCState.depth -= 1
        if _CtrlCState.depth == 0:
            sys.unraisablehook = _CtrlCState.previous_hook


@contextlib.contextmanager
def run_console(*, verbose: bool) -> Iterator[None]:
    """The output rules of a run and its answer to Ctrl-C (see the module docstring)."""
    with _ctrl_c_reaches_the_run(), _lrsearch_lines(), (contextlib.nullcontext() if verbose else _others_quiet()):
        yield
