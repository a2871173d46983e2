"""Command line: ``lrsearch tune | worker | finalize | dashboard | report | demo``.

Only parsing, building the config objects of the Python API, calling it and printing live
here (optuna's thin-CLI pattern). ``tune`` is :func:`lrsearch.compress`, ``worker`` is
:func:`lrsearch.pipeline.search_worker`, ``finalize`` is ``compress`` on the study the workers
filled (it runs no new trials), ``report`` is ``rebuild_report`` and ``dashboard`` is
``optuna_dashboard.run_server``.

Exit status: 0 when the budget holds (or the command succeeded), 1 when no configuration
meets the budget, 2 for bad usage or bad input (one line on stderr, nothing written), 130 on
Ctrl-C (one line saying how to resume; nothing half-written).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import logging
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, Optional

import lrsearch
from lrsearch._errors import Interrupted, LrSearchError, format_problem
from lrsearch._version import __version__

PROG = "lrsearch"
DEFAULT_RUN_DIR = "lrsearch-runs/tune"
EXIT_OK, EXIT_MISSED, EXIT_USAGE = 0, 1, 2
_JOB_COMMANDS = ("tune", "worker", "finalize")
_LIGHT_COMMANDS = ("dashboard", "report", "demo")
_LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")
_QUIETED: dict[str, int] = {}


class UsageError(LrSearchError, ValueError):
    """Bad command-line input found before any work started (exit status 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lrsearch`` command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    try:
        from jsonargparse import ArgumentError
    except ImportError:
        return _fail(None, "the command line needs jsonargparse: pip install 'lrsearch[cli]'")
    argv = _negative_budgets_attached(list(sys.argv[1:] if argv is None else argv))
    with warnings.catch_warnings(), _lrsearch_logs_on_stderr():
        _quiet_known_warnings()
        first = _command_of(argv)
        # Commands that need no Lightning get a parser without the job commands (seconds faster).
        parser, commands = _build_parser(only=first if first in _LIGHT_COMMANDS else None)
        try:
            args = parser.parse_args(argv)
        except ArgumentError as error:
            return _fail(first if first in _HANDLERS else None, _parse_message(str(error)))
        command = args.command
        try:
            return _HANDLERS[command](commands[command], args[command])
        except LrSearchError as error:
            return _fail(command, str(error))
        except Interrupted as interrupt:  # the message says how to resume
            print(f"{PROG} {command}: {interrupt}", file=sys.stderr)
            return 130
        except KeyboardInterrupt:  # before the search began: nothing to resume
            print(f"{PROG} {command}: interrupted", file=sys.stderr)
            return 130


# ---------------------------------------------------------------------------------------------
# Parser


def _build_parser(only: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The root parser and its subcommand parsers (all of them, or only ``only``)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=PROG, exit_on_error=False, description=(
        "Compress trained PyTorch models by low-rank factorization: search every layer's rank for the "
        "lowest measured latency within an accuracy-drop budget, fine-tune, verify on unseen data."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subcommands = parser.add_subcommands(required=True, dest="command")
    commands: dict[str, Any] = {}
    helps = {
        "tune": "compress a model end to end (default: the built-in pretrained MNIST-1D MLP)",
        "worker": "join a study on shared storage and only search (run several, then finalize)",
        "finalize": "fine-tune, verify and save the best configuration of a study the workers filled",
        "dashboard": "serve optuna-dashboard on a run folder's study or a storage URL",
        "report": "rebuild report.html of a run folder from its report.json",
        "demo": "uniform-rank factorization table and a quick rank search on MNIST-1D (no fine-tuning)",
    }
    builders: dict[str, Callable[[], Any]] = {
        **{name: (lambda name=name: _job_parser(name, helps[name])) for name in _JOB_COMMANDS},
        "dashboard": lambda: _dashboard_parser(helps["dashboard"]),
        "report": lambda: _report_parser(helps["report"]),
        "demo": lambda: _demo_parser(helps["demo"]),
    }
    for name, build in builders.items():
        if only is None or name == only:
            commands[name] = build()
    for name, sub in commands.items():
        subcommands.add_subcommand(name, sub, help=helps[name])
    return parser, commands


def _new_parser(description: str) -> Any:
    from jsonargparse import ArgumentParser

    return ArgumentParser(exit_on_error=False, description=description)


def _lightning_bases(name: str) -> tuple[type, ...]:
    """``name`` (LightningModule, LightningDataModule) from each Lightning package installed."""
    import pytorch_lightning

    bases = [getattr(pytorch_lightning, name)]
    if importlib.util.find_spec("lightning") is not None:
        import lightning.pytorch

        bases.append(getattr(lightning.pytorch, name))
    return tuple(bases)


def _job_parser(name: str, help_text: str) -> Any:
    """tune, worker and finalize take the same keys, so one config file serves all three."""
    from jsonargparse import ActionConfigFile

    from lrsearch.study._config import SAMPLERS
    from lrsearch.study._objective import OBJECTIVES

    descriptions = {
        "tune": "Search per-layer ranks, fine-tune the best candidates with distillation, verify the "
                "drop on a split the search never saw, measure and save. Without model/data: the "
                "built-in pretrained MNIST-1D MLP. Every config key is also a flag (--search.n_trials 30).",
        "worker": "Search only, as one of several workers sharing --storage and --study-name (the first "
                  "worker creates the study). Give each worker its own --worker-index. Then run finalize.",
        "finalize": "Fine-tune, verify and save the best configurations of the study the workers filled "
                    "(--storage, --study-name). Runs no new search trials.",
    }
    parser = _new_parser(f"{help_text}. {descriptions[name]}")
    parser.add_argument("--config", action=ActionConfigFile,
                        help="YAML config file (see configs/); flags after it override its values")
    parser.add_subclass_arguments(_lightning_bases("LightningModule"), "model", required=False, default=None,
                                  help="trained LightningModule: class_path and init_args "
                                       "(default: the built-in pretrained MNIST-1D MLP)")
    parser.add_subclass_arguments(_lightning_bases("LightningDataModule"), "data", required=False, default=None,
                                  help="LightningDataModule with train/val (and test) dataloaders "
                                       "(default: MNIST-1D, with the default model only)")
    parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                        help="Lightning checkpoint (or state_dict file) whose weights the model loads")
    parser.add_argument("--budget", type=_budget, default="0.5%",
                        help="allowed drop of the metric on the verification split after fine-tuning: "
                             "0.5%% (half a point) or 0.005 (default: 0.5%%)")
    parser.add_argument("--search_budget", type=_optional_budget, default="auto",
                        help="constraint of the search, before fine-tuning (default: auto, a widened --budget "
                             "whose front the selection bisects with fine-tunes)")
    parser.add_argument("--run_dir", type=str, default=DEFAULT_RUN_DIR,
                        help=f"output folder; the same folder resumes its study (default: {DEFAULT_RUN_DIR})")
    parser.add_argument("--max_finetunes", type=_positive, default=6,
                        help="candidates of the search's front fine-tuned at most while bisecting (default: 6)")
    parser.add_argument("--select_fraction", type=float, default=0.75,
                        help="share of validation batches held out from the search to accept or reject "
                             "fine-tuned candidates (default: 0.75)")
    parser.add_argument("--monitor", type=Optional[str], default=None,
                        help="score with a value the model logs in validation_step, e.g. val_acc "
                             "(default: top-1 accuracy of model(inputs)); for a loss add "
                             "--search.higher_is_better false")
    parser.add_argument("--target_modules", type=Optional[list[str]], default=None,
                        help="factorize only modules matching these names/regexes (default: every Linear/Conv2d)")
    parser.add_argument("--exclude_modules", type=Optional[list[str]], default=None,
                        help="keep modules matching these names/regexes dense")
    parser.add_argument("--search.n_trials", type=_positive, default=60,
                        help="trials of the study in total, across resumes and workers (default: 60)")
    parser.add_argument("--search.timeout", type=Optional[float], default=None,
                        help="seconds this process searches at most (default: no limit)")
    parser.add_argument("--search.sampler", type=Literal[SAMPLERS], default="tpe", help="Optuna sampler")
    parser.add_argument("--search.objective", type=Literal[OBJECTIVES], default="latency",
                        help="latency (measured per-layer table on this device), macs or params")
    parser.add_argument("--search.storage", "--storage", type=Optional[str], default=None,
                        help="Optuna storage: sqlite:///PATH, postgresql://..., journal:PATH "
                             "(default: sqlite in RUN_DIR/search)")
    parser.add_argument("--search.study_name", "--study-name", type=str, default="lrsearch",
                        help="study name; the same name on the same storage resumes it (default: lrsearch)")
    parser.add_argument("--search.seed", type=_non_negative, default=0,
                        help="sampler seed; a worker uses seed + worker_index (default: 0)")
    parser.add_argument("--search.worker_index", "--worker-index", type=_non_negative, default=0,
                        help="this worker's index, so workers' samplers differ (default: 0)")
    parser.add_argument("--search.batch_size", type=Optional[int], default=None,
                        help="deployment batch size for latency (default: the data's batch size)")
    parser.add_argument("--search.threads", type=Optional[int], default=1,
                        help="CPU threads for latency measurement (default: 1)")
    parser.add_argument("--search.device", type=str, default="cpu", help="where latency is measured (default: cpu)")
    parser.add_argument("--search.higher_is_better", type=bool, default=True,
                        help="the metric improves upward, like accuracy; false for a loss (default: true)")
    parser.add_argument("--search.method", type=Literal["whitened", "svd"], default="whitened",
                        help="decomposition: activation-whitened SVD (default) or plain SVD")
    parser.add_argument("--search.latency_min_run_time", type=float, default=0.05,
                        help="seconds of timing per latency-table entry and repeat (default: 0.05)")
    parser.add_argument("--search.latency_repeats", type=_positive, default=5,
                        help="timing repeats per latency-table entry; the minimum counts (default: 5)")
    parser.add_argument("--finetune.epochs", type=_optional_positive, default=None,
                        help="fine-tuning epochs per candidate (default: from the training set's size, 1 to 10)")
    parser.add_argument("--finetune.max_steps", type=int, default=-1,
                        help="stop fine-tuning after this many steps; -1: no cap (default: -1)")
    parser.add_argument("--finetune.lr_scale", type=float, default=0.1,
                        help="multiplies the module's own learning rates (default: 0.1)")
    parser.add_argument("--finetune.distill", type=bool, default=True,
                        help="distill from the original model (default: true)")
    parser.add_argument("--finetune.temperature", type=float, default=2.0, help="distillation temperature")
    parser.add_argument("--finetune.alpha", type=float, default=0.5, help="weight of distillation in the loss")
    parser.add_argument("--finetune.accelerator", type=str, default="auto",
                        help="Lightning accelerator for fine-tuning (default: auto)")
    parser.add_argument("--finetune.progress", type=bool, default=True, help="show Lightning's progress bar")
    return parser


def _dashboard_parser(help_text: str) -> Any:
    parser = _new_parser(f"{help_text}. Blocks until Ctrl-C.")
    parser.add_argument("target", type=str,
                        help="run folder (uses its study), study file (.db, .log) or storage URL")
    parser.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    parser.add_argument("--host", type=str, default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1; 0.0.0.0 exposes it to the network)")
    return parser


def _report_parser(help_text: str) -> Any:
    parser = _new_parser(f"{help_text}, for example after an upgrade of lrsearch.")
    parser.add_argument("run_dir", type=str, help="run folder holding report.json")
    return parser


def _demo_parser(help_text: str) -> Any:
    parser = _new_parser(
        "Factorize every layer (but --exclude ones) of a pretrained MNIST-1D MLP at uniform rank fractions "
        "with plain and activation-whitened SVD and print a table; then search per-layer ranks for the "
        "lowest measured latency within an accuracy-drop budget (no fine-tuning: see lrsearch tune).")
    parser.add_argument("--seed", type=_seed, default=0, help="data, initialization and calibration seed")
    parser.add_argument("--cache-dir", "--cache_dir", type=Optional[str], default=None,
                        help="cache for the generated data and trained weights "
                             "(default: $LRSEARCH_CACHE_DIR or ~/.cache/lrsearch)")
    parser.add_argument("--exclude", action="append", default=None, metavar="PATTERN",
                        help="keep modules matching PATTERN dense (repeatable), e.g. --exclude layers.head")
    parser.add_argument("--budget", type=_budget, default="0.5%",
                        help="allowed accuracy drop of the rank search (default: 0.5%%)")
    parser.add_argument("--trials", type=_positive, default=60, help="search trials (default: 60)")
    parser.add_argument("--threads", type=_optional_positive, default=None,
                        help="CPU threads for latency measurement (default: torch's setting)")
    parser.add_argument("--run-dir", "--run_dir", type=str, default="lrsearch-run/demo",
                        help="folder of the study database and latency table (default: lrsearch-run/demo)")
    return parser


# Plain parser functions (jsonargparse treats a custom class as a subclass spec, so no classes).


class _BadValue(argparse.ArgumentTypeError, ValueError):
    """A bad flag or config value. argparse shows an ArgumentTypeError's own message for a flag, but
    jsonargparse turns only ValueError and TypeError into a parse error for a config file value."""


def _budget(value: Any) -> str:
    """A budget as the user wrote it ("0.5%" or 0.005), checked by :func:`lrsearch.parse_budget`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the job warns once, when it reads the parsed budget
            lrsearch.parse_budget(value)
    except LrSearchError as error:
        raise _BadValue(str(error)) from None
    return str(value)


def _optional_budget(value: Any) -> str:
    """A budget, or "auto" (also for null/none: the search constraint is then derived from --budget)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none", "auto")):
        return "auto"
    return _budget(value)


def _integer(text: Any, low: int) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise _BadValue(f"expected an integer but got {text!r}") from None
    if isinstance(text, float) and text != value:
        raise _BadValue(f"expected an integer but got {text!r}")
    if value < low:
        raise _BadValue(f"must be at least {low} but got {value}")
    return value


def _positive(text: Any) -> int:
    return _integer(text, 1)


def _optional_positive(text: Any) -> int | None:
    return None if text is None or (isinstance(text, str) and text.lower() in ("null", "none")) else _positive(text)


def _non_negative(text: Any) -> int:
    return _integer(text, 0)


def _seed(text: Any) -> int:
    value = _integer(text, 0)
    if value >= 2**32:
        raise _BadValue(f"must be in [0, 2**32) but got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# Errors


def _fail(command: str | None, message: str) -> int:
    prefix = f"{PROG} {command}" if command else PROG
    print(f"{prefix}: error: {_one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


def _one_line(message: str) -> str:
    return re.sub(r"\s+", " ", message).strip()


def _negative_budgets_attached(argv: list[str]) -> list[str]:
    """``--budget -1%`` as ``--budget=-1%``. argparse takes a value that starts with "-" (and is not a
    plain negative number) for the next option and says "expected one argument", which hides the
    real problem; attached, the budget check says the budget is negative."""
    words: list[str] = []
    for word in argv:
        if words and words[-1] in ("--budget", "--search_budget") and re.match(r"-[\d.]", word):
            words[-1] = f"{words[-1]}={word}"
        else:
            words.append(word)
    return words


def _command_of(argv: Sequence[str]) -> str | None:
    return next((word for word in argv if not word.startswith("-")), None)


def _parse_message(message: str) -> str:
    """jsonargparse's (often multi-line, nested) parse error as one readable sentence."""
    key = re.search(r'Parser key "([^"]+)"', message)
    where = f"{key.group(1)}: " if key else ""
    problem = re.search(r"Problem with given class_path '([^']+)':\n(.+?)(?=\n    - |\n  Given value|\Z)", message,
                        re.DOTALL)
    if problem:
        detail = re.sub(r'Parser key "([^"]+)":\s*', r"\1: ", _one_line(problem.group(2)))
        return f"{where}cannot use class_path {problem.group(1)!r}: {detail}"
    given = re.search(r"Given value: (.+)", message)
    subclass = re.search(r"does not correspond to a subclass of (\w+)", message)
    if subclass:
        return f"{where}{given.group(1).strip() if given else 'the class'} is not a {subclass.group(1)} subclass"
    missing = re.search(r"File does not exist: '([^']+)'", message)
    if missing:
        return f"{where}file not found: {missing.group(1)}"
    if "does not validate against any of the Union subtypes" in message:
        return f"{where}invalid value{': ' + given.group(1) if given else ''}"
    if key:
        return where + message[key.end():].lstrip(": ")
    return message


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Warnings as one line each, without the source line a user cannot act on."""
    print(f"{PROG}: warning: {_one_line(str(message))}", file=sys.stderr)


def _quiet_known_warnings() -> None:
    warnings.showwarning = _show_warning
    warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="jsonargparse")
    try:
        from optuna.exceptions import ExperimentalWarning
    except ImportError:  # pragma: no cover - optuna is a dependency
        return
    warnings.filterwarnings("ignore", category=ExperimentalWarning)


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (so ``main`` also works under capture)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # logging must never break the command
            self.handleError(record)


@contextlib.contextmanager
def _lrsearch_logs_on_stderr() -> Iterator[None]:
    """lrsearch's INFO messages (latency table, each candidate's verified drop) on stderr; Optuna's
    per-trial lines off (its progress bar replaces them), and a failed trial's warning without its
    traceback (the line already names the error). Everything is put back afterwards."""
    logger = logging.getLogger("lrsearch")
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("lrsearch: %(message)s"))
    level, optuna_level = logger.level, None
    optuna_logger = logging.getLogger("optuna")
    if "optuna" in sys.modules or importlib.util.find_spec("optuna") is not None:
        import optuna

        optuna_level = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna_handlers = list(optuna_logger.handlers)  # a logger's own filters miss its children's records
    for optuna_handler in optuna_handlers:
        optuna_handler.addFilter(_without_traceback)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    _QUIETED.clear()
    try:
        yield
    finally:
        for optuna_handler in optuna_handlers:
            optuna_handler.removeFilter(_without_traceback)
        logger.removeHandler(handler)
        logger.setLevel(level)
        for name, previous in _QUIETED.items():
            logging.getLogger(name).setLevel(previous)
        _QUIETED.clear()
        if optuna_level is not None:
            import optuna

            optuna.logging.set_verbosity(optuna_level)


def _without_traceback(record: logging.LogRecord) -> bool:
    """Keep the record, drop its traceback: one failed trial is one line, and the search goes on."""
    record.exc_info, record.exc_text = None, None
    return True


def _quiet_lightning() -> None:
    """Lightning's INFO lines (accelerator found, tips, "max_epochs reached") for every candidate's
    fine-tune drown the summary; its warnings and progress bar stay. Call after Lightning is
    imported (its import sets its loggers to INFO); ``main`` restores the levels."""
    for name in _LIGHTNING_LOGGERS:
        _QUIETED.setdefault(name, logging.getLogger(name).level)
        logging.getLogger(name).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------
# tune / worker / finalize: build everything (and fail) before anything is written


class _Job:
    """The validated inputs of a job command: module, data, configs; nothing written yet."""

    def __init__(self, parser: Any, args: Any, command: str) -> None:
        from lrsearch.pipeline import FinetuneConfig
        from lrsearch.study import SearchConfig
        from lrsearch.study._storage import check_file_storage, is_file_storage, open_storage

        self.command, self.args = command, args
        _quiet_lightning()
        self.budget = lrsearch.parse_budget(args.budget)
        from lrsearch.pipeline._compress import search_constraint

        self.search_budget = search_constraint(self.budget, args.search_budget)
        if not 0.0 < args.select_fraction < 1.0:
            raise UsageError(f"select_fraction must lie in (0, 1) but got {args.select_fraction!r}.")
        self.search_config = _config(SearchConfig, "search", dict(vars(args.search)))
        self.finetune_config = _config(FinetuneConfig, "finetune", dict(vars(args.finetune)))
        storage = self.search_config.storage
        if command == "worker" and storage is None:
            raise UsageError("a worker needs storage all workers share: --storage journal:PATH or postgresql://...")
        if command == "finalize":
            if storage is None:
                raise UsageError("finalize needs the workers' storage: --storage URL (and --study-name NAME).")
            # No new trials: the study's n_trials becomes the number of trials the workers ran.
            self.search_config = replace(self.search_config,
                                         n_trials=_counted_trials(storage, self.search_config.study_name))
        if storage is not None and is_file_storage(storage):
            check_file_storage(storage)  # not writable: fail before any work, creating nothing
        elif storage is not None:
            open_storage(storage, heartbeat_interval=None)  # unreachable or malformed: fail before any work
        if (args.model is None) != (args.data is None):
            given, missing = ("model", "data") if args.data is None else ("data", "model")
            raise UsageError(format_problem(
                f"{given} is set but {missing} is not",
                expected="both model and data, or neither (the built-in default)",
                hint=f"add a {missing}: section with class_path and init_args to the config."))
        if args.model is None:
            from lrsearch.demo.lightning import pretrained_classifier

            if args.ckpt_path is not None:
                raise UsageError("ckpt_path needs a model: set model.class_path to the checkpoint's class.")
            self.description = "built-in pretrained MNIST-1D MLP (lrsearch.demo.lightning.Mnist1dClassifier)"
            self.module, self.datamodule = pretrained_classifier()
        else:
            self.module, self.datamodule = self._instantiate(parser, args)
            self.description = f"{type(self.module).__module__}.{type(self.module).__qualname__}"
            if args.ckpt_path is not None:
                _load_weights(self.module, Path(args.ckpt_path))
                self.description += f" with weights from {args.ckpt_path}"

    @staticmethod
    def _instantiate(parser: Any, args: Any) -> tuple[Any, Any]:
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
        try:
            built = instantiate(args)
        except (ValueError, ImportError, OSError) as error:
            if isinstance(error, LrSearchError):
                raise
            raise UsageError(f"cannot build the model or data from the config: {type(error).__name__}: {error}") \
                from error
        return built.model, built.data

    def keyword_arguments(self) -> dict[str, Any]:
        """What compress and search_worker both take."""
        args = self.args
        return {"budget": str(self.budget), "run_dir": args.run_dir, "datamodule": self.datamodule,
                "search_budget": str(self.search_budget),
                "search_config": self.search_config, "select_fraction": args.select_fraction,
                "monitor": args.monitor,
                "target_modules": args.target_modules, "exclude_modules": args.exclude_modules,
                "show_progress_bar": True}


def _config(kind: type, what: str, values: dict[str, Any]) -> Any:
    try:
        return kind(**values)
    except (ValueError, TypeError) as error:
        raise UsageError(f"{what}: {error}") from error


def _load_weights(module: Any, path: Path) -> None:
    """Weights of a Lightning checkpoint (``state_dict`` key) or a plain state_dict file, loaded strictly."""
    import torch

    if not path.is_file():
        raise UsageError(f"checkpoint {path} is a folder, not a file" if path.is_dir()
                         else f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for unreadable files; all mean "cannot read"
        first_line = str(error).splitlines()[0] if str(error) else repr(error)
        raise UsageError(f"cannot read the checkpoint {path}: it is truncated, corrupted or not written by "
                         f"torch.save ({first_line})") from error
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path} is neither a Lightning checkpoint nor a state_dict.")
    if isinstance(checkpoint, Mapping) and lrsearch.CHECKPOINT_KEY in checkpoint:
        lrsearch.on_load_checkpoint(module, checkpoint)  # an already-compressed checkpoint: restructure first
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UsageError(f"the checkpoint {path} does not fit {type(module).__qualname__}: "
                         f"{_one_line(str(error))[:400]}") from error
    module.eval()


def _run_tune(parser: Any, args: Any) -> int:
    job = _Job(parser, args, "tune")
    return _compress(job, resumed=None)


def _run_finalize(parser: Any, args: Any) -> int:
    job = _Job(parser, args, "finalize")
    return _compress(job, resumed=job.search_config.n_trials)


def _run_worker(parser: Any, args: Any) -> int:
    job = _Job(parser, args, "worker")
    config = job.search_config
    if config.storage.startswith("sqlite"):
        print(f"{PROG} worker: note: SQLite serves one process well; for several workers use "
              "journal:PATH (one machine) or postgresql://... (many).", file=sys.stderr)
    from lrsearch.pipeline import search_worker

    print(f"Worker {config.worker_index} on study {config.study_name!r} at {_redacted(config.storage)}: "
          f"{job.description}, search budget {job.search_budget or job.budget}, "
          f"{config.n_trials} trials in the study in total.")
    result = search_worker(job.module, **job.keyword_arguments())
    finished = _counted_trials(config.storage, config.study_name)
    print(f"\nThe study has {finished} trials; "
          + (f"the best feasible so far is trial {result.best.trial} (search drop {result.best.drop:.4f})."
             if result.best else "none meets the search budget yet."))
    given = f" --config {args.config[-1]}" if getattr(args, "config", None) else ""
    print(f"Next, when the workers are done: {PROG} finalize{given} --storage {_redacted(config.storage)} "
          f"--study-name {config.study_name}")
    return EXIT_OK if result.best is not None else EXIT_MISSED


def _counted_trials(storage_url: str, study_name: str) -> int:
    """Finished (or running) trials of an existing study; a usage error if there is none."""
    import optuna
    from optuna.trial import TrialState

    from lrsearch.study._storage import open_storage

    _check_exists(storage_url)
    storage = open_storage(storage_url, heartbeat_interval=None)
    names = [s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)]
    if study_name not in names:
        raise UsageError(format_problem(
            f"No study {study_name!r} in {_redacted(storage_url)}", given=f"studies {names}" if names else "no study",
            hint="run lrsearch worker with this --storage and --study-name first, or fix the name."))
    study = optuna.load_study(study_name=study_name, storage=storage)
    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    finished = len(study.get_trials(deepcopy=False, states=counted))
    if finished == 0:
        raise UsageError(f"study {study_name!r} in {_redacted(storage_url)} has no trials yet; run workers first.")
    return finished


def _check_exists(storage_url: str) -> None:
    """Reading a study must not create an empty journal or SQLite file by opening a mistyped path."""
    from lrsearch.study._storage import JOURNAL_SUFFIXES

    path: Path | None = None
    if storage_url.startswith("journal:") or storage_url.endswith(JOURNAL_SUFFIXES):
        path = Path(storage_url.removeprefix("journal:"))
    elif storage_url.startswith("sqlite:///"):
        path = Path(storage_url.removeprefix("sqlite:///"))
    if path is not None and not path.is_file():
        raise UsageError(f"no study file at {path} ({storage_url}).")


def _compress(job: _Job, *, resumed: int | None) -> int:
    args, search, finetune = job.args, job.search_config, job.finetune_config
    run_dir = Path(args.run_dir)
    storage = search.storage or f"sqlite:///{(run_dir / 'search' / 'study.db').resolve()}"
    trials = (f"{resumed} trials found by the workers, no new ones" if resumed is not None else
              f"{search.n_trials} trials ({search.sampler}, objective {search.objective}"
              f"{_threads(search.threads)})")
    print(f"{PROG} {job.command}: {job.description}")
    print(f"  budget      {job.budget} drop of accuracy on unseen data after fine-tuning"
          + f" (search constraint before fine-tuning {job.search_budget})")
    print(f"  search      {trials}")
    epochs = "epochs from the training set's size" if finetune.epochs is None else f"{finetune.epochs} epoch(s)"
    print(f"  fine-tune   up to {args.max_finetunes} candidates of the front, {epochs} each"
          + (", distilled from the original" if finetune.distill else ""))
    print(f"  run folder  {run_dir}")
    print(f"  study       {_redacted(storage)} (study {search.study_name!r}; "
          f"view: {PROG} dashboard {run_dir})\n", flush=True)
    started = time.perf_counter()
    result = lrsearch.compress(job.module, **job.keyword_arguments(), max_finetunes=args.max_finetunes,
                               finetune_config=finetune)
    print(f"\nDone in {time.perf_counter() - started:.0f} s.")
    print(_summary(result.report, {name: str(path) for name, path in result.paths.items()}, run_dir))
    return EXIT_OK if result.meets_budget else EXIT_MISSED


# ---------------------------------------------------------------------------------------------
# The summary table


def _redacted(url: str) -> str:
    """A storage URL without its password, for printing."""
    from lrsearch.study._storage import redacted

    return redacted(url)


def _threads(count: int | None) -> str:
    return "" if not count else f", {count} thread{'s' if count != 1 else ''}"


def _interval_text(interval: Any) -> str:
    """`` [95 %: -0.20 to 0.90]`` after a drop in points, or nothing for a metric without one."""
    if not isinstance(interval, list) or len(interval) != 2:
        return ""
    return f" [95 %: {100 * interval[0]:.2f} to {100 * interval[1]:.2f}]"


def _percent(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _count(value: Any) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _summary(report: Mapping[str, Any], paths: Mapping[str, str], run_dir: Path) -> str:
    dense, final = report.get("dense", {}), report.get("final")
    splits = report.get("splits", {})
    metric = report.get("metric", "accuracy")
    verify, selected = splits.get("test", "test"), splits.get("select", "select")
    threads, batch = report.get("threads"), report.get("batch_size")
    latency_label = f"latency (batch {batch}{_threads(threads)}, measured)"
    final = final or {}

    def ratio(key: str, word: str) -> str:
        if not final or not dense.get(key) or not final.get(key):
            return ""
        return f"{dense[key] / final[key]:.2f}x {word}"

    rows = [
        ("", "original", "compressed", ""),
        (f"{metric} on {verify}", _percent(dense.get("verify_metric")), _percent(final.get("verify_metric")),
         f"drop {100 * final['verify_drop']:.2f} points{_interval_text(final.get('verify_drop_interval'))} "
         f"(allowed {100 * report['allowed_drop']:.2f})"
         if final else f"allowed drop {100 * report['allowed_drop']:.2f} points"),
        (f"{metric} on {selected}", _percent(dense.get("select_metric")), _percent(final.get("select_metric")),
         f"drop {100 * final['select_drop']:.2f} points" if final else ""),
        ("parameters", _count(dense.get("params")), _count(final.get("params")), ratio("params", "fewer")),
        ("MACs per sample", _count(dense.get("macs")), _count(final.get("macs")), ratio("macs", "fewer")),
        (latency_label, f"{dense['latency_ms']:.3f} ms" if dense.get("latency_ms") else "-",
         f"{final['latency_ms']:.3f} ms" if final.get("latency_ms") else "-",
         f"{final['speedup']:.2f}x faster" if final.get("speedup") else ""),
    ]
    for entry in report.get("deployment", [])[1:]:
        predicted = entry.get("predicted_speedup")
        rows.append((f"latency (batch {entry['batch_size']}{_threads(threads)}, measured)",
                     f"{entry['dense_ms']:.3f} ms", f"{entry['compressed_ms']:.3f} ms",
                     f"{entry['speedup']:.2f}x faster"
                     + (f" (predicted {predicted:.2f}x)" if predicted else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [("MEETS THE BUDGET" if report.get("meets_budget") else "DOES NOT MEET THE BUDGET")
             + f" {report.get('budget')}: {report.get('message', '')}", ""]
    for row in rows:
        lines.append(f"  {row[0].ljust(widths[0])}  {row[1].rjust(widths[1])}  {row[2].rjust(widths[2])}  {row[3]}"
                     .rstrip())
    if final.get("ranks"):
        full = final.get("full_ranks", {})
        lines.append("")
        lines.append(f"  ranks (trial {final.get('trial')}): " + ", ".join(
            f"{name} {rank}/{full.get(name, '?')}" for name, rank in final["ranks"].items()))
    attempts = report.get("attempts", [])
    if attempts and not report.get("meets_budget"):
        lines.append("")
        lines.append("  tried after fine-tuning: " + "; ".join(
            f"trial {a['trial']} drop {100 * a['select_drop']:.2f} points" for a in attempts))
        lines.append("  HINT: widen --budget, search more (--search.n_trials), fine-tune longer "
                     "(--finetune.epochs), or allow more fine-tunes (--max_finetunes).")
    for warning in report.get("warnings", []):
        lines.extend(["", f"  WARNING: {warning}"])
    lines.append("")
    lines.append("Files")
    labels = {"model": "compressed model (lrsearch.load)", "checkpoint": "checkpoint (Model.load_from_checkpoint)",
              "report_html": "report", "report": "report data"}
    entries = [(label, paths[key]) for key, label in labels.items() if key in paths]
    study = report.get("paths", {}).get("study")
    if study:
        entries.append(("study", _redacted(study)))
    width = max(len(label) for label, _ in entries) if entries else 0
    lines.extend(f"  {label:<{width}}  {where}" for label, where in entries)
    if study:
        lines.append(f"  (view the study: {PROG} dashboard {run_dir})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# dashboard / report / demo


def _run_dashboard(_parser: Any, args: Any) -> int:
    from lrsearch.study._storage import open_storage

    url = _storage_of(args.target)
    _check_exists(url)
    try:
        import optuna_dashboard
    except ImportError as error:
        raise UsageError("the dashboard needs optuna-dashboard: pip install 'lrsearch[dashboard]'") from error
    storage = open_storage(url, heartbeat_interval=None)

    print(f"Serving optuna-dashboard for {_redacted(url)} on http://{args.host}:{args.port}/ (Ctrl-C stops)",
          flush=True)
    try:
        optuna_dashboard.run_server(storage, host=args.host, port=args.port)
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as error:
        if error.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise UsageError(f"cannot listen on {args.host}:{args.port}: {error.strerror}; "
                             "pick another --port.") from error
        raise
    return EXIT_OK


def _storage_of(target: str) -> str:
    """A storage URL from a run folder, a study file or a URL (run folders: report.json names it)."""
    from lrsearch.study._storage import JOURNAL_SUFFIXES, sqlite_url

    if "://" in target or target.startswith("journal:"):
        return target
    path = Path(target)
    if path.is_dir():
        report = path / "report.json"
        if report.is_file():
            from lrsearch.pipeline._report import load_report

            study = load_report(path).get("paths", {}).get("study")
            if study:
                return study
        for candidate in (path / "search" / "study.db", path / "study.db"):
            if candidate.is_file():
                return sqlite_url(candidate)
        raise UsageError(f"no study in {path}: expected {path / 'search' / 'study.db'} (a run of {PROG} tune) "
                         f"or {path / 'study.db'}.")
    if path.is_file():
        if path.name.endswith(JOURNAL_SUFFIXES):
            return f"journal:{path}"
        if path.suffix in (".db", ".sqlite", ".sqlite3"):
            return sqlite_url(path)
        raise UsageError(f"cannot tell what kind of study file {path} is: expected .db (SQLite) or .log (journal).")
    raise UsageError(f"{target} is neither a run folder, a study file nor a storage URL.")


def _run_report(_parser: Any, args: Any) -> int:
    from lrsearch.pipeline._report import rebuild_report

    print(rebuild_report(args.run_dir))
    return EXIT_OK


def _run_demo(_parser: Any, args: Any) -> int:
    import optuna
    from torch import nn

    from lrsearch import demo

    budget = lrsearch.parse_budget(args.budget)
    cache_dir = Path(args.cache_dir) if args.cache_dir is not None else demo.default_cache_dir()
    print(f"Loading the pretrained MNIST-1D MLP (trained once on first use, then cached in {cache_dir}) ...")
    model, splits = demo.pretrained_mlp(seed=args.seed, cache_dir=cache_dir)
    calibration = demo.calibration_batches(splits, seed=args.seed)
    example = splits.x_test[:1]

    variants: list[tuple[str, str, nn.Module]] = [("dense", "-", model)]
    for method in ("svd", "whitened"):
        decomposition = lrsearch.Decomposition(model, method=method, calibration=calibration,
                                               exclude_modules=args.exclude)
        for fraction in (0.125, 0.25, 0.5):
            variants.append((method, f"{fraction:g}", decomposition.build(fraction)))
    header = ("method", "rank fraction", "test acc", "params", "MACs/sample")
    rows = [(method, fraction, f"{100 * demo.evaluate_accuracy(m, splits.x_test, splits.y_test):.2f}%",
             f"{lrsearch.count_params(m):,}", f"{lrsearch.count_macs(m, example):,}")
            for method, fraction, m in variants]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    print()
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    print(f"\n{len(splits.y_test)} test samples; no fine-tuning after factorization.")

    print(f"\nSearching per-layer ranks: budget {budget} on {len(splits.y_val)} validation samples, "
          f"{args.trials} trials, latency measured on this CPU ...")
    search_data = list(zip(splits.x_val.split(256), splits.y_val.split(256)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    result = lrsearch.search(model, search_data, calibration=calibration, budget=budget.drop,
                             n_trials=args.trials, threads=args.threads, run_dir=str(args.run_dir),
                             study_name="demo", seed=args.seed, show_progress_bar=True)
    print(f"Study: {result.storage}  (view: {PROG} dashboard {args.run_dir})")
    if result.best is None:
        print(f"No configuration met the budget {budget} in {args.trials} trials.")
        return EXIT_MISSED
    best, table = result.best, result.latency_table
    compressed = lrsearch.Decomposition(model, calibration=calibration).build(best.ranks, schemes=best.schemes)
    print(f"Best (trial {best.trial}): ranks {best.ranks}")
    print(f"  validation accuracy {result.baseline:.2%} -> {best.metric:.2%} (drop {best.drop:.2%})")
    print(f"  test accuracy {demo.evaluate_accuracy(model, splits.x_test, splits.y_test):.2%} -> "
          f"{demo.evaluate_accuracy(compressed, splits.x_test, splits.y_test):.2%}")
    if table is not None and best.latency:
        print(f"  params {result.dense['params']:,.0f} -> {best.params:,.0f}; "
              f"predicted latency {table.dense_model * 1e3:.3f} -> {best.latency * 1e3:.3f} ms "
              f"({table.dense_model / best.latency:.2f}x) at batch {table.batch_size}, {table.threads} thread(s)")
    print(f"\nNext: fine-tune, verify and save with `{PROG} tune --budget {budget}`.")
    return EXIT_OK


_HANDLERS: dict[str, Callable[[Any, Any], int]] = {
    "tune": _run_tune,
    "worker": _run_worker,
    "finalize": _run_finalize,
    "dashboard": _run_dashboard,
    "report": _run_report,
    "demo": _run_demo,
}


if __name__ == "__main__":
    raise SystemExit(main())
