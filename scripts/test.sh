#!/usr/bin/env bash
# Run the test suite: creates or reuses .venv, installs the project with the dev, demo and eval extras (gradio for
# the web demo, lmms-eval for tests/test_eval.py), runs ruff and pytest.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh dev,demo,eval
# The web-demo test drives a real headless Chromium; without one it is skipped (UMLLM_REQUIRE_BROWSER=1 makes that
# a failure). UMLLM_INSTALL_BROWSER=1 installs Debian's chromium package first (needs root and apt-get).
if [ "${UMLLM_INSTALL_BROWSER:-0}" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  echo "[test] installing chromium (Debian package) for the web-demo test"
  (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }) \
    || echo "[test] could not install chromium; the web-demo test will report it"
fi
PY="${UMLLM_VENV:-$ROOT/.venv}/bin/python"
"$PY" -m ruff check .
exec "$PY" -m pytest tests -q "$@"
