"""The command line's words before parsing and its parse errors after: both as a user would want them.

Before: aliases spelled out, ``--budget -1%`` kept together, built-in configs found by name, a
config file that is missing or not YAML reported with its line. After: jsonargparse's nested,
multi-line errors as one sentence, with a "did you mean" for a mistyped flag or key.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lrsearch._checks import did_you_mean
from lrsearch._errors import LrSearchError

__all__ = ["ALIASES", "CONFIG_DIR", "UsageError", "check_yaml", "one_line", "parse_message", "prepared", "shipped"]

CONFIG_DIR = Path(__file__).parent / "configs"
ALIASES = {"--storage": "--search.storage", "--study-name": "--search.study_name",
           "--worker-index": "--search.worker_index", "--run-dir": "--run_dir", "--cache-dir": "--cache_dir"}


class UsageError(LrSearchError, ValueError):
    """Bad command-line input found before any work started (exit status 2)."""


def prepared(argv: list[str]) -> list[str]:
    """Aliases spelled out; ``--budget -1%`` as ``--budget=-1%`` (argparse would take "-1%" for a flag and
    hide the real problem); a built-in config named without its path."""
    words: list[str] = []
    for word in [part for word in argv for part in
                 (word.split("=", 1) if word.startswith("--config=") else [word])]:
        flag, equals, value = word.partition("=")
        word = ALIASES.get(flag, flag) + equals + value
        if words and words[-1] in ("--budget", "--search_budget") and re.match(r"-[\d.]", word):
            words[-1] = f"{words[-1]}={word}"
        elif words and words[-1] == "--config" and not Path(word).exists() and (CONFIG_DIR / f"{word}.yaml").is_file():
            words.append(str(CONFIG_DIR / f"{word}.yaml"))
        else:
            words.append(word)
    return words


def check_yaml(argv: Sequence[str]) -> None:
    """A config file that is missing or not YAML, named with its line (jsonargparse names neither)."""
    import yaml

    for flag, value in zip(argv, argv[1:]):
        if flag != "--config":
            continue
        path = Path(value)
        if not path.is_file():
            raise UsageError(f"--config: file not found: {value} (built-in configs: {', '.join(shipped())})")
        try:
            yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise UsageError(f"--config: {path}{where}: not valid YAML: {error.problem}") from None


def one_line(message: str) -> str:
    return re.sub(r"\s+", " ", message).strip()


def parse_message(message: str, parser: Any) -> str:
    """jsonargparse's (often multi-line, nested) parse error as one sentence, with a "did you mean"."""
    keys = [action.dest for action in getattr(parser, "_actions", []) if action.dest != "help"]
    unknown = re.search(r"unrecognized arguments: (--[\w.]+)", message)
    if unknown:
        return f"unrecognized arguments: {unknown.group(1)}{did_you_mean(unknown.group(1), ['--' + k for k in keys])}"
    where = re.search(r'Parser key "([^"]+)"', message)
    prefix = f"{where.group(1)}: " if where else ""
    problem = re.search(r"Problem with given class_path '([^']+)':\n(.+?)(?=\n    - |\n  Given value|\Z)", message,
                        re.DOTALL)
    if problem:
        detail = re.sub(r'Parser key "([^"]+)":\s*', r"\1: ", one_line(problem.group(2)))
        return f"{prefix}cannot use class_path {problem.group(1)!r}: {detail}"
    key = re.search(r"(Group|Subcommand) '([\w.]+)' does not accept option '([\w.]+)'|Option '([\w.]+)' is not accepted",
                    message)
    if key:
        name = key.group(4) or (key.group(3) if key.group(1) == "Subcommand" else f"{key.group(2)}.{key.group(3)}")
        return f"the config key {name!r} is not an option{did_you_mean(name, keys)}"
    given = re.search(r"Given value: (.+)", message)
    subclass = re.search(r"does not correspond to a subclass of (\w+)", message)
    if subclass:
        return f"{prefix}{given.group(1).strip() if given else 'the class'} is not a {subclass.group(1)} subclass"
    if "does not validate against any of the Union subtypes" in message or "Expected a" in message:
        return f"{prefix}invalid value{': ' + given.group(1) if given else ''}"
    return prefix + message[where.end():].lstrip(": ") if where else message


def shipped() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))
