#!/usr/bin/env bash
# Generate a ShapeWorld dataset: bash scripts/shapeworld_generate.sh OUT_DIR [NUM] [SEED] [RESOLUTION]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "${UMLLM_VENV:-$ROOT/.venv}/bin/python" -m unified_mllm.shapeworld --out "${1:?usage: shapeworld_generate.sh OUT_DIR [NUM] [SEED] [RESOLUTION]}" \
  --num "${2:-50000}" --seed "${3:-0}" --resolution "${4:-64}"
