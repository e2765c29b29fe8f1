#!/usr/bin/env bash
# The prepared GPU check (tools/gpu_check.py) under another torch than the project's pinned one.
#
#   bash tools/gpu_check_torch.sh VERSION [gpu_check.py arguments]
#   make gpu-check-torch                  # VERSION = the GPU machine's torch, MACHINE_TORCH
#
# Why: the lent GPU machine runs its own image's torch (2.11.0 when last read, 2026-11-17; this
# project pins 2.13.0) and cannot install another (no network; a torch wheel is far over what a
# call may carry). Its device minutes are few, so the check must already pass on that version
# here, on the CPU. On 2026-12-07 it did not: torch 2.11 refused batch norm's eps 0 and gave the
# compiled form's gradients as zeros.
#
# How: VERSION's torch wheel and the Triton it pins, from PyPI without their CUDA packages,
# unpacked into .venv-torch-VERSION/ beside the environment (ignored by git; kept for the next
# run), put ahead of the environment's packages on PYTHONPATH; everything else (numpy, the CUDA
# libraries torch loads) comes from the environment, $VENV (default .venv; make env creates it).
# Arguments after VERSION go to gpu_check.py; --device cpu (its short mode) and
# --out work_dirs/gpu_check_torch-VERSION unless they are given. Exit status: gpu_check.py's
# (0 passed, 1 a case failed, 3 cases not run), or 2 when this script could not run it.
set -euo pipefail
if [ "$#" -lt 1 ] || [ -z "$1" ]; then
    echo "usage: bash tools/gpu_check_torch.sh TORCH_VERSION [gpu_check.py arguments]" >&2
    exit 2
fi
version="$1"
shift
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${VENV:-$root/.venv}"
case "$venv" in /*) ;; *) venv="$root/$venv" ;; esac
python="$venv/bin/python"
if [ ! -x "$python" ] || [ ! -f "$root/tools/gpu_check.py" ]; then
    echo "gpu_check_torch: needs a checkout with its environment ($venv not found: run make env" \
         "first)" >&2
    exit 2
fi
side="$(dirname "$venv")/.venv-torch-$version"
# Written after a complete install: what was asked for, so that "2.11" is not installed again.
marker="$side/.mmnorm-requested"
if [ "$(cat "$marker" 2>/dev/null)" != "torch==$version" ]; then
    echo "gpu_check_torch: installing torch $version (without its CUDA packages) into $side"
    partial="$side.partial.$$"
    trap 'rm -rf "$partial"' EXIT
    if ! "$python" -m pip install -q --disable-pip-version-check --no-deps --target "$partial" \
            "torch==$version"; then
        echo "gpu_check_torch: pip could not install torch==$version" >&2
        exit 2
    fi
    # The Triton this torch pins (its Inductor and mmnorm's kernel need that one), markers kept.
    triton="$(PYTHONPATH="$partial" "$python" -c "import importlib.metadata as m
print(next((r for r in m.requires('torch') or [] if r.startswith('triton')), ''))")"
    if [ -n "$triton" ] && ! "$python" -m pip install -q --disable-pip-version-check --no-deps \
            --target "$partial" "$triton"; then
        echo "gpu_check_torch: pip could not install $triton" >&2
        exit 2
    fi
    echo "torch==$version" > "$partial/.mmnorm-requested"
    rm -rf "$side"
    mv "$partial" "$side"  # complete or absent: an interrupted install is redone
fi
args=("$@")
case " ${args[*]-} " in *" --device "*|*" --device="*) ;; *) args+=(--device cpu) ;; esac
case " ${args[*]-} " in
    *" --out "*|*" --out="*) ;;
    *) args+=(--out "work_dirs/gpu_check_torch-$version") ;;
esac
cd "$root"
PYTHONPATH="$side:$root${PYTHONPATH:+:$PYTHONPATH}" exec "$python" tools/gpu_check.py "${args[@]}"
