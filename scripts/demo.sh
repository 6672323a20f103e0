#!/usr/bin/env bash
# The main job: set up the environment if needed, then run `asymoe demo` on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/asymoe demo "$@"
