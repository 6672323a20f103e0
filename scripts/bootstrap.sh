#!/usr/bin/env bash
# Create .venv (once, and again when pyproject.toml changes) with CPU torch 2.13.0 and asymoe[test] in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.asymoe-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"   # pinned: an unpinned torch pulls a multi-GB CUDA build
.venv/bin/python -m pip install -q -e ".[test]"
echo "$want" > "$stamp"
