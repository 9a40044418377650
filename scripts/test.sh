#!/usr/bin/env bash
# Run the test suite: creates or reuses .venv, installs the project with the dev and eval extras (lmms-eval, for
# tests/test_eval.py), runs ruff and pytest.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh dev,eval
PY="${UMLLM_VENV:-$ROOT/.venv}/bin/python"
"$PY" -m ruff check .
exec "$PY" -m pytest tests -q "$@"
