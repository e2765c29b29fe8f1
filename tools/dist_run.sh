#!/usr/bin/env bash
# torchrun NPROCS processes of tools/SCRIPT with ARGS and --launcher pytorch, e.g.
#   bash tools/dist_run.sh 2 recompute_stats.py CONFIG CKPT --out NEW.pth
# (dist_train.sh and dist_test.sh call it).
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR and PORT, as in mmdetection. The interpreter:
# PYTHON if set, else the project's .venv if it exists, else python on PATH (tools/_python.sh).
# Without CUDA the processes use gloo on CPU.
set -euo pipefail
NPROCS=$1
SCRIPT=$2
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=tools/_python.sh
source "$ROOT/tools/_python.sh"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${PORT:-29500}" \
    --nproc_per_node="$NPROCS" \
    "$ROOT/tools/$SCRIPT" "${@:3}" --launcher pytorch
