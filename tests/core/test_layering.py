"""Layering: ``lrsearch.core`` and ``lrsearch.measure`` (layers 1 and 2) and the demo never import
Optuna or Lightning, and the public names are sorted and importable."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import lrsearch
import lrsearch.core

HEAVY = ("optuna", "optuna_dashboard", "pytorch_lightning", "lightning")
PACKAGE = Path(lrsearch.__file__).parent
TORCH_ONLY_FILES = sorted([*(PACKAGE / "core").rglob("*.py"), *(PACKAGE / "measure").rglob("*.py"),
                           PACKAGE / "demo" / "__init__.py", PACKAGE / "demo" / "_mnist1d.py",
                           PACKAGE / "_errors.py",
                           PACKAGE / "_atomic.py", PACKAGE / "_version.py"])

SCRIPT = """
import json, sys
import torch
import lrsearch
import lrsearch.core
import lrsearch.measure
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
small = lrsearch.factorize(model, 2, method="whitened", calibration=[torch.randn(4, 6)])
assert isinstance(small[0], lrsearch.LowRankLinear), type(small[0])
lrsearch.measure.parse_budget("0.5%%")
lrsearch.measure.Evaluator([(torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))]).evaluate(small)
heavy = %r
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in heavy)))
import optuna  # the probe must see a heavy module once something imports it
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in heavy)))
"""


def test_import_and_factorize_load_no_optuna_or_lightning():
    result = subprocess.run([sys.executable, "-c", SCRIPT % (HEAVY,)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    after_lrsearch, after_optuna = (json.loads(line) for line in result.stdout.strip().splitlines()[-2:])
    assert after_lrsearch == []
    assert "optuna" in after_optuna  # sanity check of the probe itself


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__", "find_spec")):
            names.add(node.args[0].value)
    return names


def test_torch_only_files_exist():
    assert len(TORCH_ONLY_FILES) >= 8
    assert all(path.is_file() for path in TORCH_ONLY_FILES)


@pytest.mark.parametrize("path", TORCH_ONLY_FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_files_do_not_import_optuna_or_lightning(path):
    imported = _imported_modules(path)
    offending = sorted(name for name in imported if name.split(".")[0] in HEAVY)
    assert offending == [], f"{path} imports {offending}"


def test_static_check_detects_heavy_imports(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("import os\nfrom optuna.trial import Trial\n"
                    "def f():\n    import lightning.pytorch as L\n"
                    "    return importlib.import_module('pytorch_lightning')\n")
    imported = _imported_modules(path)
    assert {"optuna.trial", "lightning.pytorch", "pytorch_lightning"} <= imported


@pytest.mark.parametrize("module", [lrsearch, lrsearch.core], ids=lambda m: m.__name__)
def test_all_is_sorted_unique_and_importable(module):
    names = list(module.__all__)
    assert names == sorted(names)
    assert len(names) == len(set(names))
    for name in names:
        assert getattr(module, name) is not None, name
    namespace: dict = {}
    exec(f"from {module.__name__} import *", namespace)  # noqa: S102
    assert set(names) <= set(namespace)


def test_top_level_reexports_are_the_core_objects():
    for name in lrsearch.__all__:
        if name in lrsearch.core.__all__:
            assert getattr(lrsearch, name) is getattr(lrsearch.core, name), name
    errors = importlib.import_module("lrsearch._errors")
    for name in errors.__all__:
        if name in lrsearch.__all__:
            assert getattr(lrsearch, name) is getattr(errors, name)


def test_core_never_imports_transformers():
    """transformers' Conv1D is recognised by duck type: core must work where transformers is absent."""
    core_files = sorted((PACKAGE / "core").rglob("*.py"))
    assert all("transformers" not in {name.split(".")[0] for name in _imported_modules(path)}
               for path in core_files)
    script = ("import sys, torch, lrsearch.core\n"
              "model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Conv1d(8, 8, 1))\n"
              "lrsearch.core.select_targets(model)\n"
              "print('transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
