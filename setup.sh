#!/usr/bin/env bash
# Creates .venv in the repo root with the CPU build of torch and gvmrl (editable, with test extras).
# Idempotent: when nothing changed since the last run it returns in about a second.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi

# Reinstall only when the dependencies changed (the stamp stores the hash of pyproject.toml's
# ranges and of the exact versions in constraints/cpu.txt).
stamp=.venv/.gvmrl-installed
want=$(cat pyproject.toml constraints/cpu.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, at the version in constraints/cpu.txt: asked for through the package's
# dependencies with nothing installed, it would be a multi-GB CUDA build. On Linux PyPI serves
# the CUDA build for this pin too; TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU
# wheel from PyTorch's index instead (CI's machines have that wheel locally).
.venv/bin/python -m pip install --quiet -c constraints/cpu.txt ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} torch
.venv/bin/python -m pip install --quiet -c constraints/cpu.txt -e ".[test]"
echo "$want" > "$stamp"
