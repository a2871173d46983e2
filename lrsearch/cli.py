"""Command line: ``lrsearch tune | worker | finalize | dashboard | report | demo``.

Only parsing, building the objects of the Python API, calling it and printing live here
(optuna's thin-CLI pattern). The flags and YAML keys of ``tune``, ``worker`` and ``finalize``
are generated from :class:`lrsearch.pipeline.RunSpec` and its ``search``
(:class:`~lrsearch.SearchConfig`) and ``finetune`` (:class:`~lrsearch.FinetuneConfig`)
fields, with their defaults and docstrings, so the command line cannot drift from the Python
API; ``--config`` takes a YAML file or the name of a built-in config (``mnist1d_cnn``).
``tune`` is :func:`lrsearch.compress`, ``worker`` is :func:`lrsearch.pipeline.search_worker`,
``finalize`` is ``compress`` on the study the workers filled (it runs no new trials).

Exit status: 0 when the budget holds (or the command succeeded), 1 when no configuration
meets the budget, 2 for bad usage or bad input (one line on stderr, nothing written), 3 when
writing failed (disk full, I/O; nothing half-written, re-running resumes), 4 for an internal
error (one line; the traceback in ``RUN_DIR/lrsearch-error.log``), 130 on Ctrl-C (one line
saying how to resume; nothing half-written). ``lrsearch --help`` imports
neither torch nor Optuna.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from lrsearch._argv import (
    CONFIG_DIR,
    UsageError,
    check_yaml,
    one_line,
    parse_message,
    prepared,
    shipped,
)
from lrsearch._errors import Interrupted, LrSearchError, StorageIOError, format_problem
from lrsearch._version import __version__

__all__ = ["CONFIG_DIR", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_IO", "EXIT_MISSED", "EXIT_OK", "EXIT_USAGE",
           "UsageError", "main"]

PROG = "lrsearch"
EXIT_OK, EXIT_MISSED, EXIT_USAGE, EXIT_IO, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
ERROR_LOG = "lrsearch-error.log"
_JOB_COMMANDS = ("tune", "worker", "finalize")
_HELP = {
    "tune": "compress a model end to end (default: the built-in pretrained MNIST-1D MLP)",
    "worker": "join a study on shared storage and only search (run several, then finalize)",
    "finalize": "fine-tune, verify and save the best configuration of a study the workers filled",
    "dashboard": "serve optuna-dashboard on a run folder's study or a storage URL",
    "report": "rebuild report.html of a run folder from its report.json",
    "demo": "uniform-rank factorization table and a quick rank search on MNIST-1D (no fine-tuning)",
}
_DESCRIPTION = {
    "tune": "Search per-layer ranks, fine-tune the best candidates with distillation, verify the drop on a "
            "split the search never saw, measure and save. Without model and data: the built-in pretrained "
            "MNIST-1D MLP. Every option is a flag and a key of the --config YAML file.",
    "worker": "Search only, as one of several workers sharing --storage and --study-name (the first worker "
              "creates the study). Give each worker its own --worker-index. Then run finalize.",
    "finalize": "Fine-tune, verify and save the best configurations of the study the workers filled "
                "(--storage, --study-name). Runs no new search trials.",
    "dashboard": "Serve optuna-dashboard until Ctrl-C.",
    "report": "Rebuild report.html, for example after an upgrade of lrsearch.",
    "demo": "Factorize every layer of a pretrained MNIST-1D MLP at uniform rank fractions with plain and "
            "whitened SVD, print a table, then search per-layer ranks (no fine-tuning: see lrsearch tune).",
}
# Fields of SearchConfig that a run sets itself (RunSpec refuses them), so they are no flags.
_SET_BY_THE_RUN = {"budget", "run_dir"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lrsearch`` command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    from jsonargparse import ArgumentError

    argv = prepared(list(sys.argv[1:] if argv is None else argv))
    command = next((word for word in argv if not word.startswith("-")), None)
    command = command if command in _HELP else None
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        warnings.filterwarnings("ignore", module="jsonargparse")
        try:
            check_yaml(argv)
            parser, sub = _parser(command)
            args = parser.parse_args(argv)
        except ArgumentError as error:
            return _fail(command, parse_message(str(error), sub))
        except LrSearchError as error:
            return _fail(command, str(error))
        try:
            return _HANDLERS[args.command](args.command, sub, args[args.command])
        except StorageIOError as error:  # disk full, I/O: nothing half-written; re-running resumes
            print(f"{PROG} {args.command}: error: {one_line(str(error))}", file=sys.stderr)
            return EXIT_IO
        except LrSearchError as error:
            return _fail(args.command, str(error))
        except KeyboardInterrupt as interrupt:
            return _interrupted(args.command, interrupt)
        except Exception as error:  # noqa: BLE001 - a bug or an unforeseen failure: one line, the rest in a log
            log = _traceback_log(getattr(args[args.command], "run_dir", None))
            print(f"{PROG} {args.command}: internal error: {type(error).__name__}: {one_line(str(error))} "
                  f"(traceback in {log}; please report it)", file=sys.stderr)
            return EXIT_INTERNAL


def _interrupted(command: str, interrupt: KeyboardInterrupt) -> int:
    """Ctrl-C: one line, the last thing the command prints, saying how to resume.

    The message is that of the :class:`Interrupted` the run raised, also when a second Ctrl-C
    came while the first was unwinding (it then leads the chain of exceptions); before the run
    could say more, just "interrupted". While the line is printed, Ctrl-C is ignored, and what
    the interrupt cut short (a DataLoader iterator that was starting its workers, say) is
    collected first, so that its finalizer's complaint does not follow the line.
    """
    import gc
    import signal
    import threading
    import traceback

    chain: list[BaseException] = []
    error: BaseException | None = interrupt
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    message = next((str(error) for error in chain if isinstance(error, Interrupted)), "interrupted")
    ignoring = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if ignoring else None
    hook, sys.unraisablehook = sys.unraisablehook, lambda _unraisable: None
    try:
        for error in chain:
            traceback.clear_frames(error.__traceback__)
        del error, chain, interrupt
        gc.collect()
        print(f"{PROG} {command}: {message}", file=sys.stderr, flush=True)
    finally:
        sys.unraisablehook = hook
        if ignoring:
            signal.signal(signal.SIGINT, previous)
    return EXIT_INTERRUPTED


def _traceback_log(run_dir: str | None) -> Path:
    """Write the current exception's traceback into the run folder (or the temp folder) and say where."""
    import tempfile
    import traceback

    folder = Path(run_dir) if run_dir and Path(run_dir).is_dir() else Path(tempfile.gettempdir())
    path = folder / ERROR_LOG
    path.write_text(traceback.format_exc(), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Parsers: the root lists every command; only the one being run is built in full.


def _parser(command: str | None) -> tuple[Any, Any]:
    """The root parser, and the full parser of ``command`` (the others are stubs: --help stays fast)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=PROG, exit_on_error=False, description=(
        "Compress trained PyTorch models by low-rank factorization: search every layer's rank for the lowest "
        "measured latency within an accuracy-drop budget, fine-tune, verify on unseen data."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subcommands = parser.add_subcommands(required=True, dest="command")
    sub = None
    for name, help_text in _HELP.items():
        built = ArgumentParser(exit_on_error=False, description=f"{help_text}. {_DESCRIPTION[name]}")
        if name == command:
            _BUILDERS[name](built)
            sub = built
        subcommands.add_subcommand(name, built, help=help_text)
    return parser, sub


def _job_arguments(parser: Any) -> None:
    """tune, worker and finalize take the same keys, so one config file serves all three."""
    from jsonargparse import ActionConfigFile

    from lrsearch.pipeline import FinetuneConfig, RunSpec
    from lrsearch.study import SearchConfig

    parser.add_argument("--config", action=ActionConfigFile,
                        help=f"YAML config file, or a built-in one by name ({', '.join(shipped())}); "
                             "flags after it override its values")
    for key, kind, what in (("model", "LightningModule", "trained LightningModule: class_path and init_args; "
                             "unset: the built-in pretrained MNIST-1D MLP"),
                            ("data", "LightningDataModule", "LightningDataModule with train and val (and test) "
                             "dataloaders; unset: MNIST-1D, with the default model only")):
        parser.add_subclass_arguments(_lightning_bases(kind), key, as_group=False, required=False, default=None,
                                      help=what)
    parser.add_argument("--ckpt_path", type=str | None, default=None,
                        help="Lightning checkpoint (or state_dict file) whose weights the model loads")
    parser.add_class_arguments(RunSpec, None, skip={"search", "finetune"}, sub_configs=False)
    parser.add_class_arguments(SearchConfig, "search", skip=_SET_BY_THE_RUN, sub_configs=False)
    parser.add_class_arguments(FinetuneConfig, "finetune", sub_configs=False)


def _demo_arguments(parser: Any) -> None:
    from lrsearch.pipeline._demo import DemoOptions

    parser.add_class_arguments(DemoOptions, None)


def _dashboard_arguments(parser: Any) -> None:
    parser.add_argument("target", type=str, help="run folder (uses its study), study file (.db, .log) or storage URL")
    parser.add_argument("--port", type=int, default=8080, help="port")
    parser.add_argument("--host", type=str, default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 exposes it to the network")


def _report_arguments(parser: Any) -> None:
    parser.add_argument("run_dir", type=str, help="run folder holding report.json")


def _lightning_bases(name: str) -> tuple[type, ...]:
    """``name`` (LightningModule, LightningDataModule) from each Lightning package installed."""
    import importlib.util

    import pytorch_lightning

    bases = [getattr(pytorch_lightning, name)]
    if importlib.util.find_spec("lightning") is not None:
        import lightning.pytorch

        bases.append(getattr(lightning.pytorch, name))
    return tuple(bases)


def _fail(command: str | None, message: str) -> int:
    prefix = f"{PROG} {command}" if command else PROG
    print(f"{prefix}: error: {one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Warnings as one line each, without the source line a user cannot act on."""
    print(f"{PROG}: warning: {one_line(str(message))}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# tune / worker / finalize: build everything (and fail) before anything is written


def _spec_of(command: str, args: Any) -> Any:
    """The run spec the flags and config describe; a bad value names its key."""
    from lrsearch.pipeline import FinetuneConfig, RunSpec
    from lrsearch.pipeline._worker import counted_trials
    from lrsearch.study import SearchConfig

    search = _built("search", SearchConfig, args.search.as_dict())
    if command in ("worker", "finalize") and search.storage is None:
        raise UsageError("a worker needs storage all workers share: --storage journal:PATH or postgresql://..."
                         if command == "worker" else "finalize needs the workers' storage: --storage URL "
                         "(and --study-name NAME).")
    if command == "finalize":  # no new trials: the study's total is what the workers ran
        search = replace(search, n_trials=counted_trials(search.storage, search.study_name))
    finetune = _built("finetune", FinetuneConfig, args.finetune.as_dict())
    values = {f.name: args[f.name] for f in fields(RunSpec) if f.init and f.name not in ("search", "finetune")}
    return RunSpec(**values, search=search, finetune=finetune)


def _built(group: str, kind: type, values: dict[str, Any]) -> Any:
    try:
        return kind(**values)
    except (ValueError, TypeError) as error:  # OptionError, UnknownOptionError and any other check
        raise UsageError(f"{group}.{error}") from None


def _check_storage(url: str | None) -> None:
    """An unwritable file or an unreachable server fails now, before any work, creating nothing."""
    from lrsearch.study._storage import (
        check_file_storage,
        is_file_storage,
        open_storage,
    )

    if url is not None and is_file_storage(url):
        check_file_storage(url)
    elif url is not None:
        open_storage(url, heartbeat_interval=None)


def _model_and_data(parser: Any, args: Any) -> tuple[Any, Any, str]:
    """The module (weights loaded), its datamodule and a description of both."""
    from lrsearch.pipeline._lightning import load_weights

    if (args.model is None) != (args.data is None):
        given, missing = ("model", "data") if args.data is None else ("data", "model")
        raise UsageError(format_problem(f"{given} is set but {missing} is not",
                                        expected="both model and data, or neither (the built-in default)",
                                        hint=f"add a {missing}: section with class_path and init_args to the config."))
    if args.model is None:
        from lrsearch.demo.lightning import pretrained_classifier

        if args.ckpt_path is not None:
            raise UsageError("ckpt_path needs a model: set model.class_path to the checkpoint's class.")
        module, datamodule = pretrained_classifier()
        return module, datamodule, "built-in pretrained MNIST-1D MLP (lrsearch.demo.lightning.Mnist1dClassifier)"
    try:
        built = parser.instantiate(args)
    except (ValueError, TypeError, ImportError, OSError) as error:
        if isinstance(error, LrSearchError):
            raise
        raise UsageError(f"cannot build the model or data from the config: {type(error).__name__}: {error}") \
            from error
    module, description = built.model, f"{type(built.model).__module__}.{type(built.model).__qualname__}"
    if args.ckpt_path is not None:
        load_weights(module, args.ckpt_path)
        description += f" with weights from {args.ckpt_path}"
    return module, built.data, description


def _run_job(command: str, parser: Any, args: Any) -> int:
    from lrsearch.pipeline._console import run_console

    spec = _spec_of(command, args)
    with run_console(verbose=spec.verbose):
        _check_storage(spec.search.storage)
        module, datamodule, description = _model_and_data(parser, args)
        run = spec.resolve()
        if command == "worker":
            return _worker(run, module, datamodule, description, given=args.get("config"))
        return _compress(command, run, module, datamodule, description)


def _compress(command: str, run: Any, module: Any, datamodule: Any, description: str) -> int:
    from lrsearch.pipeline._compress import run_compression
    from lrsearch.pipeline._report import render_text
    from lrsearch.study._storage import redacted

    spec, search, layout = run.spec, run.search, run.layout
    trials = (f"{search.n_trials} trials found by the workers, no new ones" if command == "finalize" else
              f"{search.n_trials} trials ({search.sampler}, objective {search.objective}"
              f"{'' if search.threads is None else f', {search.threads} thread(s)'})")
    epochs = "epochs from the training set's size" if spec.finetune.epochs is None else \
        f"{spec.finetune.epochs} epoch(s)"
    print(f"{PROG} {command}: {description}")
    print(f"  budget      {spec.allowed} drop of {run.metric_name or 'accuracy'} on unseen data after fine-tuning"
          f" (search constraint before fine-tuning {spec.constraint})")
    print(f"  search      {trials}")
    print(f"  fine-tune   up to {spec.max_finetunes} candidates (uniform-rank ladder, descent, front), {epochs} each"
          + (", distilled from the original" if spec.finetune.distill else ""))
    print(f"  run folder  {layout.root}")
    print(f"  study       {redacted(search.storage_url)} (study {search.study_name!r}; "
          f"view: {PROG} dashboard {layout.root})\n", flush=True)
    started = time.perf_counter()
    result = run_compression(module, run, datamodule=datamodule, announce=False)
    print(f"\nDone in {time.perf_counter() - started:.0f} s.")
    print(render_text(result.report, run_dir=layout.root))
    return EXIT_OK if result.meets_budget else EXIT_MISSED


def _worker(run: Any, module: Any, datamodule: Any, description: str, *, given: Any) -> int:
    from lrsearch.pipeline import search_worker
    from lrsearch.pipeline._worker import counted_trials
    from lrsearch.study._storage import redacted

    config = run.search
    if config.storage.startswith("sqlite"):
        print(f"{PROG} worker: note: SQLite serves one process well; for several workers use "
              "journal:PATH (one machine) or postgresql://... (many).", file=sys.stderr)
    print(f"Worker {config.worker_index} on study {config.study_name!r} at {redacted(config.storage)}: "
          f"{description}, search budget {run.spec.constraint}, {config.n_trials} trials in the study in total.")
    result = search_worker(module, run.spec, datamodule=datamodule)
    finished = counted_trials(config.storage, config.study_name)
    print(f"\nThe study has {finished} trials; "
          + (f"the best feasible so far is trial {result.best.trial} (search drop {100 * result.best.drop:.2f} "
             "points)." if result.best else "none meets the search budget yet."))
    config_flag = f" --config {given[-1]}" if given else ""
    print(f"Next, when the workers are done: {PROG} finalize{config_flag} --storage {redacted(config.storage)} "
          f"--study-name {config.study_name}")
    return EXIT_OK if result.best is not None else EXIT_MISSED


# ---------------------------------------------------------------------------------------------
# dashboard / report / demo


def _run_dashboard(_command: str, _parser: Any, args: Any) -> int:
    import errno

    from lrsearch.pipeline._layout import storage_of
    from lrsearch.pipeline._worker import check_study_exists
    from lrsearch.study._storage import open_storage, redacted

    url = storage_of(args.target)
    check_study_exists(url)
    import importlib.util

    from lrsearch.study._dashboard import serve_dashboard

    if importlib.util.find_spec("optuna_dashboard") is None:
        raise UsageError("the dashboard needs optuna-dashboard: pip install 'lrsearch[dashboard]'")
    storage = open_storage(url, heartbeat_interval=None)
    print(f"Serving optuna-dashboard for {redacted(url)} on http://{args.host}:{args.port}/ (Ctrl-C stops)",
          flush=True)
    try:
        serve_dashboard(storage, host=args.host, port=args.port)
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as error:
        if error.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise UsageError(f"cannot listen on {args.host}:{args.port}: {error.strerror}; pick another --port.") \
                from error
        raise
    return EXIT_OK


def _run_report(_command: str, _parser: Any, args: Any) -> int:
    from lrsearch.pipeline._report import rebuild_report

    print(rebuild_report(args.run_dir))
    return EXIT_OK


def _run_demo(_command: str, _parser: Any, args: Any) -> int:
    from lrsearch.pipeline._demo import DemoOptions, run_demo

    return run_demo(_built("demo", DemoOptions, args.as_dict()))


_BUILDERS: dict[str, Callable[[Any], None]] = {
    **dict.fromkeys(_JOB_COMMANDS, _job_arguments),
    "dashboard": _dashboard_arguments, "report": _report_arguments, "demo": _demo_arguments,
}
_HANDLERS: dict[str, Callable[[str, Any, Any], int]] = {
    **dict.fromkeys(_JOB_COMMANDS, _run_job),
    "dashboard": _run_dashboard, "report": _run_report, "demo": _run_demo,
}


if __name__ == "__main__":
    raise SystemExit(main())
