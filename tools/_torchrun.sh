#!/usr/bin/env bash
# Shared by dist_train.sh / dist_test.sh: torchrun NPROCS processes of tools/SCRIPT with ARGS.
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR and PORT, as in mmdetection. PYTHON picks the
# interpreter (default: python on PATH). Without CUDA the processes use gloo on CPU.
set -euo pipefail
NPROCS=$1
SCRIPT=$2
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${PORT:-29500}" \
    --nproc_per_node="$NPROCS" \
    "$ROOT/tools/$SCRIPT" "${@:3}" --launcher pytorch
