"""``import lrsearch`` is lazy (the CLI's help needs no torch), yet every layer is reachable as an attribute."""

from __future__ import annotations

import subprocess
import sys


def test_layers_are_attributes_of_the_package_after_a_plain_import() -> None:
    code = ("import sys, lrsearch; assert 'torch' not in sys.modules; "
            "assert lrsearch.core.macs_per_sample and lrsearch.measure.Evaluator and lrsearch.study.search; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
