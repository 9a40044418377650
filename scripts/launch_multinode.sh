#!/usr/bin/env bash
# Multi-node training with DeepSpeed's launcher (pdsh/ssh to every host in the hostfile).
#   bash scripts/launch_multinode.sh HOSTFILE STAGE [train_stage.py args...]
# HOSTFILE lines look like "node1 slots=8". Every node needs the same checkout, venv and data paths.
# Set MASTER_ADDR (default: the first host in the hostfile) and MASTER_PORT (default 29500) if needed.
set -euo pipefail
if [ $# -lt 2 ]; then echo "usage: bash scripts/launch_multinode.sh HOSTFILE STAGE [--config FILE] [--set k=v ...]" >&2; exit 2; fi
HOSTFILE="$1"; STAGE="$2"; shift 2
[ -f "$HOSTFILE" ] || { echo "hostfile not found: $HOSTFILE (lines like 'node1 slots=8')" >&2; exit 2; }
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MASTER_ADDR="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}"
exec "${UMLLM_VENV:-$ROOT/.venv}/bin/deepspeed" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
  --master_port "${MASTER_PORT:-29500}" "$ROOT/train_stage.py" --stage "$STAGE" "$@"
