#!/usr/bin/env bash
# The main job on the embedded ShapeWorld default: set-up, then every pipeline step through the real code paths.
#   bash scripts/quickstart.sh [--out runs/quickstart] [--fast]
# Re-running skips finished steps; a failed step says which and how to resume.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh dev,eval
exec "${UMLLM_VENV:-$ROOT/.venv}/bin/python" -m unified_mllm.quickstart "$@"
