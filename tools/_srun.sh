#!/usr/bin/env bash
# Shared by slurm_train.sh / slurm_test.sh: srun tools/SCRIPT ARGS on PARTITION as JOB_NAME.
# GPUS (total processes, default 8), GPUS_PER_NODE (default 8; 0 on CPU-only nodes, where the
# processes use gloo), CPUS_PER_TASK (default 5), SRUN_ARGS, PYTHON (default: the project's .venv
# if it exists, else python on PATH; tools/_python.sh).
set -euo pipefail
PARTITION=$1
JOB_NAME=$2
SCRIPT=$3
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
if [ "$GPUS_PER_NODE" -gt 0 ]; then
    TASKS_PER_NODE=$(( GPUS < GPUS_PER_NODE ? GPUS : GPUS_PER_NODE ))
    GRES=(--gres=gpu:"$GPUS_PER_NODE")
else
    TASKS_PER_NODE=$GPUS
    GRES=()
fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=tools/_python.sh
source "$ROOT/tools/_python.sh"
# shellcheck disable=SC2086
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
exec srun -p "$PARTITION" \
    --job-name="$JOB_NAME" \
    "${GRES[@]}" \
    --ntasks="$GPUS" \
    --ntasks-per-node="$TASKS_PER_NODE" \
    --cpus-per-task="${CPUS_PER_TASK:-5}" \
    --kill-on-bad-exit=1 \
    ${SRUN_ARGS:-} \
    "$PYTHON" -u "$ROOT/tools/$SCRIPT" "${@:4}" --launcher=slurm
