#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the project into it.
#   bash scripts/setup_env.sh [EXTRAS]      e.g. EXTRAS=dev  or  dev,eval,demo
# The eval extra installs lmms-eval with --no-deps plus scripts/requirements-eval.txt (its own pins would swap torch).
# Idempotent: a stamp of pyproject.toml + extras + torch lets a second run return in seconds.
# Torch safety: an existing torch (e.g. the user's CUDA build) is never replaced; with none, torch==2.13.0
# is installed first, and every later install runs under a constraints file pinning the installed torch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UMLLM_VENV:-$ROOT/.venv}"
EXTRAS="${1:-}"
BASE_PY="${PYTHON:-python3}"
TORCH_DEFAULT="${UMLLM_TORCH:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  if "$BASE_PY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] base python already has torch; creating $VENV with --system-site-packages so it is reused"
    "$BASE_PY" -m venv --system-site-packages "$VENV"
  else
    echo "[setup] creating $VENV"
    "$BASE_PY" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"

# DeepSpeed compiles its CPU all-reduce op at a process's first initialisation (35-60 s); build it here, at
# installation, so the first training stage does not (a no-op when it is built; nothing on CUDA machines).
build_cpu_ops() {
  "$PY" -m unified_mllm.training.distributed --build-cpu-ops \
    || echo "[setup] could not build DeepSpeed's CPU op now (above); the first training stage will build it"
}

stamp_src="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" "$ROOT/scripts/requirements-eval.txt" 2>/dev/null; echo "extras=$EXTRAS")"
STAMP_FILE="$VENV/.unified_mllm_stamp${EXTRAS:+_${EXTRAS//,/_}}"
stamp="$(printf '%s' "$stamp_src" | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP_FILE" ] && [ "$(cat "$STAMP_FILE")" = "$stamp" ] \
   && "$PY" -c "import torch, unified_mllm, tokenizer" >/dev/null 2>&1; then
  echo "[setup] environment up to date ($VENV, extras: ${EXTRAS:-none})"
  build_cpu_ops
  exit 0
fi

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] no torch found: installing $TORCH_DEFAULT first"
  "$PY" -m pip install --disable-pip-version-check -q "$TORCH_DEFAULT"
fi
TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)')"
CONSTRAINTS="$VENV/torch-constraints.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
echo "[setup] torch $TORCH_VERSION pinned by $CONSTRAINTS"
# PIP_CONSTRAINT also reaches isolated build environments, so no sdist build can pull another torch.
export PIP_CONSTRAINT="$CONSTRAINTS"

pip_extras=""
want_eval=0
IFS=',' read -ra parts <<< "$EXTRAS"
for e in "${parts[@]}"; do
  [ -z "$e" ] && continue
  if [ "$e" = "eval" ]; then want_eval=1; else pip_extras="${pip_extras:+$pip_extras,}$e"; fi
done
spec="$ROOT"
[ -n "$pip_extras" ] && spec="$ROOT[$pip_extras]"
echo "[setup] installing $spec"
"$PY" -m pip install --disable-pip-version-check -q -e "$spec"
if [ "$want_eval" = 1 ]; then
  # lmms-eval depends on torchvision, which pins its own torch: install it without deps, then its needs.
  echo "[setup] installing lmms-eval (--no-deps) and scripts/requirements-eval.txt"
  "$PY" -m pip install --disable-pip-version-check -q --no-deps "lmms-eval>=0.7.3,<0.8"
  "$PY" -m pip install --disable-pip-version-check -q -r "$ROOT/scripts/requirements-eval.txt"
  "$PY" -c "import lmms_eval.evaluator, lmms_eval.tasks, eval.lmms_plugin" \
    || { echo "[setup] lmms-eval installed but does not import; see scripts/requirements-eval.txt"; exit 1; }
fi
"$PY" -c "import torch, unified_mllm, tokenizer" || { echo "[setup] install finished but imports fail"; exit 1; }
echo "$stamp" > "$STAMP_FILE"
build_cpu_ops
echo "[setup] done ($VENV, torch $TORCH_VERSION, extras: ${EXTRAS:-none})"
