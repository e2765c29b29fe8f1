#!/usr/bin/env bash
# Training on a SLURM cluster (see tools/_srun.sh for GPUS, GPUS_PER_NODE, CPUS_PER_TASK):
#   bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [tools/train.py args]
set -euo pipefail
if [ $# -lt 4 ]; then
    echo "usage: bash $0 PARTITION JOB_NAME CONFIG WORK_DIR [tools/train.py args]" >&2
    exit 2
fi
exec bash "$(dirname "$0")/_srun.sh" "$1" "$2" train.py "$3" --work-dir="$4" "${@:5}"
