#!/usr/bin/env bash
# Create .venv (if missing) and install lrsearch into it in editable mode with the dev extras.
# Idempotent: a second run with an unchanged pyproject.toml only checks that lrsearch is installed.
# PYTHON selects the interpreter used to create the venv (default: python3).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
VPY="$VENV/bin/python"
TORCH_PIN="torch==2.13.0"
STAMP="$VENV/.lrsearch-setup"

export PIP_DISABLE_PIP_VERSION_CHECK=1

if [[ ! -x "$VPY" ]]; then
    echo "setup.sh: creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi

stamp="$("$VPY" -c 'import hashlib, sys; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest(), sys.version)')"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$stamp" ]] && "$VPY" -c 'import importlib.metadata as m; m.version("lrsearch")' 2>/dev/null; then
    echo "setup.sh: $VENV is up to date"
    exit 0
fi

if ! "$VPY" -c 'import torch' 2>/dev/null; then
    echo "setup.sh: installing $TORCH_PIN"
    if ! "$VPY" -m pip install "$TORCH_PIN"; then
        echo "setup.sh: WARNING: could not install $TORCH_PIN; installing the torch build pip picks by default" >&2
        "$VPY" -m pip install torch
    fi
fi

echo "setup.sh: installing lrsearch (editable) with the dev extras"
"$VPY" -m pip install -e ".[dev]"
printf '%s\n' "$stamp" > "$STAMP"
