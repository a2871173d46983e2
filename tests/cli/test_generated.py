"""The command line is generated from the run spec: every field is a flag and a YAML key with the
Python default, the help reads cleanly, mistakes get a "did you mean", and --help stays light.

In-process and fast: parsing only, nothing is built or run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from lrsearch import cli
from lrsearch.pipeline import FinetuneConfig, RunSpec
from lrsearch.study import SearchConfig

ROOT = Path(__file__).resolve().parents[2]


def _default(field: Any) -> Any:
    value = field.default_factory() if field.default is MISSING else field.default
    return list(value) if isinstance(value, tuple) else value


def _options() -> list[tuple[str, Any]]:
    """(key, Python default) of every option a run takes, walked from the dataclasses themselves."""
    keys = [(f.name, _default(f)) for f in fields(RunSpec) if f.init and f.name not in ("search", "finetune")]
    keys += [(f"search.{f.name}", _default(f)) for f in fields(SearchConfig)
             if f.init and f.name not in cli._SET_BY_THE_RUN]
    keys += [(f"finetune.{f.name}", _default(f)) for f in fields(FinetuneConfig) if f.init]
    return keys


def test_fields_set_by_the_run_are_exactly_those_the_spec_refuses() -> None:
    for name in cli._SET_BY_THE_RUN:
        with pytest.raises(ValueError, match=f"search.{name}"):
            RunSpec(search={name: "x" if name == "run_dir" else "1%"})


def _help(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code in (0, None)
    return capsys.readouterr().out


def _print_config(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    with pytest.raises(SystemExit):
        cli.main(["tune", *args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def _lookup(config: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("command", cli._JOB_COMMANDS)
def test_every_field_is_a_flag_with_its_python_default(command: str, capsys) -> None:
    text = _help(command, capsys)
    entries = re.split(r"\n  (?=--)", text)
    for key, default in _options():
        entry = next((e.split("\n\n")[0] for e in entries if e.startswith(f"--{key} ")), None)
        assert entry is not None, f"--{key} is missing from lrsearch {command} --help"
        shown = re.search(r"default: (.+?)\)\s*$", " ".join(entry.split()))
        assert shown is not None, entry
        expected = "null" if default is None else str(default)
        assert shown.group(1) == expected, (key, shown.group(1), expected)


def test_every_field_is_a_yaml_key_with_its_python_default(capsys) -> None:
    config = _print_config(capsys)
    for key, default in _options():
        assert _lookup(config, key) == default, key


def test_help_reads_cleanly(capsys) -> None:
    for command in cli._HELP:
        text = _help(command, capsys)
        assert "%%" not in text and "<function" not in text and "(<class" not in text, command
        for entry in re.split(r"\n  (?=--)", text):
            assert entry.count("default:") <= 1, entry


def test_root_help_imports_neither_torch_nor_optuna() -> None:
    """What keeps ``lrsearch --help`` fast (well under 2 s): the heavy packages stay unimported."""
    probe = ("import json, sys\nfrom lrsearch import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n"
             "    pass\nprint(json.dumps(sorted(m for m in ('torch', 'optuna', 'pytorch_lightning') if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
    assert "tune" in result.stdout and "dashboard" in result.stdout


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lrsearch tune: error: "), err
    return err


def test_a_mistyped_flag_or_key_gets_a_did_you_mean(tmp_path: Path, capsys) -> None:
    assert "did you mean '--search.n_trials'" in _error(["tune", "--search.n_trails", "3"], capsys)
    config = tmp_path / "typo.yaml"
    config.write_text("budget: 1%\nfinetune:\n  epoch: 2\n")
    assert "did you mean 'finetune.epochs'" in _error(["tune", "--config", str(config)], capsys)
    assert "did you mean 'latency'" in _error(["tune", "--search.objective", "latncy"], capsys)


def test_a_yaml_error_names_the_file_and_line(tmp_path: Path, capsys) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("budget: 1%\nsearch:\n  n_trials: 5\n   objective: macs\n")
    assert f"{config}, line 4" in _error(["tune", "--config", str(config)], capsys)


def test_builtin_configs_by_name_from_any_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    config = _print_config(capsys, "--config", "mnist1d_cnn", "--search.n_trials", "7")
    assert config["model"]["init_args"]["arch"] == "cnn" and config["search"]["n_trials"] == 7


def test_callables_and_trainer_options_come_from_the_command_line(capsys) -> None:
    config = _print_config(capsys, "--forward", "lrsearch.core._runtime.default_forward",
                           "--finetune.trainer", '{"precision": "bf16-mixed"}', "--search.batch_size", "[1, 256]")
    assert config["forward"] == "lrsearch.core._runtime.default_forward"
    assert config["finetune"]["trainer"] == {"precision": "bf16-mixed"}
    assert config["search"]["batch_size"] == [1, 256]
