#!/usr/bin/env bash
# Create .venv (once, and again when pyproject.toml or the lock changes) with exactly the tested versions:
# requirements/lock.txt (written by `nox -s lock`; CPU torch 2.13.0 from pip's local wheel), then asymoe in editable
# mode without touching them.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.asymoe-installed
want=$(cat pyproject.toml requirements/lock.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements/lock.txt
.venv/bin/python -m pip install -q --no-deps -e .
echo "$want" > "$stamp"
