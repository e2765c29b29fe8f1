#!/usr/bin/env bash
# Distributed training with torchrun: bash tools/dist_train.sh CONFIG NUM_PROCS [train.py args]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and PORT (as in mmdetection) on every node.
# Without CUDA the processes use the gloo backend on CPU (see mmnorm/utils/launch.py).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: bash $0 CONFIG NUM_PROCS [tools/train.py args]" >&2
    exit 2
fi
exec bash "$(dirname "$0")/dist_run.sh" "$2" train.py "$1" "${@:3}"
