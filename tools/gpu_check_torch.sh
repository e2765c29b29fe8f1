#!/usr/bin/env bash
# The prepared GPU check (tools/gpu_check.py) under another torch than the project's pinned one.
#
#   bash tools/gpu_check_torch.sh VERSION [gpu_check.py arguments]
#   make gpu-check-torch                  # VERSION = the GPU machine's torch, --device cpu
#
# Why: the lent GPU machine runs its own image's torch (2.11.0 when last read, 2026-11-17; this
# project pins 2.13.0) and cannot install another (no network; a torch wheel is far over what a
# call may carry). Its device minutes are few, so the check must already pass on that version
# here, on the CPU. On 2026-12-07 it did not: torch 2.11 refuses batch norm's eps 0 and gave the
# compiled form's gradients as zeros.
#
# How: VERSION's torch wheel and the Triton it pins, from PyPI without their CUDA packages,
# unpacked into .venv-torch-VERSION/ (ignored by git; kept for the next run), put ahead of
# .venv's packages on PYTHONPATH; everything else (numpy, the CUDA libraries torch loads) comes
# from .venv (make env creates it). Arguments after VERSION go to gpu_check.py (default:
# --device cpu, its short mode, reports in work_dirs/gpu_check_torch-VERSION); its exit status
# is this script's.
set -euo pipefail
version="${1:?usage: bash tools/gpu_check_torch.sh TORCH_VERSION [gpu_check.py arguments]}"
shift
root="$(cd "$(dirname "$0")/.." && pwd)"
python="$root/.venv/bin/python"
if [ ! -x "$python" ]; then
    echo "gpu_check_torch: $root/.venv not found; run make env first" >&2
    exit 2
fi
side="$root/.venv-torch-$version"
installed() {
    PYTHONPATH="$side" "$python" -c "import sys, torch
sys.exit(torch.__version__.split('+')[0] != sys.argv[1] or not torch.__file__.startswith(sys.argv[2]))" \
        "$version" "$side" 2>/dev/null
}
if ! installed; then
    echo "gpu_check_torch: installing torch $version (without its CUDA packages) into $side"
    rm -rf "$side.partial"
    "$python" -m pip install -q --disable-pip-version-check --no-deps --target "$side.partial" \
        "torch==$version"
    # The Triton this torch pins (its Inductor and mmnorm's kernel need that one).
    triton="$(PYTHONPATH="$side.partial" "$python" -c "import importlib.metadata as m
print(next((r.split(';')[0].replace(' ', '') for r in m.requires('torch') or []
            if r.startswith('triton')), ''))")"
    if [ -n "$triton" ]; then
        "$python" -m pip install -q --disable-pip-version-check --no-deps \
            --target "$side.partial" "$triton"
    fi
    rm -rf "$side"
    mv "$side.partial" "$side"  # complete or absent: an interrupted install is redone
fi
if [ "$#" -eq 0 ]; then
    set -- --device cpu --out "work_dirs/gpu_check_torch-$version"
fi
cd "$root"
PYTHONPATH="$side:$root${PYTHONPATH:+:$PYTHONPATH}" exec "$python" tools/gpu_check.py "$@"
